"""The background half of capture: spool on the caller's thread, batch into the store on one thread.

``submit`` is what the callback handler calls on the agent's thread: it serialises and redacts the record,
appends it to the spool (durable against SIGKILL), and puts it on a queue. A single daemon thread drains
the queue in batches, hands each batch's JSON text to ``TraceStore.write_records_json`` (on SQLite the
database parses it, so this thread takes almost no GIL time from the agent) and then lets the spool forget
what was committed.
A dead database or a full disk never raises into the agent: failures are counted in :attr:`stats`,
logged once per kind, and retried with backoff; what the spool holds survives a restart either way.
"""

from __future__ import annotations

import atexit
import functools
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import orjson
from langchain_core.messages import BaseMessage
from pydantic import BaseModel

from langchain_metaclaw.capture._core import message_to_record, with_message_dicts
from langchain_metaclaw.capture.redact import may_hold_secret, redact_text
from langchain_metaclaw.store.spool import Spool
from langchain_metaclaw.store.trace_store import TraceStore

logger = logging.getLogger(__name__)

_STOP = object()


class CaptureStats(BaseModel):
    """What capture did so far; anything non-zero besides ``submitted``/``written`` deserves a look."""

    submitted: int = 0
    written: int = 0
    pending: int = 0
    write_errors: int = 0
    """Batches the store refused (they are retried; the spool keeps them meanwhile)."""
    spool_errors: int = 0
    """Records that could not be appended to the spool (disk full): kept in memory only."""
    serialize_errors: int = 0
    """Records that could not be serialised and were dropped (reported, never raised)."""
    last_error: str | None = None


_COUNTERS = ("submitted", "written", "write_errors", "spool_errors", "serialize_errors")


def _default(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    return str(obj)


def _dumps(value: Any) -> str:
    """JSON text of ``value`` (orjson: ~10x faster than json on the agent's thread)."""
    try:
        return orjson.dumps(value, default=_default).decode()
    except TypeError:  # a dict with non-string keys (rare; the option doubles the cost of every call)
        return orjson.dumps(value, default=_default, option=orjson.OPT_NON_STR_KEYS).decode()


_GENERATED = {
    "turn": frozenset(
        {"type", "id", "seq", "parent_run_id", "root_run_id", "kind", "step", "started_at", "ended_at",
         "latency_ms", "status", "created_at", "tokens_source", "usage", "prompt_token_ids",
         "completion_token_ids", "logprobs"}
    ),
    "episode_start": frozenset({"type", "root_run_id", "started_at", "ended_at", "status"}),
    "episode_end": frozenset({"type", "root_run_id", "ended_at", "status"}),
}
"""Fields whose values capture generates itself (run uuids, clocks, counters, token ids): never free text,
so the field-by-field pass (:func:`_redacted`, for records where the one-pass scan found a marker) skips
them. Every other field (messages, tool args and results, errors, metadata, thread ids) is scanned."""

_CACHED_TEXT = 8192


@functools.lru_cache(maxsize=4096)
def _redact_cached(text: str) -> str:
    return redact_text(text)


def _redact(text: str) -> str:
    """``redact_text`` with a cache: a conversation resends its history (system prompt, earlier turns) on
    every call, so most of what capture sees was already scanned."""
    return _redact_cached(text) if len(text) <= _CACHED_TEXT else redact_text(text)


def _redacted(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with every free-text field redacted; containers become pre-serialised JSON fragments
    (their JSON text is what gets scanned, so key=value secrets inside dicts are caught too)."""
    generated = _GENERATED.get(record.get("type"), frozenset())
    root = record.get("root_run_id")  # an episode without a thread id is named after its root run
    out = dict(record)
    for key in record.keys() - generated:
        value = record[key]
        if value is None or value is root or isinstance(value, _NUMBERS):
            continue
        if isinstance(value, str):
            out[key] = _redact(value)
        else:  # input messages never get here: _encode splices them in through the cache
            out[key] = orjson.Fragment(_redact(_dumps(value)))
    return out


_message_texts: dict[int, tuple[weakref.ref[BaseMessage], dict[str, Any], str]] = {}
"""Input message object id -> (a weak reference to it, a copy of its fields when encoded, its redacted JSON
text). The reference's callback drops the entry when the message is freed, before its id can be reused."""


def _messages_json(messages: list[Any]) -> str:
    """JSON text of a list of input messages, each redacted, and remembered for as long as its object lives.

    An agent resends its whole history on every call, as the same message objects, so without this
    every call would convert, serialise and look up every earlier message again: ~1 us each, against
    ~0.15 us for a remembered one. A text is reused while the object's field values are the same
    objects (or equal ones): a field set anew is seen, a dict or list changed in place is not. So a
    message whose content is a list (multimodal parts) is never remembered; an in-place edit of a
    remembered message's ``additional_kwargs`` or ``tool_calls`` would go unseen. Dicts (what a user's
    ``redact=`` hook returns) are encoded each time.
    """
    texts = _message_texts
    parts = []
    for message in messages:
        key = id(message)
        known = texts.get(key)  # an entry's message is alive, so it is this one: no isinstance needed
        if known is not None and known[1] == message.__dict__:
            parts.append(known[2])
            continue
        if not isinstance(message, BaseMessage):
            parts.append(_redact(_dumps(message)))
            continue
        text = _redact(_dumps(message_to_record(message)))
        if isinstance(message.content, str) and len(text) <= _CACHED_TEXT:
            ref = weakref.ref(message, lambda _, key=key: texts.pop(key, None))
            texts[key] = (ref, dict(message.__dict__), text)
        parts.append(text)
    return f"[{','.join(parts)}]"


_NUMBERS = (int, float)
_TOKEN_FIELDS = ("prompt_token_ids", "completion_token_ids", "logprobs")


def _encode(record: dict[str, Any]) -> str:
    """JSON text of ``record``, redacted.

    One pass over the record finds no credential marker in nearly every record, which is then written
    as is; only a record with a marker goes field by field through :func:`_redacted`. Two kinds of bulky
    field stay out of that pass and are spliced into the text after it: the input messages, which a
    conversation resends on every call, are encoded and scanned once per message object
    (:func:`_messages_json`); token ids and logprobs (thousands of numbers) are never scanned.
    """
    spliced = [key for key in _SPLICED if record.get(key) is not None]
    if spliced:
        record = dict(record)
        values = [record.pop(key) for key in spliced]
    text = _dumps(record)
    if may_hold_secret(text):
        text = _dumps(_redacted(record))
    if not spliced:
        return text
    items = []
    for key, value in zip(spliced, values, strict=True):
        if key in _TOKEN_FIELDS:
            json = _dumps(value)
        elif isinstance(value, list):  # input messages
            json = _messages_json(value)
        else:
            json = _redact(_dumps(value))
        items.append(f'"{key}":{json}')
    return f"{text[:-1]}{',' if len(text) > 2 else ''}{','.join(items)}}}"


_SPLICED = ("input_messages", *_TOKEN_FIELDS)


class SpoolingWriter:
    """Spool + queue + one writer thread feeding a :class:`TraceStore`."""

    def __init__(
        self,
        store: TraceStore,
        *,
        batch_size: int = 256,
        max_delay: float = 0.05,
        redact: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.store = store
        self.batch_size = batch_size
        self.max_delay = max_delay
        self.redact = redact
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._spool: Spool | None = None
        self._spool_failed = False
        self._stats: dict[str, Any] = {**dict.fromkeys(_COUNTERS, 0), "last_error": None}  # cheap on the hot path
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._outstanding = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        self._logged: set[str] = set()
        _live_writers.add(self)

    # ---------------------------------------------------------------- caller side (agent thread)

    def submit(self, records: list[dict[str, Any]]) -> None:
        """Make ``records`` (those of one callback event) durable with one write and queue them. Never raises."""
        try:
            if self.redact is not None:
                records = [self.redact(with_message_dicts(r)) for r in records]
            line = f"[{','.join(_encode(r) for r in records)}]"
        except Exception as exc:  # a user hook or an exotic payload: count it, never break the agent
            self._note_error("serialize", exc)
            with self._lock:
                self._stats["serialize_errors"] += len(records)
            return
        segment = self._append_to_spool(line)
        with self._lock:
            if self._closed:
                return
            self._outstanding += 1
            self._stats["submitted"] += len(records)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="metaclaw-capture-writer", daemon=True)
                self._thread.start()
        self._queue.put((segment, line, len(records)))

    def _append_to_spool(self, line: str) -> int | None:
        try:
            if self._spool is None:
                with self._lock:
                    if self._spool is None:
                        self._spool = Spool(self.store.spool_dir)
            return self._spool.append((line + "\n").encode())
        except OSError as exc:
            self._note_error("spool", exc)
            with self._lock:
                self._stats["spool_errors"] += 1
            return None

    # ---------------------------------------------------------------- writer thread

    def _run(self) -> None:
        backoff = 0.1
        batch: list[tuple[int | None, str, int]] = []
        stopping = False
        while True:
            if not batch:
                item = self._queue.get()
                if item is _STOP:
                    return
                batch.append(item)
                # Sleep, then drain: one wake-up per batch. Waiting in get() would wake this thread for every
                # record, and each wake-up makes the agent's thread win the GIL back (measured: +40 us a call).
                if self._queue.qsize() < self.batch_size - 1:
                    time.sleep(self.max_delay)
                while len(batch) < self.batch_size:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stopping = True
                        break
                    batch.append(item)
            try:
                self.store.write_records_json(f"[{','.join(line[1:-1] for _, line, n in batch if n)}]")
            except Exception as exc:
                self._note_error("store", exc)
                with self._lock:
                    self._stats["write_errors"] += 1
                if stopping or self._closed:
                    return  # the spool keeps the batch; the next open replays it
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            if self._spool is not None:
                self._spool.committed([seg for seg, _, _ in batch if seg is not None])
            with self._lock:
                self._stats["written"] += sum(n for _, _, n in batch)
                self._outstanding -= len(batch)
                if self._outstanding == 0:
                    self._idle.notify_all()
            batch = []
            if stopping:
                return

    def _note_error(self, kind: str, exc: BaseException) -> None:
        self._stats["last_error"] = f"{kind}: {type(exc).__name__}: {exc}"
        key = f"{kind}:{type(exc).__name__}"
        if key not in self._logged:  # once per kind, like LangChainTracer's log_error_once
            self._logged.add(key)
            logger.error("metaclaw capture %s error (further ones counted, not logged): %s", kind, exc)

    # ---------------------------------------------------------------- control

    @property
    def stats(self) -> CaptureStats:
        with self._lock:
            return CaptureStats(**self._stats, pending=self._outstanding)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until everything submitted so far is in the store; ``False`` on timeout."""
        with self._lock:
            return self._idle.wait_for(lambda: self._outstanding == 0, timeout)

    def close(self, timeout: float | None = 10.0) -> bool:
        """Flush, stop the thread and release the spool. Idempotent."""
        flushed = self.flush(timeout)
        with self._lock:
            if self._closed:
                return flushed
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(_STOP)
            thread.join(timeout)
        if self._spool is not None:
            self._spool.close()
        _live_writers.discard(self)
        return flushed


_live_writers: weakref.WeakSet[SpoolingWriter] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    for writer in list(_live_writers):
        writer.close(timeout=5.0)
