"""The pure half of capture: LangChain callback events in, capture records out (no I/O, no threads).

A record is a plain, JSON-ready dict; ``TraceStore.write_records`` understands three types:
``episode_start`` (which carries the end too when the episode ends in the event that starts it), ``turn``
(one per LLM call and one per tool call, built when the run ends) and ``episode_end``. :class:`CaptureCore`
keeps the run map and decides which episode a run belongs to; the functions below turn LangChain objects
into record fields. Serialisation is hand-rolled for the message fields RL needs because it runs on the
agent's thread and ``model_dump`` of every message would cost more than the whole capture budget.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, LLMResult

from langchain_metaclaw.messages import METACLAW_METADATA_KEY

Record = dict[str, Any]


_ENGINE_FIELDS = ("prompt_token_ids", "completion_token_ids", "logprobs")


def message_to_record(message: BaseMessage) -> dict[str, Any]:
    """The subset of a message that round-trips through ``messages_from_dict``."""
    data: dict[str, Any] = {"content": message.content}
    if message.id:
        data["id"] = message.id
    if message.name:
        data["name"] = message.name
    if message.additional_kwargs:
        data["additional_kwargs"] = message.additional_kwargs
    if isinstance(message, AIMessage):
        if message.tool_calls:
            data["tool_calls"] = message.tool_calls
        if message.invalid_tool_calls:
            data["invalid_tool_calls"] = message.invalid_tool_calls
        if message.usage_metadata:
            data["usage_metadata"] = dict(message.usage_metadata)
        if message.response_metadata:
            data["response_metadata"] = message.response_metadata
    elif isinstance(message, ToolMessage):
        data["tool_call_id"] = message.tool_call_id
        if message.status != "success":
            data["status"] = message.status
    return {"type": message.type, "data": data}


def with_message_dicts(record: Record) -> Record:
    """``record`` with its input messages as dicts: the form a user's ``redact=`` hook gets. The core keeps
    them as message objects, which the writer encodes once per object however often a history resends it."""
    messages = record.get("input_messages")
    if not messages or not isinstance(messages[0], BaseMessage):
        return record
    return {**record, "input_messages": [message_to_record(m) for m in messages]}


def llm_output_fields(response: LLMResult) -> dict[str, Any]:
    """Output message, usage, model name and engine tokens of a finished chat-model run."""
    generation = response.generations[0][0] if response.generations and response.generations[0] else None
    fields: dict[str, Any] = {"tokens_source": "retokenized"}
    if generation is None:
        return fields
    if isinstance(generation, ChatGeneration):
        message = generation.message
        fields["output_message"] = message_to_record(message)
        meta = message.response_metadata or {}
        fields["model_name"] = meta.get("model_name") or meta.get("model")
        usage = getattr(message, "usage_metadata", None)
        if usage:
            fields["usage"] = {k: usage[k] for k in ("input_tokens", "output_tokens", "total_tokens") if k in usage}
        engine = meta.get(METACLAW_METADATA_KEY)
        if isinstance(engine, dict):
            fields["adapter_version"] = engine.get("adapter_version")
            if all(engine.get(k) is not None for k in _ENGINE_FIELDS):
                for key in _ENGINE_FIELDS:
                    fields[key] = list(engine[key])
                fields["tokens_source"] = engine.get("tokens_source", "engine")
            if engine.get("sampling") is not None:
                fields["sampling"] = engine["sampling"]
    else:  # a completion LLM: text only
        fields["output_message"] = {"type": "ai", "data": {"content": generation.text}}
    if not fields.get("usage") and response.llm_output:
        usage = response.llm_output.get("token_usage") or response.llm_output.get("usage")
        if isinstance(usage, dict):
            fields["usage"] = {
                "input_tokens": usage.get("prompt_tokens", usage.get("input_tokens")),
                "output_tokens": usage.get("completion_tokens", usage.get("output_tokens")),
                "total_tokens": usage.get("total_tokens"),
            }
    if not fields.get("model_name") and response.llm_output:
        fields["model_name"] = response.llm_output.get("model_name")
    return fields


def tool_result_text(output: Any) -> tuple[str, str | None]:
    """(text, status) of a tool's return value; ``ToolMessage`` outputs keep their error status."""
    if isinstance(output, ToolMessage):
        content = output.content if isinstance(output.content, str) else str(output.content)
        return content, output.status
    if isinstance(output, str):
        return output, None
    return str(output), None


def graph_fields(metadata: dict[str, Any] | None) -> dict[str, Any]:
    """LangGraph coordinates from callback metadata: node, step, sub-graph namespace, thread."""
    if not metadata:
        return {}
    ns = metadata.get("checkpoint_ns") or metadata.get("langgraph_checkpoint_ns")
    return {
        "node": metadata.get("langgraph_node"),
        "step": metadata.get("langgraph_step"),
        "checkpoint_ns": ns or None,
        "thread_id": metadata.get("thread_id"),
    }


_DROP_METADATA = frozenset(
    {"langgraph_node", "langgraph_step", "checkpoint_ns", "langgraph_checkpoint_ns", "thread_id",
     "langgraph_triggers", "langgraph_path"}
)
_SCALARS = (str, int, float)  # bool is an int


def extra_metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
    """User metadata worth keeping (graph coordinates already have their own columns)."""
    if not metadata:
        return {}
    return {k: v for k, v in metadata.items() if k not in _DROP_METADATA and isinstance(v, _SCALARS)}


# ---------------------------------------------------------------- the run map


@dataclass(slots=True)
class _Run:
    """What a started LLM or tool run needs kept until it ends."""

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


class CaptureCore:
    """Run map, episode location and record building: everything capture decides, and nothing it does.

    The counterpart of langchain-core's ``_TracerCore``: each ``_start_*`` method remembers a run, and each
    ``_end_*`` / ``_error_*`` method returns the records of that one callback event (``None`` when the run is
    not one this core saw start, or when the event writes nothing). What happens to the records is the
    caller's business (``BaseCaptureHandler._persist``), so this class has no I/O, no threads and no locks.

    An episode is a thread (``thread_id`` in the run's metadata) or, without one, the root run. Its start
    record is held back and rides along with the episode's first finished record (one write per event, not
    two); an episode that starts and ends in the same event is a single record.
    """

    def __init__(self) -> None:
        self._runs: dict[UUID, _Run] = {}
        self._chains: dict[UUID, tuple[str, str, bool]] = {}
        self._seq = itertools.count(1)
        self._unwritten_starts: dict[str, Record] = {}

    # ---------------------------------------------------------------- LLM and chat-model runs

    def _start_llm_run(self, run_id: UUID, parent_run_id: UUID | None, name: str | None,
                       metadata: dict[str, Any] | None, tags: list[str] | None, messages: list[BaseMessage],
                       invocation_params: dict[str, Any] | None) -> None:
        run = self._begin("llm", run_id, parent_run_id, name, metadata, tags)
        run.messages = messages
        run.invocation_params = _jsonable_params(invocation_params)

    def _end_llm_run(self, run_id: UUID, response: LLMResult) -> list[Record] | None:
        run = self._runs.pop(run_id, None)
        if run is None:
            return None
        fields = llm_output_fields(response)
        fields["input_messages"] = list(run.messages or [])  # the writer encodes them (once per message)
        fields["invocation_params"] = params = run.invocation_params
        fields.setdefault("model_name", None)
        if not fields["model_name"] and params:
            fields["model_name"] = params.get("model_name") or params.get("model")
        return self._finish(run_id, run, "ok", None, fields)

    # ---------------------------------------------------------------- tool runs

    def _start_tool_run(self, run_id: UUID, parent_run_id: UUID | None, name: str | None,
                        metadata: dict[str, Any] | None, tags: list[str] | None, args: Any,
                        tool_call_id: str | None) -> None:
        run = self._begin("tool", run_id, parent_run_id, name, metadata, tags)
        run.tool_args = args
        run.tool_call_id = tool_call_id

    def _end_tool_run(self, run_id: UUID, output: Any) -> list[Record] | None:
        run = self._runs.pop(run_id, None)
        if run is None:
            return None
        text, status = tool_result_text(output)
        failed = status == "error"
        return self._finish(run_id, run, "error" if failed else "ok", text if failed else None,
                            _tool_fields(run, text))

    def _error_run(self, run_id: UUID, error: BaseException) -> list[Record] | None:
        """A failed run of any kind: an LLM or tool run's turn, or the end of the episode a chain opened."""
        run = self._runs.pop(run_id, None)
        if run is None:
            return self._end_chain_run(run_id, error)
        if run.kind == "tool":
            fields = _tool_fields(run, None)
        else:
            fields = {"input_messages": list(run.messages or []), "invocation_params": run.invocation_params,
                      "tokens_source": None}
        return self._finish(run_id, run, "error", _describe(error), fields)

    # ---------------------------------------------------------------- chains: structure only

    def _start_chain_run(self, run_id: UUID, parent_run_id: UUID | None, metadata: dict[str, Any] | None,
                         name: str | None, serialized: dict[str, Any] | None) -> None:
        """Chains only place runs in episodes; the name is looked up for the chain that opens one."""
        root, episode, new = self._locate(run_id, parent_run_id, metadata)
        if new:
            self._start_episode(root, episode, name or serialized_name(serialized), metadata,
                                extra_metadata(metadata))
        self._chains[run_id] = (root, episode, new)

    def _end_chain_run(self, run_id: UUID, error: BaseException | None = None) -> list[Record] | None:
        """The episode's end when ``run_id`` is the run that opened it; ``None`` for any other chain."""
        located = self._chains.pop(run_id, None)
        if located is None or not located[2]:
            return None
        root, episode, _ = located
        if error is None:
            return self._batch(episode, [], _episode_end(episode, root, "ok"))
        return self._batch(episode, [], _episode_end(episode, root, _is_interrupt(error), _describe(error)))

    # ---------------------------------------------------------------- run bookkeeping

    def _locate(self, run_id: UUID, parent_run_id: UUID | None,
                metadata: dict[str, Any] | None) -> tuple[str, str, bool]:
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

    def _start_episode(self, root: str, episode: str, name: str | None, metadata: dict[str, Any] | None,
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

    def _begin(self, kind: str, run_id: UUID, parent_run_id: UUID | None, name: str | None,
               metadata: dict[str, Any] | None, tags: list[str] | None) -> _Run:
        root, episode, new = self._locate(run_id, parent_run_id, metadata)
        extra = extra_metadata(metadata)
        if new:
            self._start_episode(root, episode, name, metadata, extra)
        run = _Run(kind=kind, started=time.time(), root=root, episode=episode, parent=parent_run_id, name=name,
                   graph=graph_fields(metadata), metadata=extra, tags=list(tags) if tags else [],
                   closes_episode=new)
        self._runs[run_id] = run
        return run

    def _finish(self, run_id: UUID, run: _Run, status: str, error: str | None, fields: Record) -> list[Record]:
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
        end = _episode_end(run.episode, run.root, status, error) if run.closes_episode else None
        return self._batch(run.episode, [record], end)

    def _batch(self, episode: str, records: list[Record], end: Record | None) -> list[Record]:
        """One callback event's records: the episode's held-back start first (carrying the end when the
        episode also ends in this event), then ``records``, then the end."""
        start = self._unwritten_starts.pop(episode, None)
        if start is not None:
            if end is not None:
                start.update(ended_at=end["ended_at"], status=end["status"], error=end["error"])
                end = None
            records.insert(0, start)
        if end is not None:
            records.append(end)
        return records


def _episode_end(episode: str, root: str, status: str, error: str | None = None) -> Record:
    return {"type": "episode_end", "id": episode, "root_run_id": root, "ended_at": time.time(),
            "status": status, "error": error}


def _tool_fields(run: _Run, result: str | None) -> Record:
    return {"tool_name": run.name, "tool_args": run.tool_args, "tool_call_id": run.tool_call_id,
            "tool_result": result}


def serialized_name(serialized: dict[str, Any] | None) -> str | None:
    """The run's name from LangChain's ``serialized`` dict: its ``name``, else the last part of its ``id``."""
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
