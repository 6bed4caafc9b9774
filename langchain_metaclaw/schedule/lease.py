"""A lease in the trace store: at most one holder at a time, across processes and machines.

MadMax takes the ``madmax`` lease before it trains and renews it while training; two schedulers on one
store (two processes, or a notebook next to ``metaclaw schedule``) therefore never train at once, and a
holder that crashed stops blocking the others once its lease expires (``ttl`` after its last renewal).

The statements (portable SQL, atomic on SQLite and PostgreSQL) are the store's
(:mod:`langchain_metaclaw.store.leases`); this module adds the ttl, the clock and the holder's handle.

Expiry is judged with the caller's clock (``now``; default the system clock, in UTC): the holders of one
lease must have clocks that agree to well within ``ttl`` (NTP does; a FakeClock in tests travels freely).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from langchain_metaclaw.schedule.clock import Clock, SystemClock
from langchain_metaclaw.store.leases import EngineLeases, LeaseInfo, LeaseQueries

__all__ = ["StoreLease", "acquire", "current", "release", "renew"]


def _queries(store: Any) -> LeaseQueries:
    """A :class:`TraceStore` (its lease statements) or a bare SQLAlchemy engine."""
    return store if isinstance(store, LeaseQueries) else EngineLeases(store)


def _ttl(ttl: float | timedelta) -> timedelta:
    ttl = ttl if isinstance(ttl, timedelta) else timedelta(seconds=float(ttl))
    if ttl <= timedelta(0):
        msg = f"a lease ttl must be positive, got {ttl}"
        raise ValueError(msg)
    return ttl


def _now(now: datetime | None) -> datetime:
    """Aware UTC: every holder of a lease compares times in one zone."""
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None or now.utcoffset() is None:
        msg = "lease times must be timezone-aware"
        raise ValueError(msg)
    return now.astimezone(UTC)


def acquire(store: Any, name: str, holder: str, ttl: float | timedelta, *, now: datetime | None = None) -> bool:
    """Take lease ``name`` for ``holder`` until ``now + ttl``; ``True`` when it is ours afterwards.

    Succeeds when the lease is free, expired, or already held by ``holder`` (then it is extended).
    Atomic: of several callers racing for a free lease, exactly one gets ``True``.
    """
    now = _now(now)
    return _queries(store).acquire_lease(name, holder, now=now, expires_at=now + _ttl(ttl))


def renew(store: Any, name: str, holder: str, ttl: float | timedelta, *, now: datetime | None = None) -> bool:
    """Extend the lease to ``now + ttl`` if ``holder`` still holds it; ``False`` when it was lost.

    A lease that expired but that nobody took since is still ours and is renewed.
    """
    return _queries(store).renew_lease(name, holder, expires_at=_now(now) + _ttl(ttl))


def release(store: Any, name: str, holder: str) -> bool:
    """Give the lease back if ``holder`` holds it; ``True`` when a row was deleted."""
    return _queries(store).release_lease(name, holder)


def current(store: Any, name: str) -> LeaseInfo | None:
    """The lease row for ``name`` (active or expired), or ``None`` when nobody took it or it was released."""
    return _queries(store).lease(name)


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
