"""One MadMax training session: take the lease, score what is pending, train until stopped, give the lease back.

A :class:`TrainingSession` owns its lease (acquired before it starts, renewed by its heartbeat thread and by
the watchdog, released when it ends) and its two threads (the work and the heartbeat); :meth:`join` waits
for both. The session closes the trainer it built before it ends, so that the model's tensors are freed in
the session thread while the interpreter is still whole: a daemon thread still freeing torch tensors
while the process exits aborts it (SIGABRT, "terminate called without an active exception").
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from langchain_metaclaw._compat import accepts_keyword
from langchain_metaclaw.schedule.clock import Clock
from langchain_metaclaw.schedule.events import jsonable
from langchain_metaclaw.schedule.lease import StoreLease

if TYPE_CHECKING:
    from langchain_metaclaw.store import TraceStore
    from langchain_metaclaw.training.trainer import TrainerConfig

__all__ = ["SessionContext", "TrainingSession", "default_trainer_factory"]

logger = logging.getLogger("langchain_metaclaw.schedule.scheduler")  # the scheduler's log, as before the split

Record = Callable[..., Any]
"""``record(event, reasons, details)``: log and store a schedule event."""


@dataclass(frozen=True)
class SessionContext:
    """What every session of one scheduler shares."""

    store: TraceStore
    lease: StoreLease
    trainer_factory: Callable[[], Any]
    score_fn: Callable[..., Any] | None
    clock: Clock
    record: Record
    heartbeat_interval: float
    on_beat: Callable[[], None]
    """Called on every heartbeat while the lease holds (the scheduler checks the window when its job is late)."""
    on_end: Callable[[TrainingSession], None]
    """Called in the session thread once it ended, before :attr:`TrainingSession.done` is set."""


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
    heartbeat: threading.Thread | None = field(default=None, repr=False)
    context: SessionContext | None = field(default=None, repr=False)
    _lease_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _ending: bool = field(default=False, repr=False)

    @classmethod
    def acquire(cls, context: SessionContext, *, window: int, stop_event: threading.Event) -> TrainingSession | None:
        """Take the lease and return the (not yet started) session; ``None`` when another holder has it.

        Raises what the store raises when the lease cannot be read or written.
        """
        if not context.lease.acquire():
            return None
        return cls(id=uuid.uuid4().hex[:12], started_at=context.clock.now(), stop_event=stop_event,
                   window=window, context=context)

    @property
    def running(self) -> bool:
        return not self.done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the session ended; ``True`` when it did."""
        return self.done.wait(timeout)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the session ended and both its threads finished; ``True`` when they did in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        threads = [t for t in (self.thread, self.heartbeat) if t is not None and t is not threading.current_thread()]
        for thread in threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self.done.is_set() and not any(t.is_alive() for t in threads)

    def start(self) -> None:
        """Start the work thread and the heartbeat (both daemons: a stuck step never blocks an exit)."""
        self.thread = threading.Thread(target=self._run, name=f"madmax-session-{self.id}", daemon=True)
        self.heartbeat = threading.Thread(target=self._beat, name=f"madmax-heartbeat-{self.id}", daemon=True)
        self.thread.start()
        self.heartbeat.start()

    # -- the lease -----------------------------------------------------------------------------------

    def renew(self) -> bool:
        """Renew the lease; ``False`` once it is lost (then the session is told to stop, and the loss stored)."""
        ctx = self._ctx
        with self._lease_lock:
            if self._ending or self.lease_lost:
                return not self.lease_lost
            try:
                ok = ctx.lease.renew()
            except Exception:  # noqa: BLE001 - a DB hiccup: try again on the next beat
                logger.exception("could not renew the %s lease", ctx.lease.name)
                return True
            if not ok:
                self.lease_lost = True
        if not ok:
            holder = ctx.lease.current()
            who = f"now held by {holder.holder}" if holder is not None else "it was released"
            self.stop_event.set()
            ctx.record(
                "lease_lost",
                [f"lease {ctx.lease.name!r} could not be renewed ({who}); stopping the session"],
                {"session": self.id},
            )
        return ok

    def _release(self) -> None:
        with self._lease_lock:
            self._ending = True
            if not self.lease_lost:
                try:
                    self._ctx.lease.release()
                except Exception:  # noqa: BLE001 - it expires on its own
                    logger.exception("could not release the %s lease", self._ctx.lease.name)

    @property
    def _ctx(self) -> SessionContext:
        if self.context is None:
            msg = "this TrainingSession was not built by TrainingSession.acquire"
            raise RuntimeError(msg)
        return self.context

    # -- the threads ---------------------------------------------------------------------------------

    def _beat(self) -> None:
        """Renew the lease while the session runs; let the scheduler check the window on each beat."""
        ctx = self._ctx
        while not self.done.wait(ctx.heartbeat_interval):
            if not self.renew():
                return
            ctx.on_beat()

    def _run(self) -> None:
        started = time.monotonic()
        details: dict[str, Any] = {"session": self.id}
        try:
            self.scoring = _score(self._ctx, self.stop_event)
            details["scoring"] = self.scoring
            if self.stop_event.is_set():
                self.status, self.reason = "stopped", "window closed while scoring; nothing trained"
            else:
                details.update(self._train())
        except BaseException as exc:  # noqa: BLE001 - a session never takes the scheduler down
            logger.exception("madmax session %s failed", self.id)
            self.status, self.reason = "error", f"{type(exc).__name__}: {exc}"
        finally:
            self._finish(details, time.monotonic() - started)

    def _train(self) -> dict[str, Any]:
        """Build a trainer, run it until it is done or stopped, close it; the ``run_ended`` details."""
        trainer = self._ctx.trainer_factory()
        run: Any = None
        try:
            kwargs: dict[str, Any] = {"stop_event": self.stop_event}
            if accepts_keyword(trainer.run, "progress"):
                kwargs["progress"] = self._progress
            run = trainer.run(**kwargs)
        finally:
            _close_trainer(trainer, trained=max(self.steps, int(_field(run, "steps", 0) or 0)) > 0)
            del trainer  # its tensors are freed here, in this thread
        self.result = run
        self.status = str(_field(run, "status", "ok"))
        self.reason = _field(run, "reason")
        self.steps = int(_field(run, "steps", self.steps) or 0)
        metrics = _field(run, "metrics", {}) or {}
        return {
            "train_run": _field(run, "id"),
            "candidate_adapter": _field(run, "candidate_adapter"),
            "checkpoint": metrics.get("checkpoint") if isinstance(metrics, dict) else None,
            "metrics": metrics,
        }

    def _progress(self, step: int, total: int | None, metrics: dict[str, Any]) -> None:
        self.steps = int(step)
        self.total_steps = int(total) if total is not None else None
        self.last_metrics = dict(metrics or {})
        logger.info("madmax session %s: step %s/%s", self.id, step, total)

    def _finish(self, details: dict[str, Any], elapsed: float) -> None:
        ctx = self._ctx
        self.ended_at = ctx.clock.now()
        if self.lease_lost and self.status == "stopped":
            self.reason = f"lease lost; {self.reason}" if self.reason else "lease lost"
        details.update(status=self.status, reason=self.reason, steps=self.steps,
                       duration_s=round(elapsed, 3), lease_lost=self.lease_lost)
        ctx.record("run_ended", [f"{self.status}: {self.reason or 'no reason given'}"], details)
        self._release()
        ctx.on_end(self)
        self.done.set()


def default_trainer_factory(store: TraceStore, config: TrainerConfig | None = None) -> Callable[[], Any]:
    """``Trainer(store, config or TrainerConfig())``, built fresh for every session (imported when first used)."""

    def factory() -> Any:
        from langchain_metaclaw.training.trainer import Trainer, TrainerConfig

        return Trainer(store, config or TrainerConfig())

    return factory


def _score(ctx: SessionContext, stop_event: threading.Event) -> dict[str, Any]:
    """Score what is pending before training (``score_fn``; default ``score_pending``); never raises."""
    fn = ctx.score_fn
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
        report = fn(ctx.store, stop_event=stop_event) if accepts_keyword(fn, "stop_event") else fn(ctx.store)
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


def _close_trainer(trainer: Any, *, trained: bool) -> None:
    """Free what the trainer holds (its training backend: the model, the optimizer) in this thread.

    Calls ``trainer.close()`` when the trainer has one; else ``trainer.backend.close()``, but only after a
    step ran (``trained``): ``Trainer.backend`` builds the backend on first access, and a run that was
    skipped never built one. A failure is logged: the run's outcome stands.
    """
    try:
        close = getattr(trainer, "close", None)
        if not callable(close) and trained:
            close = getattr(getattr(trainer, "backend", None), "close", None)
        if callable(close):
            close()
    except Exception:  # noqa: BLE001 - see docstring
        logger.exception("closing the trainer failed")


def _field(result: Any, name: str, default: Any = None) -> Any:
    if isinstance(result, dict):
        return result.get(name, default)
    return getattr(result, name, default)
