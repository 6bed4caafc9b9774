"""MadMax: train when the machine is free, stop when the user comes back (DESIGN decision 8).

:class:`MadMaxScheduler` runs one APScheduler 3.11 job, the **watchdog**, every ``check_interval`` seconds.
The job lives in an ``SQLAlchemyJobStore`` in the trace store's own database (fixed id, ``replace_existing``,
``max_instances=1``, ``coalesce=True``), so a restart finds and replaces it instead of adding a second one.
Each check evaluates the :class:`~langchain_metaclaw.schedule.windows.WindowPolicy` through a
:class:`~langchain_metaclaw.schedule.windows.Watchdog`:

- a window opens and the store lease ``madmax`` is ours → a **training session** starts in a worker
  thread: score what is pending (``score_fn``), then ``trainer.run(stop_event=...)``;
- the window closes → the stop event is set; the trainer finishes its current step, checkpoints and returns
  ``status="stopped"``; the next window starts a new session, which resumes from the store;
- while a session runs, the lease is renewed on every check and by a heartbeat thread; a crashed holder's
  lease expires ``lease_ttl`` (default 2 x ``check_interval``) after its last renewal.

APScheduler cannot interrupt a running job, so training runs in its own thread and cooperates through the
stop event; the watchdog job only decides (it returns in milliseconds). Every transition and run event is
logged and stored in ``schedule_events`` (see :mod:`~langchain_metaclaw.schedule.events`).

Example (a notebook)::

    from langchain_metaclaw.schedule import MadMaxScheduler, WindowPolicy
    madmax = MadMaxScheduler(store, WindowPolicy(idle_minutes=10, sleep_hours="23:00-07:00"))
    madmax.start()          # background thread; madmax.stop() checkpoints and returns

``metaclaw schedule start`` calls :func:`run_schedule`, the same thing in the foreground.

Two schedulers on one store: APScheduler 3 does not coordinate processes that share a job store (each
runs due jobs it sees), so correctness never depends on which process runs the watchdog job: the lease
decides who trains, and the training process's heartbeat renews it and checks the window itself when the
job has not run in its process for two intervals.
"""

from __future__ import annotations

import atexit
import hashlib
import inspect
import logging
import os
import signal
import socket
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from langchain_metaclaw.errors import ConfigurationError
from langchain_metaclaw.schedule.clock import Clock, SystemClock
from langchain_metaclaw.schedule.events import jsonable, recent_events, record_event
from langchain_metaclaw.schedule.idle import detection_report
from langchain_metaclaw.schedule.lease import StoreLease, current
from langchain_metaclaw.schedule.windows import (
    SignalProvider,
    SystemSignals,
    Watchdog,
    WindowDecision,
    WindowPolicy,
    WindowSignals,
)

if TYPE_CHECKING:
    from langchain_metaclaw.store import TraceStore
    from langchain_metaclaw.training.trainer import TrainerConfig

__all__ = [
    "JOBSTORE_TABLE",
    "LEASE_NAME",
    "MadMaxScheduler",
    "TrainingSession",
    "default_holder",
    "run_schedule",
    "scheduler_status",
    "watchdog_job_id",
]

logger = logging.getLogger(__name__)

JOBSTORE_TABLE = "apscheduler_jobs"
"""The APScheduler job table, created next to the trace tables on the first start."""
LEASE_NAME = "madmax"
"""The default lease (and job id prefix): one training session per store at a time."""


def watchdog_job_id(lease_name: str = LEASE_NAME) -> str:
    """The fixed id of the watchdog job (``"madmax-watchdog"``)."""
    return f"{lease_name}-watchdog"


def default_holder() -> str:
    """``host:pid:random``: unique per scheduler instance, readable in ``metaclaw status``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


# --------------------------------------------------------------------------------------------------
# The job: a module-level function with a picklable argument, as a persistent job store requires
# --------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, weakref.WeakSet[MadMaxScheduler]] = {}
_REGISTRY_LOCK = threading.Lock()


def _registry_key(store_url: str, lease_name: str) -> str:
    digest = hashlib.sha256(store_url.encode()).hexdigest()[:16]
    return f"{lease_name}@{digest}"


def _watchdog_job(key: str) -> None:
    """The persisted watchdog job: check the window for the scheduler(s) of this process on that store.

    Takes only a string (the job is pickled into the database); the live scheduler is looked up in this
    process. A job fired in a process with no scheduler for it (left over from another run) does nothing.
    """
    with _REGISTRY_LOCK:
        schedulers = list(_REGISTRY.get(key, ()))
    if not schedulers:
        logger.debug("watchdog job %s: no scheduler in this process", key)
        return
    for scheduler in schedulers:
        if scheduler.running:
            scheduler.tick()


@lru_cache(maxsize=1)
def _jobstore_class() -> type:
    """``SQLAlchemyJobStore`` that leaves the shared engine alone on shutdown.

    The stock ``shutdown()`` disposes the engine, which belongs to the trace store (and would erase an
    in-memory SQLite store held by its single ``StaticPool`` connection).
    """
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore

    class SharedEngineJobStore(SQLAlchemyJobStore):
        def shutdown(self) -> None:
            pass

    return SharedEngineJobStore


# --------------------------------------------------------------------------------------------------
# Sessions
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainingSession:
    """One score-then-train session in a window (``status`` is ``"running"`` until it ends)."""

    id: str
    started_at: datetime
    stop_event: threading.Event
    window: int
    """Which window (a counter per scheduler) it started in."""
    status: str = "running"
    reason: str | None = None
    steps: int = 0
    total_steps: int | None = None
    last_metrics: dict[str, Any] = field(default_factory=dict)
    scoring: dict[str, Any] | None = None
    result: Any = None
    """What ``trainer.run`` returned (a :class:`~langchain_metaclaw.store.records.TrainRun`)."""
    ended_at: datetime | None = None
    lease_lost: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = field(default=None, repr=False)
    _lease_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _ending: bool = field(default=False, repr=False)

    @property
    def running(self) -> bool:
        return not self.done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the session ended; ``True`` when it did."""
        return self.done.wait(timeout)


def _default_trainer_factory(store: Any, config: TrainerConfig | None = None) -> Callable[[], Any]:
    def factory() -> Any:
        from langchain_metaclaw.training.trainer import Trainer, TrainerConfig

        return Trainer(store, config or TrainerConfig())

    return factory


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _field(result: Any, name: str, default: Any = None) -> Any:
    if isinstance(result, dict):
        return result.get(name, default)
    return getattr(result, name, default)


# --------------------------------------------------------------------------------------------------
# The scheduler
# --------------------------------------------------------------------------------------------------


class MadMaxScheduler:
    """Train in the windows a :class:`WindowPolicy` allows; stop at the step boundary when one closes.

    Args:
        store: the :class:`~langchain_metaclaw.store.TraceStore` (traces, lease, events and the job table).
        policy: when training may run.
        trainer_factory: builds a fresh trainer per session (anything with
            ``run(stop_event=..., progress=...)``); default ``Trainer(store, TrainerConfig())``.
        score_fn: ``score_fn(store, stop_event=...)`` run before training (``stop_event`` only if it accepts
            one); default :func:`langchain_metaclaw.scoring.scorer.score_pending`, imported when first
            needed (if it cannot be imported, scoring is skipped and the reason recorded).
        signals: a signal provider ``(now) -> WindowSignals`` or a constant ``WindowSignals``; default
            ``SystemSignals.for_policy(policy)`` (idle detector, calendar, load, battery as configured).
        clock: default :class:`SystemClock`; tests pass a ``FakeClock`` and call :meth:`tick`.
        check_interval: seconds between watchdog checks.
        blocking: ``True``: :meth:`start` runs a ``BlockingScheduler`` in the calling thread until
            :meth:`request_stop` (``metaclaw schedule``); ``False``: a ``BackgroundScheduler``.
        holder: this scheduler's name on the lease; default ``host:pid:random``.
        lease_ttl: seconds a lease lives without renewal; default ``2 * check_interval``.
        lease_name: the lease (and job id prefix); schedulers sharing it never train at once.
        session_cooldown: within one open window, wait this many seconds after a session ended before the
            next one (``None``: one session per window). A newly opened window always starts at once.
        stop_timeout: how long :meth:`stop` waits for a session to reach its step boundary.
        jobstore_table: the APScheduler job table name.
    """

    def __init__(
        self,
        store: TraceStore,
        policy: WindowPolicy,
        *,
        trainer_factory: Callable[[], Any] | None = None,
        score_fn: Callable[..., Any] | None = None,
        signals: SignalProvider | WindowSignals | None = None,
        clock: Clock | None = None,
        check_interval: float = 5.0,
        blocking: bool = False,
        holder: str | None = None,
        lease_ttl: float | None = None,
        lease_name: str = LEASE_NAME,
        session_cooldown: float | None = 900.0,
        stop_timeout: float = 300.0,
        jobstore_table: str = JOBSTORE_TABLE,
    ) -> None:
        if check_interval <= 0:
            msg = f"check_interval must be positive, got {check_interval}"
            raise ConfigurationError(msg)
        self.store = store
        self.policy = policy
        self.trainer_factory = trainer_factory or _default_trainer_factory(store)
        self.score_fn = score_fn
        if signals is None:
            signals = SystemSignals.for_policy(policy)
        if isinstance(signals, WindowSignals):
            constant = signals
            self.signals: SignalProvider = lambda now: constant
        else:
            self.signals = signals
        self.clock = clock or SystemClock()
        self.check_interval = float(check_interval)
        self.blocking = blocking
        self.holder = holder or default_holder()
        self.lease_ttl = float(lease_ttl) if lease_ttl is not None else 2.0 * self.check_interval
        if self.lease_ttl <= self.check_interval:
            logger.warning(
                "lease_ttl %.3g s <= check_interval %.3g s: the lease may lapse between checks "
                "(the training heartbeat still renews it)", self.lease_ttl, self.check_interval
            )
        self.lease_name = lease_name
        self.lease = StoreLease(store, lease_name, self.holder, self.lease_ttl, clock=self.clock)
        self.session_cooldown = session_cooldown
        self.stop_timeout = stop_timeout
        self.jobstore_table = jobstore_table
        self.job_id = watchdog_job_id(lease_name)
        self._key = _registry_key(store.url, lease_name)

        self.watchdog = Watchdog(policy, self.signals, self.clock, on_decision=self._on_decision)
        self._tick_lock = threading.Lock()
        self._lock = threading.RLock()
        self._session: TrainingSession | None = None
        self.sessions: deque[TrainingSession] = deque(maxlen=100)
        """The sessions this scheduler ran (the last 100), oldest first."""
        self._window = 0  # counts window openings
        self._window_end: float | None = None  # monotonic time the last session of this window ended
        self._window_ran = False
        self._skip_noted: str | None = None
        self._guard_noted: tuple[str, ...] | None = None
        self._seen_decision = False
        self._stopping = False
        self._started = False
        self._scheduler: Any = None
        self._last_tick = time.monotonic()
        self._atexit_registered = False
        self._blocking_entered = False

    # -- state ---------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the APScheduler part is running (``tick`` works without it)."""
        scheduler = self._scheduler
        return scheduler is not None and bool(scheduler.running) and not self._stopping

    @property
    def session(self) -> TrainingSession | None:
        """The running session, if any."""
        with self._lock:
            session = self._session
        return session if session is not None and session.running else None

    @property
    def last_session(self) -> TrainingSession | None:
        with self._lock:
            return self.sessions[-1] if self.sessions else None

    def _event(self, event: str, reasons: Any = None, details: dict[str, Any] | None = None) -> None:
        record_event(self.store, event, reasons, {"holder": self.holder, **(details or {})}, at=self.clock.now())

    # -- deciding ------------------------------------------------------------------------------------

    def tick(self) -> WindowDecision:
        """One watchdog check: evaluate the window, stop / renew / start a session. Returns the decision."""
        with self._tick_lock:
            self._last_tick = time.monotonic()
            decision = self.watchdog.check()
            session = self.session
            if session is not None:
                if decision.open:
                    self._renew(session)
                else:
                    session.stop_event.set()
            elif decision.open:
                self._maybe_start(decision)
            else:
                self._note_guard_skip(decision)
            return decision

    @staticmethod
    def _guard_block(decision: WindowDecision) -> tuple[str, ...] | None:
        """The guards that keep a window shut although its triggers hold (``None``: not that case)."""
        if decision.open or not decision.triggers:
            return None
        triggers = [r.ok for r in decision.triggers.values() if r.role == "trigger"]
        held = (all(triggers) if decision.mode == "all" else any(triggers)) if triggers else False
        blocking = tuple(sorted(n for n, r in decision.triggers.items() if r.role == "guard" and not r.ok))
        return blocking if held and blocking else None

    def _note_guard_skip(self, decision: WindowDecision) -> None:
        """A window the triggers would open but a guard keeps shut is a skipped window: say why, once."""
        blocking = self._guard_block(decision)
        with self._lock:
            noted, self._guard_noted = self._guard_noted, blocking
        if blocking is not None and blocking != noted:
            self._event("skipped", decision.reasons, {"cause": "guard", "blocked_by": list(blocking)})

    def _on_decision(self, decision: WindowDecision) -> None:
        """Watchdog transitions (and its first decision) → stored events."""
        with self._lock:
            first = not self._seen_decision
            self._seen_decision = True
            session = self._session if self._session is not None and self._session.running else None
            # the closed event already says why; a guard skip is only written when the cause changes
            self._guard_noted = self._guard_block(decision)
            if decision.open:
                self._window += 1
                self._window_ran = False
                self._window_end = None
                self._skip_noted = None
        if decision.open:
            self._event(
                "opened",
                decision.reasons,
                {"closes_at": decision.closes_at, "mode": decision.mode, "initial": first},
            )
        else:
            details: dict[str, Any] = {"initial": first}
            if session is not None:
                details["stopping_session"] = session.id
            self._event("closed", decision.reasons, details)

    def _renew(self, session: TrainingSession) -> bool:
        with session._lease_lock:
            if session._ending or session.lease_lost:
                return not session.lease_lost
            try:
                ok = self.lease.renew()
            except Exception:  # noqa: BLE001 - a DB hiccup: try again on the next beat
                logger.exception("could not renew the %s lease", self.lease_name)
                return True
            if not ok:
                session.lease_lost = True
        if not ok:
            holder = self.lease.current()
            who = f"now held by {holder.holder}" if holder is not None else "it was released"
            session.stop_event.set()
            self._event(
                "lease_lost",
                [f"lease {self.lease_name!r} could not be renewed ({who}); stopping the session"],
                {"session": session.id},
            )
        return ok

    def _maybe_start(self, decision: WindowDecision) -> TrainingSession | None:
        with self._lock:
            if self._stopping:
                return None
            if self._window_ran:
                if self.session_cooldown is None:
                    return None
                if self._window_end is not None and (
                    self.clock.monotonic() - self._window_end < self.session_cooldown
                ):
                    return None
            try:
                acquired = self.lease.acquire()
            except Exception as exc:  # noqa: BLE001
                logger.exception("could not take the %s lease", self.lease_name)
                reason = f"lease {self.lease_name!r} unavailable: {type(exc).__name__}: {exc}"
                if self._skip_noted != reason:
                    self._skip_noted = reason
                    self._event("skipped", [reason, *decision.reasons], {"cause": "lease"})
                return None
            if not acquired:
                info = self.lease.current()
                noted = info.holder if info is not None else "?"
                if self._skip_noted != noted:
                    self._skip_noted = noted
                    until = f" until {info.expires_at.isoformat(timespec='seconds')}" if info else ""
                    self._event(
                        "skipped",
                        [f"lease {self.lease_name!r} held by {noted}{until}: another scheduler is training",
                         *decision.reasons],
                        {"cause": "lease", "lease_holder": noted,
                         "lease_expires_at": info.expires_at if info else None},
                    )
                return None
            self._skip_noted = None
            self.watchdog.reset()
            session = TrainingSession(
                id=uuid.uuid4().hex[:12],
                started_at=self.clock.now(),
                stop_event=self.watchdog.stop_event,
                window=self._window,
            )
            self._session = session
            self.sessions.append(session)
            self._window_ran = True
            self._window_end = None
            self._event(
                "run_started",
                decision.reasons,
                {"session": session.id, "closes_at": decision.closes_at, "lease_ttl_s": self.lease_ttl},
            )
            session.thread = threading.Thread(
                target=self._run_session, args=(session,), name=f"madmax-session-{session.id}", daemon=True
            )
            beat = threading.Thread(
                target=self._heartbeat, args=(session,), name=f"madmax-heartbeat-{session.id}", daemon=True
            )
            session.thread.start()
            beat.start()
            return session

    # -- running a session ---------------------------------------------------------------------------

    def _heartbeat(self, session: TrainingSession) -> None:
        """Renew the lease while the session runs; check the window if the job stopped reaching us."""
        interval = max(0.05, min(self.lease_ttl / 3.0, self.check_interval))
        while not session.done.wait(interval):
            if not self._renew(session):
                return
            stale = time.monotonic() - self._last_tick > 2.0 * self.check_interval
            if stale and self.running:
                logger.info("watchdog job has not run here for %.1f s; checking the window from the "
                            "training heartbeat", time.monotonic() - self._last_tick)
                try:
                    self.tick()
                except Exception:  # noqa: BLE001
                    logger.exception("window check from the heartbeat failed")

    def _score(self, session: TrainingSession) -> dict[str, Any]:
        fn = self.score_fn
        if fn is None:
            try:
                from langchain_metaclaw.scoring.scorer import score_pending
            except Exception as exc:  # noqa: BLE001 - scoring is optional for training on older scores
                reason = f"scoring unavailable: {type(exc).__name__}: {exc}"
                logger.warning("%s; training on the scores already stored", reason)
                return {"status": "skipped", "reason": reason}
            fn = score_pending
        started = time.monotonic()
        try:
            if _accepts(fn, "stop_event"):
                report = fn(self.store, stop_event=session.stop_event)
            else:
                report = fn(self.store)
        except Exception as exc:  # noqa: BLE001 - train on what is already scored
            logger.exception("scoring before training failed")
            return {"status": "error", "reason": f"{type(exc).__name__}: {exc}",
                    "elapsed_s": round(time.monotonic() - started, 3)}
        out: dict[str, Any] = {"status": "ok", "elapsed_s": round(time.monotonic() - started, 3)}
        if report is not None:
            summary = getattr(report, "summary", None)
            if callable(summary):
                try:
                    out["summary"] = str(summary())
                except Exception:  # noqa: BLE001
                    pass
            out["report"] = jsonable(report)
        return out

    def _progress(self, session: TrainingSession, step: int, total: int, metrics: dict[str, Any]) -> None:
        session.steps = int(step)
        session.total_steps = int(total) if total is not None else None
        session.last_metrics = dict(metrics or {})
        logger.info("madmax session %s: step %s/%s", session.id, step, total)

    def _run_session(self, session: TrainingSession) -> None:
        started = time.monotonic()
        details: dict[str, Any] = {"session": session.id}
        try:
            session.scoring = self._score(session)
            details["scoring"] = session.scoring
            if session.stop_event.is_set():
                session.status, session.reason = "stopped", "window closed while scoring; nothing trained"
            else:
                trainer = self.trainer_factory()
                kwargs: dict[str, Any] = {"stop_event": session.stop_event}
                if _accepts(trainer.run, "progress"):
                    kwargs["progress"] = lambda step, total, metrics: self._progress(session, step, total, metrics)
                run = trainer.run(**kwargs)
                session.result = run
                session.status = str(_field(run, "status", "ok"))
                session.reason = _field(run, "reason")
                session.steps = int(_field(run, "steps", session.steps) or 0)
                metrics = _field(run, "metrics", {}) or {}
                details.update(
                    train_run=_field(run, "id"),
                    candidate_adapter=_field(run, "candidate_adapter"),
                    checkpoint=metrics.get("checkpoint") if isinstance(metrics, dict) else None,
                    metrics=metrics,
                )
        except BaseException as exc:  # noqa: BLE001 - a session never takes the scheduler down
            logger.exception("madmax session %s failed", session.id)
            session.status, session.reason = "error", f"{type(exc).__name__}: {exc}"
        finally:
            session.ended_at = self.clock.now()
            if session.lease_lost and session.status == "stopped":
                session.reason = f"lease lost; {session.reason}" if session.reason else "lease lost"
            details.update(
                status=session.status,
                reason=session.reason,
                steps=session.steps,
                duration_s=round(time.monotonic() - started, 3),
                lease_lost=session.lease_lost,
            )
            self._event("run_ended", [f"{session.status}: {session.reason or 'no reason given'}"], details)
            with session._lease_lock:
                session._ending = True
                if not session.lease_lost:
                    try:
                        self.lease.release()
                    except Exception:  # noqa: BLE001 - it expires on its own
                        logger.exception("could not release the %s lease", self.lease_name)
            with self._lock:
                if session.window == self._window:
                    self._window_end = self.clock.monotonic()
                if self._session is session:
                    self._session = None
            session.done.set()

    # -- lifecycle -----------------------------------------------------------------------------------

    def _build_scheduler(self) -> Any:
        from apscheduler.executors.pool import ThreadPoolExecutor

        if self.blocking:
            from apscheduler.schedulers.blocking import BlockingScheduler as cls
        else:
            from apscheduler.schedulers.background import BackgroundScheduler as cls
        jobstore = _jobstore_class()(engine=self.store.engine, tablename=self.jobstore_table)
        scheduler = cls(
            jobstores={"default": jobstore},
            executors={"default": ThreadPoolExecutor(max_workers=2)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )
        scheduler.add_job(
            _watchdog_job,
            "interval",
            seconds=self.check_interval,
            args=[self._key],
            id=self.job_id,
            name="MadMax watchdog: evaluate the training window",
            replace_existing=True,
            next_run_time=datetime.now(UTC),
        )
        return scheduler

    def start(self) -> None:
        """Start checking. Background: returns at once. Blocking: returns after :meth:`request_stop`
        (e.g. from a signal handler), once the session has stopped at its step boundary."""
        with self._lock:
            if self._scheduler is not None:
                msg = "this MadMaxScheduler is already started"
                raise RuntimeError(msg)
            self._stopping = False
            self._started = True
            self._scheduler = scheduler = self._build_scheduler()
        with _REGISTRY_LOCK:
            _REGISTRY.setdefault(self._key, weakref.WeakSet()).add(self)
        if not self._atexit_registered:
            atexit.register(_stop_at_exit, weakref.ref(self))
            self._atexit_registered = True
        self._event(
            "scheduler_started",
            [f"checking every {self.check_interval:g} s ({'blocking' if self.blocking else 'background'})"],
            {"pid": os.getpid(), "check_interval_s": self.check_interval, "lease_ttl_s": self.lease_ttl,
             "policy": self.policy.model_dump(exclude_defaults=True), "job_id": self.job_id},
        )
        self._last_tick = time.monotonic()
        if not self.blocking:
            scheduler.start()
            return
        try:
            with self._lock:
                self._blocking_entered = True
                stopping = self._stopping
            if not stopping:
                scheduler.start()  # blocks until request_stop()
        finally:
            self._blocking_entered = False
            self.stop()

    def request_stop(self) -> None:
        """Ask a running scheduler to stop, from any thread (a signal handler may start a thread for it):
        no more checks, and the session stops at its next step boundary. :meth:`start` (blocking)
        then returns; in the background mode call :meth:`stop` to wait for the session."""
        with self._lock:
            self._stopping = True
            scheduler = self._scheduler
            session = self._session
        if session is not None:
            session.stop_event.set()
        if scheduler is not None and not _shutdown(scheduler) and self.blocking and self._blocking_entered:
            # start() is between its checks and the blocking loop: shut it down as soon as it runs.
            threading.Thread(target=_shutdown, args=(scheduler, 10.0), name="madmax-stop", daemon=True).start()

    def stop(self, *, wait: bool = True, timeout: float | None = None) -> TrainingSession | None:
        """Stop checking; stop the running session at its step boundary and wait for it (up to
        ``timeout``, default ``stop_timeout``). Returns the last session, if any. Idempotent."""
        self.request_stop()
        with self._lock:
            session = self._session
            self._scheduler = None
            started, self._started = self._started, False
        if session is not None and wait:
            if not session.wait(self.stop_timeout if timeout is None else timeout):
                logger.warning("madmax session %s did not reach a step boundary within the timeout; "
                               "its lease expires on its own if the process exits", session.id)
        with _REGISTRY_LOCK:
            registered = _REGISTRY.get(self._key)
            if registered is not None:
                registered.discard(self)
                if not registered:
                    _REGISTRY.pop(self._key, None)
        if started:
            still = self.session
            self._event(
                "scheduler_stopped",
                ["stopped" + (f"; session {still.id} still finishing its step" if still else "")],
                {"pid": os.getpid(), "session_running": still is not None},
            )
        return self.last_session

    close = stop

    def __enter__(self) -> MadMaxScheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def status(self, *, limit: int = 10) -> dict[str, Any]:
        """:func:`scheduler_status` for this scheduler, plus its own session."""
        report = scheduler_status(
            self.store, self.policy, self.signals, now=self.clock.now(), limit=limit,
            lease_name=self.lease_name, jobstore_table=self.jobstore_table,
        )
        session = self.session
        report["holder"] = self.holder
        report["session"] = (
            None
            if session is None
            else {"id": session.id, "started_at": session.started_at, "steps": session.steps,
                  "total_steps": session.total_steps, "stopping": session.stop_event.is_set()}
        )
        return report

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"MadMaxScheduler({self.store!r}, holder={self.holder!r}, {state})"


def _shutdown(scheduler: Any, wait_for_start: float = 0.0) -> bool:
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


def _stop_at_exit(ref: weakref.ref[MadMaxScheduler]) -> None:
    scheduler = ref()
    if scheduler is not None and scheduler._started:
        try:
            scheduler.stop(timeout=min(scheduler.stop_timeout, 60.0))
        except Exception:  # noqa: BLE001
            logger.exception("stopping MadMax at exit failed")


# --------------------------------------------------------------------------------------------------
# The CLI entry point
# --------------------------------------------------------------------------------------------------


def run_schedule(
    store_url: str | None,
    policy: WindowPolicy,
    *,
    trainer_config: TrainerConfig | None = None,
    trainer_factory: Callable[[], Any] | None = None,
    score_fn: Callable[..., Any] | None = None,
    signals: SignalProvider | WindowSignals | None = None,
    check_interval: float = 5.0,
    holder: str | None = None,
    lease_ttl: float | None = None,
    session_cooldown: float | None = 900.0,
    stop_timeout: float = 300.0,
    handle_signals: bool = True,
    clock: Clock | None = None,
) -> TrainingSession | None:
    """Run MadMax in the foreground until SIGINT / SIGTERM (``metaclaw schedule start``).

    Opens the store at ``store_url`` (``None``: ``METACLAW_STORE_URL`` or the default under
    ``$METACLAW_HOME``), trains with ``trainer_factory`` or ``Trainer(store, trainer_config)``, and blocks.
    The first SIGINT/SIGTERM stops the checks and the running session at its next step boundary (it
    checkpoints), releases the lease and returns the last session; a second one interrupts the wait.
    """
    from langchain_metaclaw.store import TraceStore

    store = TraceStore(store_url)
    logging.getLogger("apscheduler.executors.default").setLevel(logging.WARNING)  # one line per check
    scheduler = MadMaxScheduler(
        store,
        policy,
        trainer_factory=trainer_factory or _default_trainer_factory(store, trainer_config),
        score_fn=score_fn,
        signals=signals,
        clock=clock,
        check_interval=check_interval,
        blocking=True,
        holder=holder,
        lease_ttl=lease_ttl,
        session_cooldown=session_cooldown,
        stop_timeout=stop_timeout,
    )
    previous: dict[int, Any] = {}

    def on_signal(signum: int, _frame: Any) -> None:
        logger.info("madmax: %s received; stopping at the next step boundary", signal.Signals(signum).name)
        for sig, handler in previous.items():  # a second signal is not caught here again
            signal.signal(sig, handler)
        threading.Thread(target=scheduler.request_stop, name="madmax-stop", daemon=True).start()

    if handle_signals and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        scheduler.start()
        return scheduler.last_session
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        store.close()


# --------------------------------------------------------------------------------------------------
# Status
# --------------------------------------------------------------------------------------------------


def _jobs(store: TraceStore, table: str) -> list[dict[str, Any]]:
    try:
        return store.scheduler_jobs(table)
    except Exception:  # noqa: BLE001 - status must always render
        logger.exception("could not read the job table %s", table)
        return []


def scheduler_status(
    store: Any,
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
    provider: SignalProvider
    if signals is None:
        provider = SystemSignals.for_policy(policy)
    elif isinstance(signals, WindowSignals):
        constant = signals
        provider = lambda _now: constant  # noqa: E731
    else:
        provider = signals
    try:
        sig = provider(now)
        decision = policy.evaluate(now, sig)
    except Exception as exc:  # noqa: BLE001
        sig = WindowSignals()
        decision = WindowDecision(open=False, reasons=[f"signals failed: {type(exc).__name__}: {exc}"], at=now)
    next_window = policy.next_window(now, busy=sig.busy)
    unforeseeable = [n for n in ("idle", "load") if n in policy.enabled_triggers]
    if next_window is None:
        note = ("idle time and load cannot be foreseen" if unforeseeable
                else "no scheduled window (sleep hours / calendar) within 2 days")
    else:
        note = "from sleep hours and the calendar" + (
            f"; {' and '.join(unforeseeable)} may open one sooner" if unforeseeable else "")

    info = current(store, lease_name)
    lease = (
        None
        if info is None
        else {"holder": info.holder, "expires_at": info.expires_at, "active": info.active(now)}
    )
    events = recent_events(store, limit)
    last_run = recent_events(store, 1, event="run_ended")

    detectors: list[dict[str, Any]] = []
    if probe_detectors and policy.idle_minutes is not None:
        try:
            if isinstance(signals, SystemSignals):
                results = detection_report(signals.preferred_detectors, candidates=signals.detectors)
            else:
                results = detection_report()
            detectors = [r._asdict() for r in results]
        except Exception as exc:  # noqa: BLE001
            detectors = [{"detector": "?", "available": False, "reason": f"{type(exc).__name__}: {exc}"}]

    jobs = _jobs(store, jobstore_table)
    started = recent_events(store, 1, event="scheduler_started")
    alive: bool | None = None
    watchdog = next((j for j in jobs if j["id"] == watchdog_job_id(lease_name)), None)
    if started:
        interval = float(started[0].details.get("check_interval_s") or 5.0)
        stopped = recent_events(store, 1, event="scheduler_stopped")
        cleanly_stopped = bool(stopped) and stopped[0].at >= started[0].at
        on_time = (
            watchdog is not None
            and watchdog["next_run_time"] is not None
            and watchdog["next_run_time"] >= now - timedelta(seconds=3 * interval + 5)
        )
        alive = on_time and not cleanly_stopped
    return {
        "now": now,
        "window": {"open": decision.open, "reasons": decision.reasons, "closes_at": decision.closes_at},
        "next_window": next_window,
        "next_window_note": note,
        "lease": lease,
        "training": bool(lease and lease["active"]),
        "events": [e.as_dict() for e in events],
        "last_run": last_run[0].as_dict() if last_run else None,
        "detectors": detectors,
        "jobs": jobs,
        "scheduler_alive": alive,
    }
