"""The window policy: when may MadMax train? A pure function of the time and a few signal values.

Triggers (any subset; ``mode`` says whether **any** or **all** enabled triggers must hold):

- ``idle_minutes``: the user has not touched keyboard or mouse for that long;
- ``sleep_hours``: the local time is inside e.g. ``"23:00-07:00"`` (across midnight, DST-safe);
- ``calendar``: a busy calendar event is in progress; the window closes ``close_before_end_minutes``
  before it ends (back-to-back events count as one block);
- ``load_is_trigger``: serving load is below ``max_requests_per_minute`` (for servers with no user).

Guards (always required, whatever the mode):

- ``max_requests_per_minute``: serving load must be below it (unknown load keeps the window shut);
- ``skip_on_battery``: not on battery power (needs the optional ``psutil``; unknown counts as fine);
- ``min_window_minutes``: a window whose end is known (sleep-hours end, event end) must last at least
  this long to *open*; an open window is not cut short by it.

:meth:`WindowPolicy.evaluate` turns ``(now, WindowSignals)`` into a :class:`WindowDecision` with a
human-readable reason for every trigger and guard. :class:`~langchain_metaclaw.schedule.signals.SystemSignals`
gathers the signals on a real machine; :class:`~langchain_metaclaw.schedule.watchdog.Watchdog` calls both on a
clock and sets a ``threading.Event`` when an open window closes, which the trainer checks between steps.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta, tzinfo
from typing import Literal, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from langchain_metaclaw.errors import ConfigurationError
from langchain_metaclaw.schedule.calendar import (
    Interval,
    merge_intervals,
)
from langchain_metaclaw.schedule.clock import local_timezone, resolve_local

__all__ = [
    "SignalProvider",
    "TriggerResult",
    "WindowDecision",
    "WindowPolicy",
    "WindowSignals",
    "parse_sleep_hours",
]


_SLEEP_RE = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


def parse_sleep_hours(text: str) -> tuple[time, time]:
    """``"23:00-07:00"`` → ``(time(23), time(7))``. The end may be earlier than the start (across
    midnight); equal ends are rejected (use a different trigger for "always")."""
    match = _SLEEP_RE.match(text)
    if match is None:
        msg = f"sleep_hours must look like '23:00-07:00', got {text!r}"
        raise ConfigurationError(msg)
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    if not (h1 < 24 and h2 < 24 and m1 < 60 and m2 < 60):
        msg = f"sleep_hours {text!r} has an impossible time of day"
        raise ConfigurationError(msg)
    start, end = time(h1, m1), time(h2, m2)
    if start == end:
        msg = f"sleep_hours {text!r} starts and ends at the same time"
        raise ConfigurationError(msg)
    return start, end


def _minutes(seconds: float) -> str:
    """``725`` → ``"12 min"``; under a minute → ``"45 s"``."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{int(seconds // 60)} min"


def _num(value: float) -> str:
    return f"{value:g}"


def _at(when: datetime, now: datetime, tz: tzinfo) -> str:
    """Local time of ``when``: ``"07:00"`` on the same local day as ``now``, else with the date."""
    local = when.astimezone(tz)
    if local.date() == now.astimezone(tz).date():
        return local.strftime("%H:%M")
    return local.strftime("%Y-%m-%d %H:%M")


# --------------------------------------------------------------------------------------------------
# Signals (plain values) and decisions
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowSignals:
    """What the policy looks at besides the time. ``None`` means unknown; the ``*_error`` says why."""

    idle_seconds: float | None = None
    idle_error: str | None = None
    busy: Sequence[Interval] | None = None
    """Busy calendar intervals around now (unmerged, any order)."""
    calendar_error: str | None = None
    calendar_warning: str | None = None
    """The calendar is usable but stale (e.g. the last fetch failed); shown with the calendar reason."""
    requests_per_minute: float | None = None
    load_error: str | None = None
    on_battery: bool | None = None
    battery_note: str | None = None


class TriggerResult(BaseModel):
    """How one trigger or guard judged the moment."""

    model_config = ConfigDict(frozen=True)

    role: Literal["trigger", "guard"]
    ok: bool
    """Trigger: it holds. Guard: it allows a window."""
    reason: str
    ends_at: datetime | None = None
    """When this trigger stops holding, if known (sleep-hours end, calendar close)."""


class WindowDecision(BaseModel):
    """The outcome of :meth:`WindowPolicy.evaluate`; plain data, ready to be stored as JSON."""

    model_config = ConfigDict(frozen=True)

    open: bool
    reasons: list[str]
    """Human-readable; the decisive reasons first."""
    closes_at: datetime | None = None
    """When an open window is expected to close, if known (``None``: open-ended, e.g. idle). UTC, like
    every datetime in a decision; the reasons show local times."""
    triggers: dict[str, TriggerResult] = Field(default_factory=dict)
    """Every enabled trigger and guard by name: idle, sleep_hours, calendar, load, battery, min_window."""
    at: datetime | None = None
    mode: Literal["any", "all"] = "any"

    @property
    def summary(self) -> str:
        return f"{'open' if self.open else 'closed'}: " + "; ".join(self.reasons)

    def blocked_by(self) -> tuple[str, ...] | None:
        """The guards that keep the window shut although its triggers hold (``None``: not that case)."""
        if self.open or not self.triggers:
            return None
        triggers = [r.ok for r in self.triggers.values() if r.role == "trigger"]
        held = (all(triggers) if self.mode == "all" else any(triggers)) if triggers else False
        blocking = tuple(sorted(n for n, r in self.triggers.items() if r.role == "guard" and not r.ok))
        return blocking if held and blocking else None


# --------------------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------------------


class WindowPolicy(BaseModel):
    """When training may run. Every trigger is off unless configured; at least one must be on.

    Example::

        policy = WindowPolicy(idle_minutes=10, sleep_hours="23:00-07:00", timezone="Europe/Berlin",
                              calendar=True, max_requests_per_minute=2, min_window_minutes=15)
        decision = policy.evaluate(now, WindowSignals(idle_seconds=720, busy=[...], requests_per_minute=0))
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["any", "all"] = "any"
    """``any``: a window is open while at least one enabled trigger holds; ``all``: while all of them do."""
    timezone: str | None = None
    """IANA zone for sleep hours, all-day events and the times in reasons; ``None``: this machine's zone."""
    idle_minutes: float | None = Field(default=None, gt=0)
    """Idle trigger: no keyboard/mouse input for at least this many minutes."""
    sleep_hours: str | None = None
    """Sleep-hours trigger, ``"HH:MM-HH:MM"`` in ``timezone`` (may cross midnight)."""
    calendar: bool = False
    """Calendar trigger: a busy event is in progress (the signals carry the busy intervals)."""
    close_before_end_minutes: float = Field(default=5, ge=0)
    """The calendar trigger stops this long before the busy block ends."""
    calendar_all_day: bool = True
    """Whether busy all-day events (e.g. "Offsite") count for the calendar trigger."""
    max_requests_per_minute: float | None = Field(default=None, ge=0)
    """Load guard: no window while serving load is at or above this (unknown load: no window)."""
    load_is_trigger: bool = False
    """Also treat low load as a trigger (a server with no user at a keyboard)."""
    min_window_minutes: float = Field(default=0, ge=0)
    """Do not open a window whose known end is closer than this."""
    skip_on_battery: bool = False
    """Battery guard: no window on battery power (needs ``psutil``; unknown state does not block)."""

    @field_validator("sleep_hours")
    @classmethod
    def _check_sleep_hours(cls, value: str | None) -> str | None:
        if value is not None:
            parse_sleep_hours(value)
        return value

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError) as exc:
                msg = f"unknown time zone {value!r} (use an IANA name like 'Europe/Berlin')"
                raise ConfigurationError(msg) from exc
        return value

    @model_validator(mode="after")
    def _check_triggers(self) -> WindowPolicy:
        if self.load_is_trigger and self.max_requests_per_minute is None:
            msg = "load_is_trigger needs max_requests_per_minute"
            raise ConfigurationError(msg)
        if not self.enabled_triggers:
            msg = "enable at least one trigger: idle_minutes, sleep_hours, calendar or load_is_trigger"
            raise ConfigurationError(msg)
        return self

    # -- derived -------------------------------------------------------------------------------------

    @property
    def tz(self) -> tzinfo:
        return ZoneInfo(self.timezone) if self.timezone else local_timezone()

    @property
    def enabled_triggers(self) -> list[str]:
        names = []
        if self.idle_minutes is not None:
            names.append("idle")
        if self.sleep_hours is not None:
            names.append("sleep_hours")
        if self.calendar:
            names.append("calendar")
        if self.load_is_trigger:
            names.append("load")
        return names

    def sleep_intervals(self, start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
        """The sleep-hours intervals that overlap ``[start, end]``, as UTC instants."""
        if self.sleep_hours is None:
            return []
        s, e = parse_sleep_hours(self.sleep_hours)
        tz = self.tz
        day = start.astimezone(tz).date() - timedelta(days=1)
        last = end.astimezone(tz).date()
        out = []
        while day <= last:
            begin = resolve_local(day, s, tz)
            finish = resolve_local(day + timedelta(days=1) if e <= s else day, e, tz)
            if finish > begin and finish > start and begin <= end:
                out.append((begin, finish))
            day += timedelta(days=1)
        return out

    def calendar_blocks(self, busy: Sequence[Interval]) -> list[Interval]:
        """Busy intervals as merged blocks, all-day ones dropped unless ``calendar_all_day``."""
        return merge_intervals(iv for iv in busy if self.calendar_all_day or not iv.all_day)

    # -- the decision --------------------------------------------------------------------------------

    def _idle(self, signals: WindowSignals) -> TriggerResult:
        assert self.idle_minutes is not None
        threshold = _num(self.idle_minutes)
        if signals.idle_seconds is None:
            return TriggerResult(role="trigger", ok=False, reason=signals.idle_error or "idle time unknown")
        seconds = signals.idle_seconds
        if seconds >= self.idle_minutes * 60:
            return TriggerResult(role="trigger", ok=True, reason=f"idle {_minutes(seconds)} >= {threshold}")
        return TriggerResult(role="trigger", ok=False, reason=f"idle {_minutes(seconds)} < {threshold}")

    def _sleep(self, now: datetime) -> TriggerResult:
        assert self.sleep_hours is not None
        tz = self.tz
        for begin, finish in self.sleep_intervals(now, now):
            if begin <= now < finish:
                return TriggerResult(
                    role="trigger",
                    ok=True,
                    ends_at=finish,
                    reason=f"sleep hours end at {_at(finish, now, tz)}",
                )
        upcoming = [b for b, _ in self.sleep_intervals(now, now + timedelta(days=2)) if b > now]
        nxt = f", next start {_at(min(upcoming), now, tz)}" if upcoming else ""
        return TriggerResult(
            role="trigger", ok=False, reason=f"outside sleep hours {self.sleep_hours.replace(' ', '')}{nxt}"
        )

    def _calendar(self, now: datetime, signals: WindowSignals) -> TriggerResult:
        if signals.busy is None:
            reason = f"calendar unavailable: {signals.calendar_error or 'no calendar configured'}"
            return TriggerResult(role="trigger", ok=False, reason=reason)
        tz = self.tz
        stale = f" [calendar stale: {signals.calendar_warning}]" if signals.calendar_warning else ""
        margin = timedelta(minutes=self.close_before_end_minutes)
        blocks = self.calendar_blocks(signals.busy)
        for block in blocks:
            if block.contains(now):
                close = block.end - margin
                ends = _at(block.end, now, tz)
                if now < close:
                    detail = (
                        f" (ends {ends}, {_num(self.close_before_end_minutes)} min margin)" if margin else ""
                    )
                    reason = f"calendar: {block.summary!r} until {_at(close, now, tz)}{detail}{stale}"
                    return TriggerResult(role="trigger", ok=True, ends_at=close, reason=reason)
                reason = (
                    f"calendar: {block.summary!r} ends at {ends}, "
                    f"inside the {_num(self.close_before_end_minutes)} min margin{stale}"
                )
                return TriggerResult(role="trigger", ok=False, reason=reason)
        upcoming = [b for b in blocks if b.start > now]
        nxt = f" (next {upcoming[0].summary!r} at {_at(upcoming[0].start, now, tz)})" if upcoming else ""
        return TriggerResult(role="trigger", ok=False, reason=f"calendar: no busy event now{nxt}{stale}")

    def _load(self, signals: WindowSignals, role: Literal["trigger", "guard"]) -> TriggerResult:
        assert self.max_requests_per_minute is not None
        limit = _num(self.max_requests_per_minute)
        rpm = signals.requests_per_minute
        if rpm is None:
            reason = f"serving load unknown: {signals.load_error or 'no load signal'}"
            return TriggerResult(role=role, ok=False, reason=reason)
        if rpm < self.max_requests_per_minute:
            return TriggerResult(role=role, ok=True, reason=f"load {rpm:.3g} req/min < {limit}")
        return TriggerResult(role=role, ok=False, reason=f"load {rpm:.3g} req/min >= {limit}")

    @staticmethod
    def _battery(signals: WindowSignals) -> TriggerResult:
        if signals.on_battery is True:
            return TriggerResult(role="guard", ok=False, reason="on battery")
        if signals.on_battery is False:
            return TriggerResult(role="guard", ok=True, reason=signals.battery_note or "on AC power")
        note = signals.battery_note or "no battery signal"
        return TriggerResult(role="guard", ok=True, reason=f"battery state unknown ({note})")

    def evaluate(
        self, now: datetime, signals: WindowSignals, *, currently_open: bool = False
    ) -> WindowDecision:
        """Decide whether a training window is open at ``now``. Pure: same inputs, same decision.

        ``currently_open`` is whether a window is open already: ``min_window_minutes`` only stops a window
        from *opening*, it never closes one early.
        """
        if now.tzinfo is None or now.utcoffset() is None:
            msg = f"evaluate needs a timezone-aware datetime, got {now!r}"
            raise ValueError(msg)
        now = now.astimezone(UTC)  # same-zone datetimes compare by wall time; UTC is exact across DST
        results: dict[str, TriggerResult] = {}
        if self.idle_minutes is not None:
            results["idle"] = self._idle(signals)
        if self.sleep_hours is not None:
            results["sleep_hours"] = self._sleep(now)
        if self.calendar:
            results["calendar"] = self._calendar(now, signals)
        if self.load_is_trigger:
            results["load"] = self._load(signals, "trigger")
        triggers = [(name, r) for name, r in results.items() if r.role == "trigger"]

        if self.max_requests_per_minute is not None and not self.load_is_trigger:
            results["load"] = self._load(signals, "guard")
        if self.skip_on_battery:
            results["battery"] = self._battery(signals)

        holding = [r for _, r in triggers if r.ok]
        triggered = bool(holding) if self.mode == "any" else len(holding) == len(triggers)
        closes_at = self._closes_at(triggers, holding) if triggered else None
        if self.min_window_minutes > 0 and triggered and closes_at is not None:
            results["min_window"] = self._min_window(now, closes_at, currently_open)

        guards = [r for r in results.values() if r.role == "guard"]
        is_open = triggered and all(r.ok for r in guards)
        return WindowDecision(
            open=is_open,
            reasons=self._reasons(triggers, guards, triggered=triggered, is_open=is_open),
            closes_at=closes_at if is_open else None,
            triggers=results,
            at=now,
            mode=self.mode,
        )

    def _closes_at(
        self, triggers: list[tuple[str, TriggerResult]], holding: list[TriggerResult]
    ) -> datetime | None:
        """When a triggered window closes: ``any``: the last holding trigger's end (unknown if one is
        open-ended); ``all``: the first known end."""
        if self.mode == "any":
            ends = [r.ends_at for r in holding]
            return max(ends) if holding and all(e is not None for e in ends) else None  # type: ignore[type-var]
        known = [r.ends_at for _, r in triggers if r.ends_at is not None]
        return min(known) if known else None

    def _min_window(self, now: datetime, closes_at: datetime, currently_open: bool) -> TriggerResult:
        if currently_open:
            return TriggerResult(
                role="guard", ok=True, reason="window already open; min_window applies only to opening"
            )
        left = closes_at - now
        if left < timedelta(minutes=self.min_window_minutes):
            return TriggerResult(
                role="guard",
                ok=False,
                reason=(
                    f"window would last {_minutes(left.total_seconds())} (until {_at(closes_at, now, self.tz)})"
                    f" < min_window {_num(self.min_window_minutes)} min"
                ),
            )
        return TriggerResult(
            role="guard",
            ok=True,
            reason=f"window lasts {_minutes(left.total_seconds())} >= {_num(self.min_window_minutes)} min",
        )

    def _reasons(
        self,
        triggers: list[tuple[str, TriggerResult]],
        guards: list[TriggerResult],
        *,
        triggered: bool,
        is_open: bool,
    ) -> list[str]:
        """The decisive reasons first: open: the triggers that hold, then every guard; not triggered:
        the triggers (only the failing ones in ``all`` mode), then failing guards; blocked: the guards."""
        holding = [r.reason for _, r in triggers if r.ok]
        if is_open:
            reasons = holding if self.mode == "any" else [r.reason for _, r in triggers]
            return reasons + [r.reason for r in guards]
        failing_guards = [r.reason for r in guards if not r.ok]
        if not triggered:
            failing = [r.reason for _, r in triggers if not r.ok]
            reasons = failing if self.mode == "all" else [r.reason for _, r in triggers]
            return reasons + failing_guards
        return failing_guards + holding

    # -- planning ------------------------------------------------------------------------------------

    def next_window(
        self, now: datetime, horizon: timedelta = timedelta(days=2), busy: Sequence[Interval] | None = None
    ) -> datetime | None:
        """When the next window is expected to start, from sleep hours and the calendar only.

        Idle time and load cannot be foreseen, so they are left out (in ``all`` mode they may still keep
        the window shut); the guards are left out too. Returns ``now`` when a scheduled window is in
        progress, ``None`` when nothing schedulable starts within ``horizon`` (or neither sleep hours nor
        the calendar is enabled). Windows shorter than ``min_window_minutes`` are skipped.
        """
        now = now.astimezone(UTC)
        schedules: list[list[tuple[datetime, datetime]]] = []
        end = now + horizon
        if self.sleep_hours is not None:
            schedules.append(self.sleep_intervals(now, end))
        if self.calendar:
            margin = timedelta(minutes=self.close_before_end_minutes)
            blocks = self.calendar_blocks(busy or [])
            schedules.append([(b.start, b.end - margin) for b in blocks if b.end - margin > b.start])
        if not schedules:
            return None
        if self.mode == "any":
            combined = _union([iv for schedule in schedules for iv in schedule])
        else:
            combined = schedules[0]
            for schedule in schedules[1:]:
                combined = _intersect(combined, schedule)
        need = timedelta(minutes=self.min_window_minutes)
        for begin, finish in combined:
            if finish <= now:
                continue
            start = max(begin, now)
            if start > end:
                return None
            if finish - start >= need and finish > start:
                return start
        return None


def _union(intervals: list[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    out: list[tuple[datetime, datetime]] = []
    for begin, finish in sorted(intervals):
        if out and begin <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], finish))
        else:
            out.append((begin, finish))
    return out


def _intersect(
    a: list[tuple[datetime, datetime]], b: list[tuple[datetime, datetime]]
) -> list[tuple[datetime, datetime]]:
    out = []
    for a0, a1 in _union(a):
        for b0, b1 in _union(b):
            lo, hi = max(a0, b0), min(a1, b1)
            if lo < hi:
                out.append((lo, hi))
    return _union(out)


class SignalProvider(Protocol):
    """Anything that returns the :class:`WindowSignals` for ``now`` (tests pass a lambda)."""

    def __call__(self, now: datetime) -> WindowSignals: ...
