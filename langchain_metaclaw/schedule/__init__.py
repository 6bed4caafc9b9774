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
from langchain_metaclaw.schedule.clock import Clock, FakeClock, SystemClock, local_timezone, resolve_local
from langchain_metaclaw.schedule.idle import (
    DETECTORS,
    DetectionResult,
    IdleDetector,
    IdleUnavailable,
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
from langchain_metaclaw.schedule.windows import (
    SignalProvider,
    SystemSignals,
    TriggerResult,
    Watchdog,
    WindowDecision,
    WindowPolicy,
    WindowSignals,
    battery_status,
    parse_sleep_hours,
)

# Phase 2 (the APScheduler jobs, the store lease, stored decisions): imported on first use.
_dynamic_imports = {
    "MadMaxScheduler": "scheduler",
    "TrainingSession": "scheduler",
    "run_schedule": "scheduler",
    "scheduler_status": "scheduler",
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
    "FakeClock",
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
