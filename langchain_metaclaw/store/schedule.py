"""The scheduler's statements: ``schedule_events`` rows, APScheduler's job store and the read of its job table.

What the events mean (and which are written) is :mod:`langchain_metaclaw.schedule.events`; this module
only stores and reads them. Times in and out are aware UTC.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import Column, Engine, Float, MetaData, String, Table, insert, select
from sqlalchemy import inspect as sa_inspect

from langchain_metaclaw.store.schema import schedule_events

__all__ = ["ScheduleEvent", "ScheduleQueries"]


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


@lru_cache(maxsize=1)
def _jobstore_class() -> type:
    """``SQLAlchemyJobStore`` that leaves the shared engine alone on shutdown.

    The stock ``shutdown()`` disposes the engine, which belongs to the trace store (and would erase an
    in-memory SQLite store held by its single ``StaticPool`` connection).
    """
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore

    class SharedEngineJobStore(SQLAlchemyJobStore):
        def shutdown(self) -> None:
            pass

    return SharedEngineJobStore


class ScheduleQueries:
    """Mixin of :class:`~langchain_metaclaw.store.TraceStore`: the scheduler's statements on ``self.engine``."""

    engine: Engine

    def add_schedule_event(
        self, event: str, reasons: list[str], details: dict[str, Any], *, at: datetime
    ) -> int | None:
        """Insert one event (``details`` already plain JSON); returns its row id."""
        with self.engine.begin() as conn:
            result = conn.execute(
                insert(schedule_events).values(at=at, event=event, reasons=reasons, details=details)
            )
            key = result.inserted_primary_key
        return int(key[0]) if key and key[0] is not None else None

    def schedule_events(
        self, limit: int | None = 20, *, events: list[str] | None = None, since: datetime | None = None
    ) -> list[ScheduleEvent]:
        """The last ``limit`` events, newest first; only those of type ``events`` / at or after ``since``."""
        t = schedule_events
        stmt = select(t).order_by(t.c.at.desc(), t.c.id.desc())
        if events is not None:
            stmt = stmt.where(t.c.event.in_(events))
        if since is not None:
            stmt = stmt.where(t.c.at >= since)
        if limit is not None:
            stmt = stmt.limit(limit)
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).all()
        return [
            ScheduleEvent(id=int(r.id), at=r.at, event=r.event, reasons=list(r.reasons or []),
                          details=dict(r.details or {}))
            for r in rows
        ]

    def scheduler_jobstore(self, table: str) -> Any:
        """An APScheduler ``SQLAlchemyJobStore`` on this store's engine, keeping its jobs in ``table``
        (APScheduler issues its own statements there; shutting it down leaves the engine open)."""
        return _jobstore_class()(engine=self.engine, tablename=table)

    def scheduler_jobs(self, table: str) -> list[dict[str, Any]]:
        """The rows of APScheduler's job table ``table`` (``id``, ``next_run_time`` as aware UTC or ``None``),
        by id; ``[]`` before a scheduler first created it. Only the two columns APScheduler 3 keeps in clear
        are read (the job state is a pickle that only APScheduler should load)."""
        with self.engine.connect() as conn:
            if not sa_inspect(conn).has_table(table):
                return []
            t = Table(table, MetaData(), Column("id", String(191)), Column("next_run_time", Float(25)))
            rows = conn.execute(select(t.c.id, t.c.next_run_time).order_by(t.c.id)).all()
        return [
            {"id": r.id,
             "next_run_time": datetime.fromtimestamp(r.next_run_time, UTC) if r.next_run_time is not None else None}
            for r in rows
        ]
