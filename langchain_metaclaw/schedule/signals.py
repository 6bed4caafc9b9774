"""The machine signals a :class:`~langchain_metaclaw.schedule.windows.WindowPolicy` looks at, read on this machine.

:class:`SystemSignals` reads keyboard idle time (the per-OS detectors of :mod:`~langchain_metaclaw.schedule.idle`),
the calendar (:mod:`~langchain_metaclaw.schedule.calendar`), serving load and the battery, and turns every
failure into a reason in :class:`~langchain_metaclaw.schedule.windows.WindowSignals`, never a crash. The
policy itself stays a pure function of those values.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from langchain_metaclaw.schedule.calendar import CalendarSource, CalendarUnavailable, Interval
from langchain_metaclaw.schedule.idle import (
    DetectionResult,
    IdleDetector,
    detect_idle_detector,
    format_detection_report,
)
from langchain_metaclaw.schedule.idle_os import IdleUnavailable
from langchain_metaclaw.schedule.windows import SignalProvider, WindowPolicy, WindowSignals

__all__ = ["SystemSignals", "battery_status", "signal_provider"]

logger = logging.getLogger("langchain_metaclaw.schedule.windows")  # the window log, as before the split


def signal_provider(policy: WindowPolicy, signals: SignalProvider | WindowSignals | None) -> SignalProvider:
    """A provider from what a caller passes: ``None`` reads this machine as ``policy`` needs
    (:meth:`SystemSignals.for_policy`), a ``WindowSignals`` is constant, a provider is used as is."""
    if signals is None:
        return SystemSignals.for_policy(policy)
    if isinstance(signals, WindowSignals):
        constant = signals
        return lambda _now: constant
    return signals


def battery_status() -> tuple[bool | None, str]:
    """``(on_battery, note)`` from ``psutil.sensors_battery()``; psutil is optional.

    A machine without a battery is "not on battery"; without psutil, or when the OS does not say,
    the state is unknown (``None``).
    """
    try:
        import psutil
    except ImportError:
        return None, "psutil not installed"
    try:
        battery = psutil.sensors_battery()
    except Exception as exc:  # noqa: BLE001 - platform quirks must not stop the scheduler
        return None, f"psutil.sensors_battery failed: {exc}"
    if battery is None:
        return False, "no battery"
    if battery.power_plugged is None:
        return None, "power source not reported"
    return (not battery.power_plugged), ("on battery" if not battery.power_plugged else "on AC power")


@dataclass
class SystemSignals:
    """Reads the signals a policy needs on this machine. Every failure becomes a reason, never a crash.

    Args:
        idle: an :class:`IdleDetector`, ``"auto"`` (detect on first use, and again after
            ``redetect_after`` when none works or the chosen one fails), or ``None`` (no idle signal).
        preferred_detectors: detector names for ``"auto"`` (see :func:`detect_idle_detector`).
        detectors: detector objects for ``"auto"`` to choose from instead of the built-in ones.
        calendar: a :class:`CalendarSource`, or ``None``.
        requests_per_minute: a number, or a callable returning one (the trace store will provide it).
        battery: read the battery state (``True``) or not.
    """

    idle: IdleDetector | Literal["auto"] | None = "auto"
    preferred_detectors: Sequence[str] | None = None
    detectors: Sequence[IdleDetector] | None = None
    calendar: CalendarSource | None = None
    requests_per_minute: float | Callable[[], float | None] | None = None
    battery: bool = False
    calendar_lookback: timedelta = timedelta(days=1)
    calendar_lookahead: timedelta = timedelta(days=2)
    redetect_after: timedelta = timedelta(minutes=10)
    battery_reader: Callable[[], tuple[bool | None, str]] = battery_status
    _detector: IdleDetector | None = field(default=None, init=False, repr=False)
    _detected_at: datetime | None = field(default=None, init=False, repr=False)
    _detect_report: list[DetectionResult] = field(default_factory=list, init=False, repr=False)

    @classmethod
    def for_policy(cls, policy: WindowPolicy, **kwargs: Any) -> SystemSignals:
        """Only the signals ``policy`` uses: no idle probing without an idle trigger, and so on."""
        kwargs.setdefault("idle", "auto" if policy.idle_minutes is not None else None)
        if not policy.calendar:
            kwargs["calendar"] = None
        if policy.max_requests_per_minute is None:
            kwargs["requests_per_minute"] = None
        kwargs.setdefault("battery", policy.skip_on_battery)
        return cls(**kwargs)

    @property
    def detection(self) -> list[DetectionResult]:
        """The last idle-detector probe results (for ``metaclaw status``)."""
        return list(self._detect_report)

    def _idle_signal(self, now: datetime) -> tuple[float | None, str | None]:
        if self.idle is None:
            return None, "no idle detector configured"
        if self.idle != "auto":
            return self._read(self.idle)
        if self._detector is None:
            due = self._detected_at is None or now - self._detected_at >= self.redetect_after
            if due:
                report: list[DetectionResult] = []
                self._detector = detect_idle_detector(
                    self.preferred_detectors, candidates=self.detectors, report=report
                )
                self._detect_report = report
                self._detected_at = now
            if self._detector is None:
                return None, f"no idle detector available: {format_detection_report(self._detect_report)}"
        seconds, error = self._read(self._detector)
        if error is not None:
            self._detector = None  # try the others on the next call
            self._detected_at = None
        return seconds, error

    @staticmethod
    def _read(detector: IdleDetector) -> tuple[float | None, str | None]:
        name = getattr(detector, "name", type(detector).__name__)
        try:
            seconds = float(detector.idle_seconds())
        except IdleUnavailable as exc:
            return None, f"idle detector {exc}"
        except Exception as exc:  # noqa: BLE001
            return None, f"idle detector {name} failed: {type(exc).__name__}: {exc}"
        if not math.isfinite(seconds) or seconds < 0:
            return None, f"idle detector {name} returned {seconds!r}"
        return seconds, None

    def _calendar_signal(self, now: datetime) -> tuple[list[Interval] | None, str | None, str | None]:
        if self.calendar is None:
            return None, "no calendar configured", None
        try:
            busy = self.calendar.busy_intervals(now - self.calendar_lookback, now + self.calendar_lookahead)
        except CalendarUnavailable as exc:
            return None, exc.reason, None
        except Exception as exc:  # noqa: BLE001
            return None, f"{type(exc).__name__}: {exc}", None
        return busy, None, self.calendar.last_error

    def _load_signal(self) -> tuple[float | None, str | None]:
        source = self.requests_per_minute
        if source is None:
            return None, "no load signal configured"
        try:
            value = source() if callable(source) else source
        except Exception as exc:  # noqa: BLE001
            return None, f"load signal failed: {type(exc).__name__}: {exc}"
        if value is None:
            return None, "load signal returned nothing"
        return float(value), None

    def __call__(self, now: datetime) -> WindowSignals:
        idle_seconds, idle_error = self._idle_signal(now)
        busy, calendar_error, calendar_warning = self._calendar_signal(now)
        rpm, load_error = self._load_signal()
        on_battery, note = self.battery_reader() if self.battery else (None, "battery not checked")
        return WindowSignals(
            idle_seconds=idle_seconds,
            idle_error=idle_error,
            busy=busy,
            calendar_error=calendar_error,
            calendar_warning=calendar_warning,
            requests_per_minute=rpm,
            load_error=load_error,
            on_battery=on_battery,
            battery_note=note,
        )
