"""Clocks: the only place the scheduler reads the time, so tests can travel in it.

Everything in :mod:`langchain_metaclaw.schedule` takes a :class:`Clock` (or a ``now`` argument) instead of
calling :func:`datetime.now`; production code uses :class:`SystemClock`, tests use :class:`FakeClock`.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, date, datetime, timedelta, tzinfo
from datetime import time as dtime
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "FakeClock", "SystemClock", "local_timezone", "resolve_local"]


@runtime_checkable
class Clock(Protocol):
    """Wall time (timezone-aware) and a monotonic counter in seconds."""

    def now(self) -> datetime:
        """The current wall time, always timezone-aware."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin that never go backwards (for intervals and timeouts)."""
        ...


def local_timezone() -> tzinfo:
    """The machine's IANA time zone as a ``ZoneInfo`` (DST-aware), falling back to UTC.

    ``datetime.now().astimezone().tzinfo`` is a fixed offset and would be wrong across a DST change, so
    this asks ``tzlocal`` (installed with APScheduler 3.x) and then ``TZ`` / ``/etc/localtime``.
    """
    try:
        import tzlocal  # light; a dependency of apscheduler 3.x

        zone = tzlocal.get_localzone()
        if zone is not None:
            return zone
    except Exception:  # noqa: BLE001 - any failure falls through to the manual lookup
        pass
    import os
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    name = os.environ.get("TZ", "").lstrip(":")
    if not name:
        try:
            target = os.path.realpath("/etc/localtime")
            if "zoneinfo/" in target:
                name = target.split("zoneinfo/", 1)[1]
        except OSError:
            name = ""
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    return UTC


def resolve_local(day: date, at: dtime, tz: tzinfo) -> datetime:
    """The first instant at which the wall clock in ``tz`` reads ``day`` ``at`` or later, in UTC; DST-safe.

    - an ordinary wall time maps to its one instant;
    - a wall time that happens twice (clocks fall back) maps to its first occurrence (``fold=0``);
    - a wall time that never happens (skipped when clocks spring forward, e.g. 02:30 in Berlin on the
      last Sunday of March) maps to the moment of the jump (03:00 CEST), the first instant whose wall
      time is past it. So "sleep hours end at 02:30" ends at the jump, never an hour late.

    The result is in UTC on purpose: an ambiguous local datetime compares unequal to every datetime in
    another zone (PEP 495), and two datetimes sharing a zone subtract by wall time.
    """
    naive = datetime.combine(day, at.replace(tzinfo=None, fold=0))
    first = naive.replace(tzinfo=tz)
    round_trip = first.astimezone(UTC).astimezone(tz)
    if round_trip.replace(tzinfo=None) == naive:
        return first.astimezone(UTC)
    # In a gap: fold=1 lands before it, fold=0 after it; bisect for the jump (whole seconds).
    lo = int(naive.replace(tzinfo=tz, fold=1).astimezone(UTC).timestamp())
    hi = int(first.astimezone(UTC).timestamp())
    if lo > hi:
        lo, hi = hi, lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, tz).replace(tzinfo=None) >= naive:
            hi = mid
        else:
            lo = mid
    return datetime.fromtimestamp(hi, UTC)


class SystemClock:
    """The real clock: ``now()`` in ``tz`` (default UTC), ``monotonic()`` from :func:`time.monotonic`."""

    def __init__(self, tz: tzinfo | None = None) -> None:
        self.tz = tz or UTC

    def now(self) -> datetime:
        return datetime.now(self.tz)

    def monotonic(self) -> float:
        return time.monotonic()

    def __repr__(self) -> str:
        return f"SystemClock(tz={self.tz!r})"


class FakeClock:
    """A clock that moves only when told to. Thread-safe.

    Example::

        clock = FakeClock(datetime(2025, 3, 30, 6, 59, tzinfo=ZoneInfo("Europe/Berlin")))
        clock.advance(minutes=2)   # wall time and monotonic both move 120 s
        clock.set(later)           # jump the wall clock; monotonic moves only forward

    ``now()`` returns UTC like :class:`SystemClock`, or ``tz`` when passed (handy for reading tests, but
    mind that Python subtracts two datetimes of one zone by wall time, which is wrong across DST).
    """

    def __init__(self, start: datetime, *, monotonic_start: float = 1000.0, tz: tzinfo | None = None) -> None:
        if start.tzinfo is None or start.utcoffset() is None:
            msg = "FakeClock needs a timezone-aware start datetime"
            raise ValueError(msg)
        self._lock = threading.Lock()
        self.tz = tz or UTC
        self._now = start.astimezone(UTC)
        self._monotonic = float(monotonic_start)

    def now(self) -> datetime:
        with self._lock:
            return self._now.astimezone(self.tz)

    def monotonic(self) -> float:
        with self._lock:
            return self._monotonic

    def advance(self, delta: timedelta | float | None = None, /, **kwargs: float) -> datetime:
        """Move forward by ``delta`` (a timedelta or seconds) or by ``timedelta(**kwargs)``; return now()."""
        if delta is None:
            delta = timedelta(**kwargs)
        elif not isinstance(delta, timedelta):
            delta = timedelta(seconds=float(delta))
        if delta < timedelta(0):
            msg = f"FakeClock.advance cannot go backwards ({delta}); use set() to jump the wall clock"
            raise ValueError(msg)
        with self._lock:
            self._now += delta
            self._monotonic += delta.total_seconds()
            return self._now.astimezone(self.tz)

    def set(self, when: datetime) -> datetime:
        """Jump the wall clock to ``when``; monotonic time advances by the same amount only if it is later."""
        if when.tzinfo is None or when.utcoffset() is None:
            msg = "FakeClock.set needs a timezone-aware datetime"
            raise ValueError(msg)
        with self._lock:
            when_utc = when.astimezone(UTC)
            step = (when_utc - self._now).total_seconds()
            if step > 0:
                self._monotonic += step
            self._now = when_utc
            return self._now.astimezone(self.tz)

    def sleep(self, seconds: float) -> None:
        """A ``time.sleep`` stand-in that advances the clock instead of waiting."""
        self.advance(seconds)

    def __repr__(self) -> str:
        return f"FakeClock({self.now().isoformat()})"
