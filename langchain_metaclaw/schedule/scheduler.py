"""MadMax: train when the machine is free, stop when the user comes back (DESIGN decision 8).

:class:`MadMaxScheduler` runs one APScheduler 3.11 job, the **watchdog**, every ``check_interval`` seconds
(kept in the trace store's database, see :mod:`~langchain_metaclaw.schedule.jobs`).
Each check evaluates the :class:`~langchain_metaclaw.schedule.windows.WindowPolicy` through a
:class:`~langchain_metaclaw.schedule.watchdog.Watchdog`:

- a window opens and the store lease ``madmax`` is ours → a **training session**
  (:mod:`~langchain_metaclaw.schedule.session`) starts in a worker thread: score what is pending
  (``score_fn``), then ``trainer.run(stop_event=...)``;
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
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from langchain_metaclaw.errors import ConfigurationError
from langchain_metaclaw.schedule.clock import Clock, SystemClock
from langchain_metaclaw.schedule.events import record_event
from langchain_metaclaw.schedule.jobs import (
    JOBSTORE_TABLE,
    LEASE_NAME,
    build_scheduler,
    register,
    registered,
    shutdown,
    unregister,
    watchdog_job_id,
)
from langchain_metaclaw.schedule.lease import StoreLease
from langchain_metaclaw.schedule.report import scheduler_status
from langchain_metaclaw.schedule.session import SessionContext, TrainingSession, default_trainer_factory
from langchain_metaclaw.schedule.signals import signal_provider
from langchain_metaclaw.schedule.watchdog import Watchdog
from langchain_metaclaw.schedule.windows import SignalProvider, WindowDecision, WindowPolicy, WindowSignals

if TYPE_CHECKING:
    from langchain_metaclaw.store import TraceStore

__all__ = ["MadMaxScheduler", "default_holder"]

logger = logging.getLogger(__name__)


def default_holder() -> str:
    """``host:pid:random``: unique per scheduler instance, readable in ``metaclaw status``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _registry_key(store_url: str, lease_name: str) -> str:
    digest = hashlib.sha256(store_url.encode()).hexdigest()[:16]
    return f"{lease_name}@{digest}"


def _watchdog_job(key: str) -> None:
    """The persisted watchdog job: check the window for the scheduler(s) of this process on that store.

    Takes only a string (the job is pickled into the database); the live scheduler is looked up in this
    process. A job fired in a process with no scheduler for it (left over from another run) does nothing.
    """
    schedulers = registered(key)
    if not schedulers:
        logger.debug("watchdog job %s: no scheduler in this process", key)
        return
    for scheduler in schedulers:
        if scheduler.running:
            scheduler.tick()


def _lease_ttl(lease_ttl: float | None, check_interval: float) -> float:
    """``lease_ttl`` or ``2 * check_interval``; warns when the lease could lapse between two checks."""
    ttl = float(lease_ttl) if lease_ttl is not None else 2.0 * check_interval
    if ttl <= check_interval:
        logger.warning(
            "lease_ttl %.3g s <= check_interval %.3g s: the lease may lapse between checks "
            "(the training heartbeat still renews it)", ttl, check_interval
        )
    return ttl


@dataclass
class _WindowState:
    """What the scheduler remembers of the windows it saw (guarded by the scheduler's lock)."""

    count: int = 0
    """Window openings so far."""
    ran: bool = False
    """Whether a session started in the current window."""
    ended_at: float | None = None
    """Monotonic time the current window's last session ended (the cooldown counts from it)."""
    skip_noted: str | None = None
    """The lease skip last stored (one ``skipped`` event per cause)."""
    guard_noted: tuple[str, ...] | None = None
    """The guards of the last stored guard skip."""
    seen_decision: bool = False

    def opened(self) -> None:
        self.count += 1
        self.ran = False
        self.ended_at = None
        self.skip_noted = None


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
        self.trainer_factory = trainer_factory or default_trainer_factory(store)
        self.score_fn = score_fn
        self.signals = signal_provider(policy, signals)
        self.clock = clock or SystemClock()
        self.check_interval = float(check_interval)
        self.blocking = blocking
        self.holder = holder or default_holder()
        self.lease_ttl = _lease_ttl(lease_ttl, self.check_interval)
        self.lease_name = lease_name
        self.lease = StoreLease(store, lease_name, self.holder, self.lease_ttl, clock=self.clock)
        self.session_cooldown = session_cooldown
        self.stop_timeout = stop_timeout
        self.jobstore_table = jobstore_table
        self.job_id = watchdog_job_id(lease_name)
        self.watchdog = Watchdog(policy, self.signals, self.clock, on_decision=self._on_decision)
        self.sessions: deque[TrainingSession] = deque(maxlen=100)
        """The sessions this scheduler ran (the last 100), oldest first."""

        self._key = _registry_key(store.url, lease_name)
        self._tick_lock = threading.Lock()
        self._lock = threading.RLock()
        self._session: TrainingSession | None = None
        self._windows = _WindowState()
        self._scheduler: Any = None
        self._started = False
        self._stopping = False
        self._blocking_entered = False
        self._last_tick = time.monotonic()

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
                    session.renew()
                else:
                    session.stop_event.set()
            elif decision.open:
                self._maybe_start(decision)
            else:
                self._note_guard_skip(decision)
            return decision

    def _note_guard_skip(self, decision: WindowDecision) -> None:
        """A window the triggers would open but a guard keeps shut is a skipped window: say why, once."""
        blocking = decision.blocked_by()
        with self._lock:
            noted, self._windows.guard_noted = self._windows.guard_noted, blocking
        if blocking is not None and blocking != noted:
            self._event("skipped", decision.reasons, {"cause": "guard", "blocked_by": list(blocking)})

    def _on_decision(self, decision: WindowDecision) -> None:
        """Watchdog transitions (and its first decision) → stored events."""
        with self._lock:
            first = not self._windows.seen_decision
            self._windows.seen_decision = True
            session = self._session if self._session is not None and self._session.running else None
            # the closed event already says why; a guard skip is only written when the cause changes
            self._windows.guard_noted = decision.blocked_by()
            if decision.open:
                self._windows.opened()
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

    def _maybe_start(self, decision: WindowDecision) -> TrainingSession | None:
        """Start a session in this open window, unless one ran (cooldown) or another holder has the lease."""
        with self._lock:
            if self._stopping or not self._cooldown_over():
                return None
            try:
                session = TrainingSession.acquire(self._context(), window=self._windows.count,
                                                  stop_event=self.watchdog.stop_event)
            except Exception as exc:  # noqa: BLE001
                logger.exception("could not take the %s lease", self.lease_name)
                reason = f"lease {self.lease_name!r} unavailable: {type(exc).__name__}: {exc}"
                if self._windows.skip_noted != reason:
                    self._windows.skip_noted = reason
                    self._event("skipped", [reason, *decision.reasons], {"cause": "lease"})
                return None
            if session is None:
                self._note_lease_skip(decision)
                return None
            self._windows.skip_noted = None
            self.watchdog.reset()
            self._session = session
            self.sessions.append(session)
            self._windows.ran = True
            self._windows.ended_at = None
            self._event(
                "run_started",
                decision.reasons,
                {"session": session.id, "closes_at": decision.closes_at, "lease_ttl_s": self.lease_ttl},
            )
            session.start()
            return session

    def _cooldown_over(self) -> bool:
        windows = self._windows
        if not windows.ran:
            return True
        if self.session_cooldown is None:
            return False
        return windows.ended_at is None or self.clock.monotonic() - windows.ended_at >= self.session_cooldown

    def _note_lease_skip(self, decision: WindowDecision) -> None:
        """An open window another holder trains in: one ``skipped`` event per holder."""
        info = self.lease.current()
        noted = info.holder if info is not None else "?"
        if self._windows.skip_noted == noted:
            return
        self._windows.skip_noted = noted
        until = f" until {info.expires_at.isoformat(timespec='seconds')}" if info else ""
        self._event(
            "skipped",
            [f"lease {self.lease_name!r} held by {noted}{until}: another scheduler is training", *decision.reasons],
            {"cause": "lease", "lease_holder": noted, "lease_expires_at": info.expires_at if info else None},
        )

    def _context(self) -> SessionContext:
        return SessionContext(
            store=self.store, lease=self.lease, trainer_factory=self.trainer_factory, score_fn=self.score_fn,
            clock=self.clock, record=self._event,
            heartbeat_interval=max(0.05, min(self.lease_ttl / 3.0, self.check_interval)),
            on_beat=self._tick_if_stale, on_end=self._session_ended,
        )

    # -- running a session ---------------------------------------------------------------------------

    def _tick_if_stale(self) -> None:
        """From the heartbeat: check the window when the watchdog job has not reached this process lately."""
        stale = time.monotonic() - self._last_tick > 2.0 * self.check_interval
        if stale and self.running:
            logger.info("watchdog job has not run here for %.1f s; checking the window from the "
                        "training heartbeat", time.monotonic() - self._last_tick)
            try:
                self.tick()
            except Exception:  # noqa: BLE001
                logger.exception("window check from the heartbeat failed")

    def _session_ended(self, session: TrainingSession) -> None:
        with self._lock:
            if session.window == self._windows.count:
                self._windows.ended_at = self.clock.monotonic()
            if self._session is session:
                self._session = None

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start checking. Background: returns at once. Blocking: returns after :meth:`request_stop`
        (e.g. from a signal handler), once the session has stopped at its step boundary."""
        with self._lock:
            if self._scheduler is not None:
                msg = "this MadMaxScheduler is already started"
                raise RuntimeError(msg)
            self._stopping = False
            self._started = True
            self._scheduler = scheduler = build_scheduler(
                self.store.scheduler_jobstore(self.jobstore_table), _watchdog_job, self._key, job_id=self.job_id,
                interval=self.check_interval, blocking=self.blocking,
            )
        register(self._key, self)
        _stop_at_exit_registered()
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
        if scheduler is not None and not shutdown(scheduler) and self.blocking and self._blocking_entered:
            # start() is between its checks and the blocking loop: shut it down as soon as it runs.
            threading.Thread(target=shutdown, args=(scheduler, 10.0), name="madmax-stop", daemon=True).start()

    def stop(self, *, wait: bool = True, timeout: float | None = None) -> TrainingSession | None:
        """Stop checking and the running session; returns the last session, if any. Idempotent.

        With ``wait`` (the default) it waits up to ``timeout`` (default ``stop_timeout``) for the session
        to reach its step boundary, checkpoint, close its trainer and give the lease back, and joins the
        session's threads, so a program may exit right after ``stop()``. Past ``timeout`` it logs a
        warning and returns while the session still runs in its daemon thread: the lease then expires
        ``lease_ttl`` after its last renewal, and a process that exits while that thread is inside torch
        may abort; call ``stop()`` again to wait longer.
        """
        self.request_stop()
        with self._lock:
            self._scheduler = None
            started, self._started = self._started, False
            sessions = list(self.sessions)
        if wait:
            self._join(sessions, self.stop_timeout if timeout is None else timeout)
        unregister(self._key, self)
        if started:
            still = self.session
            self._event(
                "scheduler_stopped",
                ["stopped" + (f"; session {still.id} still finishing its step" if still else "")],
                {"pid": os.getpid(), "session_running": still is not None},
            )
        return self.last_session

    @staticmethod
    def _join(sessions: list[TrainingSession], timeout: float) -> None:
        """Join the sessions whose threads are alive (an ended one may still be freeing its trainer)."""
        deadline = time.monotonic() + timeout
        for session in sessions:
            if not session.join(max(0.0, deadline - time.monotonic())):
                logger.warning("madmax session %s did not reach a step boundary within the timeout; "
                               "its lease expires on its own if the process exits", session.id)

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


@lru_cache(maxsize=1)
def _stop_at_exit_registered() -> None:
    """Register :func:`_stop_at_exit` once per process (on the first ``start()``)."""
    atexit.register(_stop_at_exit)


def _stop_at_exit() -> None:
    """Stop the schedulers still started in this process (a notebook that never called ``stop()``)."""
    for scheduler in registered():
        try:
            scheduler.stop(timeout=min(scheduler.stop_timeout, 60.0))
        except Exception:  # noqa: BLE001
            logger.exception("stopping MadMax at exit failed")
