"""The statements of the ``leases`` table: at most one holder per lease name, across processes and machines.

Portable SQL only (SQLite and PostgreSQL), no advisory locks:

- :meth:`LeaseQueries.acquire_lease` is one conditional
  ``UPDATE ... WHERE name = :name AND (holder = :me OR expires_at <= :now)`` (atomic in both databases:
  PostgreSQL re-checks the ``WHERE`` on the row it waited for, SQLite writes one at a time), then, when no
  row exists, an ``INSERT`` whose primary key makes a concurrent second insert fail; each statement in its
  own transaction.
- :meth:`~LeaseQueries.renew_lease` updates the row only while it is still ours;
  :meth:`~LeaseQueries.release_lease` deletes it only if it is ours.

Times in and out are aware UTC. What a lease *means* (ttl, clocks, the holder's handle) lives in
:mod:`langchain_metaclaw.schedule.lease`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, delete, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from langchain_metaclaw.store.schema import leases

__all__ = ["EngineLeases", "LeaseInfo", "LeaseQueries"]


@dataclass(frozen=True)
class LeaseInfo:
    """A lease row as read from the store."""

    name: str
    holder: str
    expires_at: datetime
    """UTC."""

    def active(self, now: datetime | None = None) -> bool:
        """Whether the lease still holds at ``now`` (default: the system clock; free once ``now >= expires_at``)."""
        return (now or datetime.now(UTC)) < self.expires_at


class LeaseQueries:
    """Mixin of :class:`~langchain_metaclaw.store.TraceStore`: the lease statements on ``self.engine``."""

    engine: Engine

    def acquire_lease(self, name: str, holder: str, *, now: datetime, expires_at: datetime) -> bool:
        """Take lease ``name`` for ``holder`` until ``expires_at`` if it is free, expired at ``now`` or
        already ``holder``'s; ``True`` when it is ours afterwards. Of several racing callers exactly one wins."""
        t = leases
        with self.engine.begin() as conn:
            taken = conn.execute(
                update(t)
                .where(t.c.name == name, or_(t.c.holder == holder, t.c.expires_at <= now))
                .values(holder=holder, expires_at=expires_at)
            ).rowcount
        if taken == 1:
            return True
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(t).values(name=name, holder=holder, expires_at=expires_at))
        except IntegrityError:
            return False  # someone holds it (or inserted it a moment before us)
        return True

    def renew_lease(self, name: str, holder: str, *, expires_at: datetime) -> bool:
        """Move the lease's expiry to ``expires_at`` if ``holder`` still holds it; ``False`` when it was lost."""
        t = leases
        with self.engine.begin() as conn:
            stmt = update(t).where(t.c.name == name, t.c.holder == holder).values(expires_at=expires_at)
            return conn.execute(stmt).rowcount == 1

    def release_lease(self, name: str, holder: str) -> bool:
        """Delete the lease if ``holder`` holds it; ``True`` when a row was deleted."""
        t = leases
        with self.engine.begin() as conn:
            return conn.execute(delete(t).where(t.c.name == name, t.c.holder == holder)).rowcount == 1

    def lease(self, name: str) -> LeaseInfo | None:
        """The lease row for ``name`` (active or expired), or ``None`` when nobody holds it."""
        t = leases
        with self.engine.connect() as conn:
            row = conn.execute(select(t.c.name, t.c.holder, t.c.expires_at).where(t.c.name == name)).first()
        if row is None:
            return None
        return LeaseInfo(name=row.name, holder=row.holder, expires_at=row.expires_at)


class EngineLeases(LeaseQueries):
    """The lease statements on a bare SQLAlchemy engine, for callers that have no ``TraceStore``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
