"""The scheduler's decisions, stored in ``schedule_events`` so ``metaclaw status`` can say why it did (not) train.

Only transitions and run events are written, never the routine checks:

============================  ==============================================================================
event                         when
============================  ==============================================================================
``scheduler_started``         a scheduler process started (details: holder, pid, policy, check interval)
``scheduler_stopped``         it stopped cleanly (a crashed one leaves no such row; its lease expires)
``opened``                    a training window opened (reasons: the triggers and guards; details: closes_at)
``closed``                    it closed, or was closed at start-up (reasons: why; details: ``initial``)
``skipped``                   a window was skipped, and why: its triggers hold but a guard keeps it shut
                              (details: ``cause="guard"``, ``blocked_by``), or it is open but another
                              holder has the lease (``cause="lease"``, ``lease_holder``)
``run_started``               a training session started (score, then train)
``run_ended``                 it ended (details: status ok / skipped / stopped / error, reason, steps,
                              checkpoint, train run id, candidate adapter, scoring summary)
``lease_lost``                the lease could not be renewed during a session (the session is stopped)
============================  ==============================================================================

``reasons`` is always a list of human-readable strings; ``details`` is a JSON object.
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from langchain_metaclaw.store.schedule import ScheduleEvent

if TYPE_CHECKING:
    from langchain_metaclaw.store import TraceStore

__all__ = [
    "EVENT_TYPES",
    "jsonable",
    "recent_events",
    "record_event",
]

logger = logging.getLogger(__name__)

EVENT_TYPES = (
    "scheduler_started",
    "scheduler_stopped",
    "opened",
    "closed",
    "skipped",
    "run_started",
    "run_ended",
    "lease_lost",
)


def jsonable(value: Any) -> Any:
    """Plain JSON data: datetimes as ISO strings (UTC), pydantic models dumped, non-finite floats as ``None``."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return jsonable(dump())
    return str(value)


def record_event(
    store: TraceStore,
    event: str,
    reasons: list[str] | tuple[str, ...] | str | None = None,
    details: dict[str, Any] | None = None,
    *,
    at: datetime | None = None,
) -> int | None:
    """Log ``event`` and store it; returns the row id, or ``None`` when the store could not be written.

    A failed write is logged, never raised: the scheduler must keep deciding even when the database
    hiccups (the decision itself is still in the log).
    """
    if isinstance(reasons, str):
        reasons = [reasons]
    reasons = [str(r) for r in (reasons or [])]
    at = (at or datetime.now(UTC)).astimezone(UTC)
    logger.info("madmax %s%s", event, (": " + "; ".join(reasons)) if reasons else "")
    try:
        return store.add_schedule_event(event, reasons, jsonable(details or {}), at=at)
    except Exception:  # noqa: BLE001 - see docstring
        logger.exception("could not store schedule event %r", event)
        return None


def recent_events(
    store: TraceStore,
    limit: int = 20,
    *,
    event: str | list[str] | tuple[str, ...] | None = None,
    since: datetime | None = None,
) -> list[ScheduleEvent]:
    """The last ``limit`` events, newest first; optionally only of the given type(s), or after ``since``."""
    events = None if event is None else [event] if isinstance(event, str) else list(event)
    return store.schedule_events(limit, events=events, since=since.astimezone(UTC) if since else None)
