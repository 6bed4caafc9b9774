"""BaseCaptureHandler: LangChain's callback hooks on top of :class:`~langchain_metaclaw.capture._core.CaptureCore`.

The shape of langchain-core's ``BaseTracer``: the hooks feed the pure core, and every callback event's records
go to one seam, :meth:`BaseCaptureHandler._persist`, which is all a subclass writes.
:class:`~langchain_metaclaw.capture.handler.MetaClawCallbackHandler` persists to the trace store through a
spooling writer; :class:`~langchain_metaclaw.capture.collector.TurnCollector` keeps the records in a list.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, TypeVar
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import BaseMessage, HumanMessage
from langchain_core.outputs import LLMResult

from langchain_metaclaw.capture._core import CaptureCore, Record, serialized_name

logger = logging.getLogger(__name__)

_Hook = TypeVar("_Hook", bound=Callable[..., None])


def _guard(fn: _Hook) -> _Hook:
    """Run a hook; log and swallow anything it raises (the agent must never fail because of capture)."""

    def wrapper(self: BaseCaptureHandler, *args: Any, **kwargs: Any) -> None:
        try:
            fn(self, *args, **kwargs)
        except Exception:
            self._hook_errors += 1
            if self._hook_errors == 1:
                logger.exception("metaclaw capture hook %s failed (further failures only counted)", fn.__name__)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper  # type: ignore[return-value]


class BaseCaptureHandler(CaptureCore, BaseCallbackHandler, ABC):
    """Record every LLM and tool turn of a LangChain / LangGraph run; subclasses say where records go.

    It runs inline on the agent's thread (``run_inline``: no executor hop for async agents) and never raises
    into the agent (``raise_error = False`` and every hook guarded).
    """

    raise_error: bool = False
    run_inline: bool = True

    def __init__(self) -> None:
        super().__init__()
        self._hook_errors = 0

    @abstractmethod
    def _persist(self, records: list[Record]) -> None:
        """Take one callback event's records (the seam ``BaseTracer._persist_run`` is). Runs on the agent's
        thread: it must be fast and must not wait on I/O."""

    # ---------------------------------------------------------------- chains: which episode a run is in

    @_guard
    def on_chain_start(self, serialized: dict[str, Any] | None, inputs: Any, *, run_id: UUID,
                       parent_run_id: UUID | None = None, metadata: dict[str, Any] | None = None,
                       **kwargs: Any) -> None:
        self._start_chain_run(run_id, parent_run_id, metadata, kwargs.get("name"), serialized)

    @_guard
    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        if records := self._end_chain_run(run_id):
            self._persist(records)

    # ---------------------------------------------------------------- chat models and LLMs

    @_guard
    def on_chat_model_start(self, serialized: dict[str, Any] | None, messages: list[list[BaseMessage]], *,
                            run_id: UUID, parent_run_id: UUID | None = None, tags: list[str] | None = None,
                            metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        name = kwargs.get("name") or (serialized or {}).get("name") or serialized_name(serialized)
        self._start_llm_run(run_id, parent_run_id, name, metadata, tags, messages[0] if messages else [],
                            kwargs.get("invocation_params"))

    @_guard
    def on_llm_start(self, serialized: dict[str, Any] | None, prompts: list[str], *, run_id: UUID,
                     parent_run_id: UUID | None = None, tags: list[str] | None = None,
                     metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        name = kwargs.get("name") or serialized_name(serialized)
        self._start_llm_run(run_id, parent_run_id, name, metadata, tags,
                            [HumanMessage(content=p) for p in prompts[:1]], kwargs.get("invocation_params"))

    @_guard
    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        if records := self._end_llm_run(run_id, response):
            self._persist(records)

    # ---------------------------------------------------------------- tools

    @_guard
    def on_tool_start(self, serialized: dict[str, Any] | None, input_str: str, *, run_id: UUID,
                      parent_run_id: UUID | None = None, tags: list[str] | None = None,
                      metadata: dict[str, Any] | None = None, inputs: dict[str, Any] | None = None,
                      **kwargs: Any) -> None:
        name = kwargs.get("name") or (serialized or {}).get("name")
        self._start_tool_run(run_id, parent_run_id, name, metadata, tags,
                             inputs if inputs is not None else input_str, kwargs.get("tool_call_id"))

    @_guard
    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        if records := self._end_tool_run(run_id, output):
            self._persist(records)

    # ---------------------------------------------------------------- failures of any kind

    @_guard
    def _on_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """A failed LLM, tool or chain run: the core knows which kind ``run_id`` is."""
        if records := self._error_run(run_id, error):
            self._persist(records)

    on_llm_error = on_tool_error = on_chain_error = _on_error
