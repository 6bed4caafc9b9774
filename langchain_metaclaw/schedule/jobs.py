"""The APScheduler side of MadMax: the job table, the watchdog job's id, building and shutting down a scheduler.

The watchdog job lives in an ``SQLAlchemyJobStore`` in the trace store's own database (fixed id,
``replace_existing``, ``max_instances=1``, ``coalesce=True``), so a restart finds and replaces it instead of
adding a second one. The job function itself stays in :mod:`~langchain_metaclaw.schedule.scheduler`: its
import path is pickled into the job table.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "JOBSTORE_TABLE",
    "LEASE_NAME",
    "build_scheduler",
    "register",
    "registered",
    "shutdown",
    "unregister",
    "watchdog_job_id",
]

JOBSTORE_TABLE = "apscheduler_jobs"
"""The APScheduler job table, created next to the trace tables on the first start."""
LEASE_NAME = "madmax"
"""The default lease (and job id prefix): one training session per store at a time."""


def watchdog_job_id(lease_name: str = LEASE_NAME) -> str:
    """The fixed id of the watchdog job (``"madmax-watchdog"``)."""
    return f"{lease_name}-watchdog"


# The job is pickled with a string key only; the live schedulers of this process are found here by it.
_REGISTRY: dict[str, weakref.WeakSet[Any]] = {}
_REGISTRY_LOCK = threading.Lock()


def register(key: str, scheduler: Any) -> None:
    """Make a started scheduler reachable by its job's key (held weakly)."""
    with _REGISTRY_LOCK:
        _REGISTRY.setdefault(key, weakref.WeakSet()).add(scheduler)


def unregister(key: str, scheduler: Any) -> None:
    with _REGISTRY_LOCK:
        group = _REGISTRY.get(key)
        if group is not None:
            group.discard(scheduler)
            if not group:
                _REGISTRY.pop(key, None)


def registered(key: str | None = None) -> list[Any]:
    """The started schedulers of this process for ``key`` (``None``: all of them)."""
    with _REGISTRY_LOCK:
        groups = list(_REGISTRY.values()) if key is None else [_REGISTRY.get(key, weakref.WeakSet())]
        return [s for group in groups for s in group]


def build_scheduler(
    jobstore: Any,
    job: Callable[[str], None],
    key: str,
    *,
    job_id: str,
    interval: float,
    blocking: bool,
) -> Any:
    """A Blocking- or BackgroundScheduler (UTC, two worker threads) on ``jobstore`` (the store's
    :meth:`~langchain_metaclaw.store.schedule.ScheduleQueries.scheduler_jobstore`), holding one interval
    job ``job(key)`` (id ``job_id``) due at once."""
    from apscheduler.executors.pool import ThreadPoolExecutor

    if blocking:
        from apscheduler.schedulers.blocking import BlockingScheduler as cls
    else:
        from apscheduler.schedulers.background import BackgroundScheduler as cls
    scheduler = cls(
        jobstores={"default": jobstore},
        executors={"default": ThreadPoolExecutor(max_workers=2)},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        timezone=UTC,
    )
    scheduler.add_job(
        job,
        "interval",
        seconds=interval,
        args=[key],
        id=job_id,
        name="MadMax watchdog: evaluate the training window",
        replace_existing=True,
        next_run_time=datetime.now(UTC),
    )
    return scheduler


def shutdown(scheduler: Any, wait_for_start: float = 0.0) -> bool:
    """Shut an APScheduler scheduler down (not waiting for running jobs); ``False`` if it was not running,
    after waiting up to ``wait_for_start`` seconds for it to start."""
    from apscheduler.schedulers import SchedulerNotRunningError

    deadline = time.monotonic() + wait_for_start
    while True:
        try:
            scheduler.shutdown(wait=False)
            return True
        except SchedulerNotRunningError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
