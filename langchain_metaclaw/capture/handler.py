"""MetaClawCallbackHandler: record every LLM and tool turn of a LangChain / LangGraph agent.

Attach it per call (``config={"callbacks": [handler]}``), on a model (``callbacks=[handler]``), or
globally with :func:`enable_global_capture`. It runs inline on the agent's thread (``run_inline``: no
executor hop for async agents), does a few microseconds of bookkeeping, and hands one record per finished
run to a :class:`~langchain_metaclaw.capture.writer.SpoolingWriter`. It never raises into the agent
(``raise_error = False`` and every hook guarded) and never waits on the database.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import BaseMessage
from langchain_core.outputs import LLMResult
from langchain_core.tracers.context import register_configure_hook

from langchain_metaclaw.capture._core import (
    extra_metadata,
    graph_fields,
    llm_output_fields,
    tool_result_text,
)
from langchain_metaclaw.capture.writer import CaptureStats, SpoolingWriter
from langchain_metaclaw.store.trace_store import TraceStore

logger = logging.getLogger(__name__)

Record = dict[str, Any]


@dataclass(slots=True)
class _Run:
    kind: str
    started: float
    root: str
    episode: str
    parent: UUID | None
    name: str | None = None
    graph: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    messages: list[BaseMessage] | None = None
    invocation_params: dict[str, Any] | None = None
    tool_args: Any = None
    tool_call_id: str | None = None
    closes_episode: bool = False
    """True for a root run, and for a run whose ancestors this handler never saw."""


def _guard(fn):
    """Run a hook; log and swallow anything it raises (the agent must never fail because of capture)."""

    def wrapper(self: MetaClawCallbackHandler, *args: Any, **kwargs: Any) -> None:
        try:
            fn(self, *args, **kwargs)
        except Exception:
            self._hook_errors += 1
            if self._hook_errors == 1:
                logger.exception("metaclaw capture hook %s failed (further failures only counted)", fn.__name__)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class MetaClawCallbackHandler(BaseCallbackHandler):
    """Capture LLM and tool turns into a :class:`TraceStore` for scoring and training.

    Args:
        store: a ``TraceStore`` or a SQLAlchemy URL; ``None`` opens the default store.
        redact: optional hook called with every record (a dict) before it is written; return the dict
            with anything sensitive removed. Built-in patterns (API keys, bearer tokens, ...) always run.
        batch_size: records per database transaction.
        max_delay: seconds the writer waits to fill a batch.

    Example:
        .. code-block:: python

            handler = MetaClawCallbackHandler("sqlite:///metaclaw.db")
            agent.invoke(inputs, config={"callbacks": [handler], "configurable": {"thread_id": "t1"}})
            handler.flush()
            handler.store.turns(kind="llm")
    """

    raise_error: bool = False
    run_inline: bool = True

    def __init__(
        self,
        store: TraceStore | str | None = None,
        *,
        redact: Callable[[Record], Record] | None = None,
        batch_size: int = 256,
        max_delay: float = 0.05,
    ) -> None:
        self.store = store if isinstance(store, TraceStore) else TraceStore(store)
        self._writer = SpoolingWriter(self.store, batch_size=batch_size, max_delay=max_delay, redact=redact)
        self._runs: dict[UUID, _Run] = {}
        self._chains: dict[UUID, tuple[str, str, bool]] = {}
        self._seq = itertools.count(1)
        self._hook_errors = 0
        # Episode starts ride along with the episode's first finished turn (one spool write, not two).
        self._unwritten_starts: dict[str, Record] = {}

    # ---------------------------------------------------------------- sink

    def _emit(self, episode: str, records: list[Record], end: Record | None = None) -> None:
        """Submit one callback event's records as one spool write. An episode's start rides along with its
        first finished record; an episode that starts and ends in the same event is one record."""
        start = self._unwritten_starts.pop(episode, None)
        if start is not None:
            if end is not None:
                start.update(ended_at=end["ended_at"], status=end["status"], error=end["error"])
                end = None
            records.insert(0, start)
        if end is not None:
            records.append(end)
        self._writer.submit(records)

    @property
    def stats(self) -> CaptureStats:
        """Counters of what was captured, written, and could not be written."""
        return self._writer.stats

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Block until every captured record is in the store (``False`` if ``timeout`` passed first)."""
        return self._writer.flush(timeout)

    def close(self, timeout: float | None = 10.0) -> bool:
        """Flush and stop the writer thread; the handler captures nothing afterwards."""
        return self._writer.close(timeout)

    def __enter__(self) -> MetaClawCallbackHandler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- run bookkeeping

    def _locate(self, run_id: UUID, parent_run_id: UUID | None, metadata: dict | None) -> tuple[str, str, bool]:
        """(root run id, episode id, is_new_root) for a run that is starting."""
        if parent_run_id is not None:
            chain = self._chains.get(parent_run_id)
            if chain is not None:
                return chain[0], chain[1], False
            parent = self._runs.get(parent_run_id)
            if parent is not None:
                return parent.root, parent.episode, False
        # A root, or a child whose ancestors this handler never saw (handler attached to a model only).
        root = str(run_id if parent_run_id is None else parent_run_id)
        thread_id = (metadata or {}).get("thread_id")
        episode = str(thread_id) if thread_id is not None else root
        return root, episode, True

    def _start_episode(self, root: str, episode: str, name: str | None, metadata: dict | None,
                       extra: Record) -> None:
        thread_id = (metadata or {}).get("thread_id")
        self._unwritten_starts[episode] = {
            "type": "episode_start",
            "id": episode,
            "thread_id": None if thread_id is None else str(thread_id),
            "root_run_id": root,
            "graph_name": name,
            "started_at": time.time(),
            "metadata": extra,
        }

    @staticmethod
    def _episode_end(episode: str, root: str, status: str, error: str | None = None) -> Record:
        return {"type": "episode_end", "id": episode, "root_run_id": root, "ended_at": time.time(),
                "status": status, "error": error}

    def _begin(self, kind: str, run_id: UUID, parent_run_id: UUID | None, name: str | None,
               metadata: dict | None, tags: list[str] | None) -> _Run:
        root, episode, new = self._locate(run_id, parent_run_id, metadata)
        extra = extra_metadata(metadata)
        if new:
            self._start_episode(root, episode, name, metadata, extra)
        run = _Run(kind=kind, started=time.time(), root=root, episode=episode, parent=parent_run_id, name=name,
                   graph=graph_fields(metadata), metadata=extra, tags=list(tags) if tags else [],
                   closes_episode=new)
        self._runs[run_id] = run
        return run

    def _finish(self, run_id: UUID, run: _Run, status: str, error: str | None, fields: Record) -> None:
        ended = time.time()
        graph = run.graph
        record: Record = {
            "type": "turn",
            "id": str(run_id),
            "seq": next(self._seq),
            "parent_run_id": None if run.parent is None else str(run.parent),
            "root_run_id": run.root,
            "episode_id": run.episode,
            "kind": run.kind,
            "name": run.name,
            "node": graph.get("node"),
            "step": graph.get("step"),
            "checkpoint_ns": graph.get("checkpoint_ns"),
            "started_at": run.started,
            "ended_at": ended,
            "latency_ms": (ended - run.started) * 1000.0,
            "status": status,
            "error": error,
            "tags": run.tags,
            "metadata": run.metadata,
            "created_at": ended,
            **fields,
        }
        end = self._episode_end(run.episode, run.root, status, error) if run.closes_episode else None
        self._emit(run.episode, [record], end)

    # ---------------------------------------------------------------- chat models and LLMs

    @_guard
    def on_chat_model_start(self, serialized: dict[str, Any] | None, messages: list[list[BaseMessage]], *,
                            run_id: UUID, parent_run_id: UUID | None = None, tags: list[str] | None = None,
                            metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        name = kwargs.get("name") or (serialized or {}).get("name") or _serialized_name(serialized)
        run = self._begin("llm", run_id, parent_run_id, name, metadata, tags)
        run.messages = messages[0] if messages else []
        run.invocation_params = _jsonable_params(kwargs.get("invocation_params"))

    @_guard
    def on_llm_start(self, serialized: dict[str, Any] | None, prompts: list[str], *, run_id: UUID,
                     parent_run_id: UUID | None = None, tags: list[str] | None = None,
                     metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        from langchain_core.messages import HumanMessage

        name = kwargs.get("name") or _serialized_name(serialized)
        run = self._begin("llm", run_id, parent_run_id, name, metadata, tags)
        run.messages = [HumanMessage(content=p) for p in prompts[:1]]
        run.invocation_params = _jsonable_params(kwargs.get("invocation_params"))

    @_guard
    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        run = self._runs.pop(run_id, None)
        if run is None:
            return
        fields = llm_output_fields(response)
        fields["input_messages"] = list(run.messages or [])  # the writer encodes them (once per message)
        fields["invocation_params"] = run.invocation_params
        fields.setdefault("model_name", None)
        if not fields.get("model_name") and run.invocation_params:
            fields["model_name"] = run.invocation_params.get("model_name") or run.invocation_params.get("model")
        self._finish(run_id, run, "ok", None, fields)

    @_guard
    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        run = self._runs.pop(run_id, None)
        if run is None:
            return
        fields = {
            "input_messages": list(run.messages or []),
            "invocation_params": run.invocation_params,
            "tokens_source": None,
        }
        self._finish(run_id, run, "error", _describe(error), fields)

    # ---------------------------------------------------------------- tools

    @_guard
    def on_tool_start(self, serialized: dict[str, Any] | None, input_str: str, *, run_id: UUID,
                      parent_run_id: UUID | None = None, tags: list[str] | None = None,
                      metadata: dict[str, Any] | None = None, inputs: dict[str, Any] | None = None,
                      **kwargs: Any) -> None:
        name = kwargs.get("name") or (serialized or {}).get("name")
        run = self._begin("tool", run_id, parent_run_id, name, metadata, tags)
        run.tool_args = inputs if inputs is not None else input_str
        run.tool_call_id = kwargs.get("tool_call_id")

    @_guard
    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        run = self._runs.pop(run_id, None)
        if run is None:
            return
        text, status = tool_result_text(output)
        self._finish(run_id, run, "error" if status == "error" else "ok", text if status == "error" else None,
                     self._tool_fields(run, text))

    @_guard
    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        run = self._runs.pop(run_id, None)
        if run is None:
            return
        self._finish(run_id, run, "error", _describe(error), self._tool_fields(run, None))

    @staticmethod
    def _tool_fields(run: _Run, result: str | None) -> Record:
        return {"tool_name": run.name, "tool_args": run.tool_args, "tool_call_id": run.tool_call_id,
                "tool_result": result}

    # ---------------------------------------------------------------- chains: structure only

    @_guard
    def on_chain_start(self, serialized: dict[str, Any] | None, inputs: Any, *, run_id: UUID,
                       parent_run_id: UUID | None = None, metadata: dict[str, Any] | None = None,
                       **kwargs: Any) -> None:
        root, episode, new = self._locate(run_id, parent_run_id, metadata)
        if new:
            name = kwargs.get("name") or _serialized_name(serialized)
            self._start_episode(root, episode, name, metadata, extra_metadata(metadata))
        self._chains[run_id] = (root, episode, new)

    @_guard
    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        located = self._chains.pop(run_id, None)
        if located is not None and located[2]:
            self._emit(located[1], [], self._episode_end(located[1], located[0], "ok"))

    @_guard
    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        located = self._chains.pop(run_id, None)
        if located is not None and located[2]:
            end = self._episode_end(located[1], located[0], _is_interrupt(error), _describe(error))
            self._emit(located[1], [], end)


def _serialized_name(serialized: dict[str, Any] | None) -> str | None:
    if not serialized:
        return None
    if serialized.get("name"):
        return serialized["name"]
    ident = serialized.get("id")
    return ident[-1] if isinstance(ident, list) and ident else None


_JSON_TYPES = (str, int, float, list, dict)  # bool is an int


def _jsonable_params(params: dict[str, Any] | None) -> dict[str, Any] | None:
    if not params:
        return None
    return {k: v for k, v in params.items() if v is None or isinstance(v, _JSON_TYPES)}


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _is_interrupt(error: BaseException) -> str:
    """LangGraph interrupts (human-in-the-loop) end a run without it having failed."""
    return "interrupted" if type(error).__name__ in {"GraphInterrupt", "NodeInterrupt"} else "error"


_global_capture: ContextVar[MetaClawCallbackHandler | None] = ContextVar("metaclaw_global_capture", default=None)
register_configure_hook(_global_capture, inheritable=True)


def enable_global_capture(store: TraceStore | str | None = None, **kwargs: Any) -> MetaClawCallbackHandler:
    """Attach one handler to every LangChain run in this context (and threads copied from it).

    The one-liner for apps that build runnables in many places::

        handler = enable_global_capture("sqlite:///metaclaw.db")
    """
    handler = MetaClawCallbackHandler(store, **kwargs)
    _global_capture.set(handler)
    return handler


def disable_global_capture() -> None:
    """Stop attaching the global handler (it is flushed and closed)."""
    handler = _global_capture.get()
    _global_capture.set(None)
    if handler is not None:
        handler.close()
