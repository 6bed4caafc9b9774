"""A lease in the trace store: at most one holder at a time, across processes and machines.

MadMax takes the ``madmax`` lease before it trains and renews it while training; two schedulers on one
store (two processes, or a notebook next to ``metaclaw schedule``) therefore never train at once, and a
holder that crashed stops blocking the others once its lease expires (``ttl`` after its last renewal).

Portable SQL only (SQLite and PostgreSQL), no advisory locks:

- :func:`acquire` is one conditional ``UPDATE ... WHERE name = :name AND (holder = :me OR expires_at <= :now)``
  (atomic in both databases: PostgreSQL re-checks the ``WHERE`` on the row it waited for, SQLite writes one
  at a time), then, when no row exists, an ``INSERT`` whose primary key makes a concurrent second insert
  fail; each statement in its own transaction.
- :func:`renew` updates the row only while it is still ours; :func:`release` deletes it only if it is ours.

Expiry is judged with the caller's clock (``now``; default the system clock, in UTC): the holders of one
lease must have clocks that agree to well within ``ttl`` (NTP does; a FakeClock in tests travels freely).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from langchain_metaclaw.schedule.clock import Clock, SystemClock
from langchain_metaclaw.store.schema import leases

__all__ = ["Lease", "LeaseInfo", "StoreLease", "acquire", "current", "release", "renew"]

logger = logging.getLogger(__name__)


def _engine(store: Any) -> Engine:
    """A :class:`TraceStore` or a bare SQLAlchemy engine."""
    return getattr(store, "engine", store)


def _ttl(ttl: float | timedelta) -> timedelta:
    ttl = ttl if isinstance(ttl, timedelta) else timedelta(seconds=float(ttl))
    if ttl <= timedelta(0):
        msg = f"a lease ttl must be positive, got {ttl}"
        raise ValueError(msg)
    return ttl


def _now(now: datetime | None) -> datetime:
    """Aware UTC (SQLite stores the naive UTC wall time; both sides of a comparison must agree)."""
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None or now.utcoffset() is None:
        msg = "lease times must be timezone-aware"
        raise ValueError(msg)
    return now.astimezone(UTC)


def _bind(when: datetime, engine: Engine) -> datetime:
    # SQLite's DateTime drops the zone; hand it the UTC wall time so that string comparison is time order.
    return when.replace(tzinfo=None) if engine.dialect.name == "sqlite" else when


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@dataclass(frozen=True)
class LeaseInfo:
    """A lease row as read from the store."""

    name: str
    holder: str
    expires_at: datetime
    """UTC."""

    def active(self, now: datetime | None = None) -> bool:
        """Whether the lease still holds at ``now`` (it is free once ``now >= expires_at``)."""
        return _now(now) < self.expires_at


def acquire(store: Any, name: str, holder: str, ttl: float | timedelta, *, now: datetime | None = None) -> bool:
    """Take lease ``name`` for ``holder`` until ``now + ttl``; ``True`` when it is ours afterwards.

    Succeeds when the lease is free, expired, or already held by ``holder`` (then it is extended).
    Atomic: of several callers racing for a free lease, exactly one gets ``True``.
    """
    engine = _engine(store)
    now = _now(now)
    expires = now + _ttl(ttl)
    t = leases
    with engine.begin() as conn:
        taken = conn.execute(
            update(t)
            .where(t.c.name == name, or_(t.c.holder == holder, t.c.expires_at <= _bind(now, engine)))
            .values(holder=holder, expires_at=_bind(expires, engine))
        ).rowcount
    if taken == 1:
        return True
    try:
        with engine.begin() as conn:
            conn.execute(insert(t).values(name=name, holder=holder, expires_at=_bind(expires, engine)))
    except IntegrityError:
        return False  # someone holds it (or inserted it a moment before us)
    return True


def renew(store: Any, name: str, holder: str, ttl: float | timedelta, *, now: datetime | None = None) -> bool:
    """Extend the lease to ``now + ttl`` if ``holder`` still holds it; ``False`` when it was lost.

    A lease that expired but that nobody took since is still ours and is renewed.
    """
    engine = _engine(store)
    expires = _now(now) + _ttl(ttl)
    t = leases
    with engine.begin() as conn:
        return (
            conn.execute(
                update(t).where(t.c.name == name, t.c.holder == holder).values(expires_at=_bind(expires, engine))
            ).rowcount
            == 1
        )


def release(store: Any, name: str, holder: str) -> bool:
    """Give the lease back if ``holder`` holds it; ``True`` when a row was deleted."""
    t = leases
    with _engine(store).begin() as conn:
        return conn.execute(delete(t).where(t.c.name == name, t.c.holder == holder)).rowcount == 1


def current(store: Any, name: str) -> LeaseInfo | None:
    """The lease row for ``name`` (active or expired), or ``None`` when nobody took it or it was released."""
    t = leases
    with _engine(store).connect() as conn:
        row = conn.execute(select(t.c.name, t.c.holder, t.c.expires_at).where(t.c.name == name)).first()
    if row is None:
        return None
    return LeaseInfo(name=row.name, holder=row.holder, expires_at=_aware(row.expires_at).astimezone(UTC))


class StoreLease:
    """One holder's handle on lease ``name``, on a clock (so tests can make it expire by time travel).

    Example::

        lease = StoreLease(store, "madmax", holder="host:1234", ttl=10, clock=clock)
        if lease.acquire():
            try:
                ...            # call lease.renew() more often than every ttl seconds
            finally:
                lease.release()
    """

    def __init__(
        self, store: Any, name: str, holder: str, ttl: float | timedelta, *, clock: Clock | None = None
    ) -> None:
        self.store = store
        self.name = name
        self.holder = holder
        self.ttl = _ttl(ttl)
        self.clock = clock or SystemClock()

    def acquire(self) -> bool:
        return acquire(self.store, self.name, self.holder, self.ttl, now=self.clock.now())

    def renew(self) -> bool:
        return renew(self.store, self.name, self.holder, self.ttl, now=self.clock.now())

    def release(self) -> bool:
        return release(self.store, self.name, self.holder)

    def current(self) -> LeaseInfo | None:
        return current(self.store, self.name)

    def held(self) -> bool:
        """Whether this holder holds an unexpired lease right now."""
        info = self.current()
        return info is not None and info.holder == self.holder and info.active(self.clock.now())

    def __repr__(self) -> str:
        return f"StoreLease({self.name!r}, holder={self.holder!r}, ttl={self.ttl.total_seconds():g}s)"


Lease = StoreLease
"""Alias."""
