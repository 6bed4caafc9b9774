"""MadMax: decide when the machine is free to train (idle time, sleep hours, calendar, load).

Phase 1 is the pure window logic and the detectors; APScheduler jobs come on top of it and are imported
lazily (this package never imports apscheduler, icalendar or jeepney at import time).

>>> from langchain_metaclaw.schedule import WindowPolicy, WindowSignals
>>> policy = WindowPolicy(idle_minutes=10, timezone="UTC")
>>> from datetime import datetime, timezone
>>> policy.evaluate(datetime(2025, 1, 1, tzinfo=timezone.utc), WindowSignals(idle_seconds=720)).reasons
['idle 12 min >= 10']
"""

from langchain_metaclaw.schedule.calendar import (
    CalendarSource,
    CalendarStatus,
    CalendarUnavailable,
    Interval,
    merge_intervals,
)
from langchain_metaclaw.schedule.clock import Clock, SystemClock, local_timezone, resolve_local
from langchain_metaclaw.schedule.idle import (
    DETECTORS,
    DetectionResult,
    IdleDetector,
    IoregIdleDetector,
    LogindIdleDetector,
    MutterIdleDetector,
    WindowsIdleDetector,
    XprintidleDetector,
    default_detector_order,
    detect_idle_detector,
    detection_report,
    format_detection_report,
)
from langchain_metaclaw.schedule.idle_os import IdleUnavailable
from langchain_metaclaw.schedule.signals import SystemSignals, battery_status
from langchain_metaclaw.schedule.watchdog import Watchdog
from langchain_metaclaw.schedule.windows import (
    SignalProvider,
    TriggerResult,
    WindowDecision,
    WindowPolicy,
    WindowSignals,
    parse_sleep_hours,
)

# Phase 2 (the APScheduler jobs, the store lease, stored decisions): imported on first use.
_LAZY = {
    "MadMaxScheduler": "langchain_metaclaw.schedule.scheduler",
    "TrainingSession": "langchain_metaclaw.schedule.session",
    "run_schedule": "langchain_metaclaw.schedule.foreground",
    "scheduler_status": "langchain_metaclaw.schedule.report",
    "ScheduleEvent": "langchain_metaclaw.store.schedule",
    "recent_events": "langchain_metaclaw.schedule.events",
    "record_event": "langchain_metaclaw.schedule.events",
    "StoreLease": "langchain_metaclaw.schedule.lease",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "DETECTORS",
    "CalendarSource",
    "CalendarStatus",
    "CalendarUnavailable",
    "Clock",
    "DetectionResult",
    "IdleDetector",
    "IdleUnavailable",
    "Interval",
    "IoregIdleDetector",
    "LogindIdleDetector",
    "MadMaxScheduler",
    "MutterIdleDetector",
    "ScheduleEvent",
    "SignalProvider",
    "StoreLease",
    "SystemClock",
    "SystemSignals",
    "TrainingSession",
    "TriggerResult",
    "Watchdog",
    "WindowDecision",
    "WindowPolicy",
    "WindowSignals",
    "WindowsIdleDetector",
    "XprintidleDetector",
    "battery_status",
    "default_detector_order",
    "detect_idle_detector",
    "detection_report",
    "format_detection_report",
    "local_timezone",
    "merge_intervals",
    "parse_sleep_hours",
    "recent_events",
    "record_event",
    "resolve_local",
    "run_schedule",
    "scheduler_status",
]
