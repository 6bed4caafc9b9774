"""MetaClawCallbackHandler: record every LLM and tool turn of a LangChain / LangGraph agent.

Attach it per call (``config={"callbacks": [handler]}``), on a model (``callbacks=[handler]``), or
globally with :func:`enable_global_capture`. The hooks and the bookkeeping are
:class:`~langchain_metaclaw.capture.base.BaseCaptureHandler`'s (a few microseconds on the agent's thread);
this class only persists: it hands each callback event's records to a
:class:`~langchain_metaclaw.capture.writer.SpoolingWriter` and never waits on the database.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from langchain_core.tracers.context import register_configure_hook

from langchain_metaclaw.capture._core import Record
from langchain_metaclaw.capture.base import BaseCaptureHandler
from langchain_metaclaw.capture.writer import CaptureStats, SpoolingWriter
from langchain_metaclaw.store.trace_store import TraceStore


class MetaClawCallbackHandler(BaseCaptureHandler):
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

    def __init__(
        self,
        store: TraceStore | str | None = None,
        *,
        redact: Callable[[Record], Record] | None = None,
        batch_size: int = 256,
        max_delay: float = 0.05,
    ) -> None:
        super().__init__()
        self.store = store if isinstance(store, TraceStore) else TraceStore(store)
        self._writer = SpoolingWriter(self.store, batch_size=batch_size, max_delay=max_delay, redact=redact)

    def _persist(self, records: list[Record]) -> None:
        """One spool write for the event's records (redacted, durable against SIGKILL), then the queue."""
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
