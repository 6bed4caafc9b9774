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
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import insert, select

from langchain_metaclaw.store.schema import schedule_events

__all__ = [
    "EVENT_TYPES",
    "ScheduleEvent",
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


@dataclass(frozen=True)
class ScheduleEvent:
    """One row of ``schedule_events``."""

    id: int
    at: datetime
    """UTC."""
    event: str
    reasons: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "at": self.at, "event": self.event, "reasons": self.reasons, "details": self.details}

    def __str__(self) -> str:
        why = "; ".join(self.reasons)
        return f"{self.at.isoformat(timespec='seconds')} {self.event}" + (f": {why}" if why else "")


def record_event(
    store: Any,
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
    row = {"at": at, "event": event, "reasons": reasons, "details": jsonable(details or {})}
    logger.info("madmax %s%s", event, (": " + "; ".join(reasons)) if reasons else "")
    engine = getattr(store, "engine", store)
    try:
        with engine.begin() as conn:
            result = conn.execute(insert(schedule_events).values(**row))
            key = result.inserted_primary_key
            return int(key[0]) if key and key[0] is not None else None
    except Exception:  # noqa: BLE001 - see docstring
        logger.exception("could not store schedule event %r", event)
        return None


def _aware(when: datetime) -> datetime:
    return when.astimezone(UTC) if when.tzinfo is not None else when.replace(tzinfo=UTC)


def recent_events(
    store: Any,
    limit: int = 20,
    *,
    event: str | list[str] | tuple[str, ...] | None = None,
    since: datetime | None = None,
) -> list[ScheduleEvent]:
    """The last ``limit`` events, newest first; optionally only of the given type(s), or after ``since``."""
    t = schedule_events
    stmt = select(t).order_by(t.c.at.desc(), t.c.id.desc())
    if event is not None:
        stmt = stmt.where(t.c.event.in_([event] if isinstance(event, str) else list(event)))
    if since is not None:
        stmt = stmt.where(t.c.at >= since.astimezone(UTC))
    if limit is not None:
        stmt = stmt.limit(limit)
    engine = getattr(store, "engine", store)
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return [
        ScheduleEvent(
            id=int(r.id),
            at=_aware(r.at),
            event=r.event,
            reasons=list(r.reasons or []),
            details=dict(r.details or {}),
        )
        for r in rows
    ]
