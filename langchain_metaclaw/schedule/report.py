"""What MadMax would say right now, for ``metaclaw status``: the window, the lease, the events, the detectors
and whether some process runs the watchdog job on time."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from langchain_metaclaw.schedule.events import recent_events
from langchain_metaclaw.schedule.idle import detection_report
from langchain_metaclaw.schedule.jobs import JOBSTORE_TABLE, LEASE_NAME, watchdog_job_id
from langchain_metaclaw.schedule.lease import current
from langchain_metaclaw.schedule.signals import SystemSignals, signal_provider
from langchain_metaclaw.schedule.windows import SignalProvider, WindowDecision, WindowPolicy, WindowSignals

if TYPE_CHECKING:
    from langchain_metaclaw.store import TraceStore

__all__ = ["scheduler_status"]

logger = logging.getLogger("langchain_metaclaw.schedule.scheduler")  # the scheduler's log, as before the split


def scheduler_status(
    store: TraceStore,
    policy: WindowPolicy,
    signals: SignalProvider | WindowSignals | None = None,
    *,
    now: datetime | None = None,
    limit: int = 10,
    lease_name: str = LEASE_NAME,
    probe_detectors: bool = True,
    jobstore_table: str = JOBSTORE_TABLE,
) -> dict[str, Any]:
    """What MadMax would say right now, for ``metaclaw status``.

    Keys: ``now``; ``window`` (the policy evaluated now: ``open``, ``reasons``, ``closes_at``);
    ``next_window`` (``policy.next_window``: from sleep hours and the calendar only, ``None`` when not
    foreseeable) with ``next_window_note``; ``lease`` (holder, expires_at, active) and ``training``;
    ``events`` (the last ``limit``, newest first, as dicts) and ``last_run`` (the last ``run_ended``);
    ``detectors`` (``detection_report`` of the idle detectors, ``[]`` without an idle trigger);
    ``jobs`` (the APScheduler job rows) and ``scheduler_alive`` (whether some process is running the
    watchdog job on time, judged from its next run time; ``None`` when no scheduler ever started).
    """
    now = (now or datetime.now(UTC)).astimezone(UTC)
    sig, decision = _decide(policy, signal_provider(policy, signals), now)
    next_window = policy.next_window(now, busy=sig.busy)
    info = current(store, lease_name)
    lease = (
        None
        if info is None
        else {"holder": info.holder, "expires_at": info.expires_at, "active": info.active(now)}
    )
    last_run = recent_events(store, 1, event="run_ended")
    jobs = _jobs(store, jobstore_table)
    return {
        "now": now,
        "window": {"open": decision.open, "reasons": decision.reasons, "closes_at": decision.closes_at},
        "next_window": next_window,
        "next_window_note": _next_window_note(policy, next_window),
        "lease": lease,
        "training": bool(lease and lease["active"]),
        "events": [e.as_dict() for e in recent_events(store, limit)],
        "last_run": last_run[0].as_dict() if last_run else None,
        "detectors": _detectors(policy, signals) if probe_detectors else [],
        "jobs": jobs,
        "scheduler_alive": _alive(store, jobs, watchdog_job_id(lease_name), now),
    }


def _decide(policy: WindowPolicy, provider: SignalProvider, now: datetime) -> tuple[WindowSignals, WindowDecision]:
    try:
        sig = provider(now)
        return sig, policy.evaluate(now, sig)
    except Exception as exc:  # noqa: BLE001 - status must always render
        reasons = [f"signals failed: {type(exc).__name__}: {exc}"]
        return WindowSignals(), WindowDecision(open=False, reasons=reasons, at=now)


def _next_window_note(policy: WindowPolicy, next_window: Any) -> str:
    unforeseeable = [n for n in ("idle", "load") if n in policy.enabled_triggers]
    if next_window is None:
        return ("idle time and load cannot be foreseen" if unforeseeable
                else "no scheduled window (sleep hours / calendar) within 2 days")
    return "from sleep hours and the calendar" + (
        f"; {' and '.join(unforeseeable)} may open one sooner" if unforeseeable else "")


def _detectors(policy: WindowPolicy, signals: SignalProvider | WindowSignals | None) -> list[dict[str, Any]]:
    """The idle detectors' report (``[]`` without an idle trigger); a failure is one row saying why."""
    if policy.idle_minutes is None:
        return []
    try:
        if isinstance(signals, SystemSignals):
            results = detection_report(signals.preferred_detectors, candidates=signals.detectors)
        else:
            results = detection_report()
        return [r._asdict() for r in results]
    except Exception as exc:  # noqa: BLE001
        return [{"detector": "?", "available": False, "reason": f"{type(exc).__name__}: {exc}"}]


def _jobs(store: TraceStore, table: str) -> list[dict[str, Any]]:
    try:
        return store.scheduler_jobs(table)
    except Exception:  # noqa: BLE001 - status must always render
        logger.exception("could not read the job table %s", table)
        return []


def _alive(store: TraceStore, jobs: list[dict[str, Any]], job_id: str, now: datetime) -> bool | None:
    """Whether a process runs the watchdog job on time and did not stop cleanly since it last started."""
    started = recent_events(store, 1, event="scheduler_started")
    if not started:
        return None
    watchdog = next((j for j in jobs if j["id"] == job_id), None)
    interval = float(started[0].details.get("check_interval_s") or 5.0)
    stopped = recent_events(store, 1, event="scheduler_stopped")
    cleanly_stopped = bool(stopped) and stopped[0].at >= started[0].at
    on_time = (
        watchdog is not None
        and watchdog["next_run_time"] is not None
        and watchdog["next_run_time"] >= now - timedelta(seconds=3 * interval + 5)
    )
    return on_time and not cleanly_stopped
