"""MadMax: decide when the machine is free to train (idle time, sleep hours, calendar, load).

Phase 1 is the pure window logic and the detectors; APScheduler jobs come on top of it and are imported
lazily (this package never imports apscheduler, icalendar or jeepney at import time).

>>> from langchain_metaclaw.schedule import WindowPolicy, WindowSignals
>>> policy = WindowPolicy(idle_minutes=10, timezone="UTC")
>>> from datetime import datetime, timezone
>>> policy.evaluate(datetime(2025, 1, 1, tzinfo=timezone.utc), WindowSignals(idle_seconds=720)).reasons
['idle 12 min >= 10']
"""

from langchain_metaclaw._compat import lazy_exports
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
_dynamic_imports = {
    "MadMaxScheduler": "scheduler",
    "TrainingSession": "session",
    "run_schedule": "foreground",
    "scheduler_status": "report",
    "ScheduleEvent": "events",
    "recent_events": "events",
    "record_event": "events",
    "StoreLease": "lease",
}
__getattr__, __dir__ = lazy_exports(__name__, _dynamic_imports)


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
