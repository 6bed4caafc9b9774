"""MadMaxScheduler on a fake clock and plain signal values: windows start and stop sessions, every
decision is stored, the lease keeps two schedulers on one store from training at once."""

from __future__ import annotations

import logging
import pickle
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from sqlalchemy import text, update

from langchain_metaclaw.schedule import MadMaxScheduler, WindowPolicy, WindowSignals, recent_events
from langchain_metaclaw.schedule.clock import FakeClock
from langchain_metaclaw.schedule.jobs import JOBSTORE_TABLE
from langchain_metaclaw.schedule.lease import acquire, current
from langchain_metaclaw.schedule.report import scheduler_status
from langchain_metaclaw.schedule.scheduler import _watchdog_job
from langchain_metaclaw.store import TraceStore
from langchain_metaclaw.store.schema import leases

T0 = datetime(2025, 6, 10, 12, 0, tzinfo=UTC)
IDLE = WindowPolicy(idle_minutes=10, timezone="UTC")


class User:
    """Idle time follows the fake clock; ``types()`` is the user coming back."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.last_input = clock.now()

    def types(self) -> None:
        self.last_input = self.clock.now()

    def signals(self, now: datetime) -> WindowSignals:
        return WindowSignals(idle_seconds=(now - self.last_input).total_seconds())


class GatedTrainer:
    """Trains 'steps' until the stop event is set (or ``finish`` is), like the real trainer's loop."""

    def __init__(self, *, status_when_done: str = "ok") -> None:
        self.started = threading.Event()
        self.finish = threading.Event()
        self.runs = 0
        self.status_when_done = status_when_done

    def run(self, max_steps=None, stop_event=None, progress=None):
        self.runs += 1
        self.started.set()
        step = 0
        while True:
            if stop_event.is_set():
                return SimpleNamespace(id=f"run-{self.runs}", status="stopped", steps=step,
                                       reason=f"stop requested before step {step + 1}",
                                       metrics={"checkpoint": f"/ckpt/{self.runs}"}, candidate_adapter=None)
            if self.finish.is_set():
                return SimpleNamespace(id=f"run-{self.runs}", status=self.status_when_done, steps=step,
                                       reason="done", metrics={}, candidate_adapter=None)
            step += 1
            if progress is not None:
                progress(step, 1000, {"loss": 0.5})
            time.sleep(0.005)


def no_scoring(store, stop_event=None):
    return None


def make(store, clock, user, trainer, **kwargs) -> MadMaxScheduler:
    kwargs.setdefault("score_fn", no_scoring)
    kwargs.setdefault("holder", "A")
    return MadMaxScheduler(store, IDLE, trainer_factory=lambda: trainer, signals=user.signals, clock=clock,
                           check_interval=5, **kwargs)


def events(store) -> list[str]:
    return [e.event for e in reversed(recent_events(store, 100))]


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


# --------------------------------------------------------------------------------------------------


def test_window_opens_session_starts_user_returns_event_set_next_window_resumes(store, caplog):
    caplog.set_level(logging.INFO, logger="langchain_metaclaw.schedule")
    clock = FakeClock(T0)
    user, trainer = User(clock), GatedTrainer()
    madmax = make(store, clock, user, trainer)

    assert madmax.tick().open is False and madmax.session is None
    clock.advance(minutes=11)
    assert madmax.tick().open is True
    session = madmax.session
    assert session is not None and trainer.started.wait(5)
    assert current(store, "madmax").holder == "A"
    assert current(store, "madmax").expires_at == clock.now() + timedelta(seconds=10)  # ttl = 2 x interval
    wait_for(lambda: session.steps >= 2)

    clock.advance(seconds=5)
    madmax.tick()  # still open: the lease is renewed, nothing else is written
    assert current(store, "madmax").expires_at == clock.now() + timedelta(seconds=10)
    assert not session.stop_event.is_set()

    user.types()  # the user is back
    clock.advance(seconds=1)
    assert madmax.tick().open is False
    assert session.stop_event.is_set()
    assert session.wait(5)
    assert session.status == "stopped" and session.reason.startswith("stop requested before step")
    assert current(store, "madmax") is None  # released
    assert madmax.session is None

    stored = list(reversed(recent_events(store, 100)))
    assert [e.event for e in stored] == ["closed", "opened", "run_started", "closed", "run_ended"]
    first_closed, opened, started, closed, ended = stored
    assert first_closed.reasons == ["idle 0 s < 10"] and first_closed.details["initial"] is True
    assert opened.reasons == ["idle 11 min >= 10"] and opened.at == T0 + timedelta(minutes=11)
    assert started.details["session"] == session.id and started.details["holder"] == "A"
    assert closed.reasons == ["idle 1 s < 10"] and closed.details["stopping_session"] == session.id
    assert ended.details["status"] == "stopped" and ended.details["checkpoint"] == "/ckpt/1"
    assert ended.details["steps"] == session.steps >= 2 and ended.details["train_run"] == "run-1"
    assert ended.reasons == [f"stopped: {session.reason}"]
    assert "madmax opened: idle 11 min >= 10" in caplog.text

    # the next window: training runs again (the trainer resumes from the store)
    clock.advance(minutes=10, seconds=30)
    madmax.tick()
    second = madmax.session
    assert second is not None and second is not session and trainer.runs == 2
    assert not second.stop_event.is_set()
    madmax.stop()
    assert second.status == "stopped"
    assert events(store)[5:] == ["opened", "run_started", "run_ended"]


def test_one_session_per_window_unless_the_cooldown_passed(store):
    clock = FakeClock(T0)
    user, trainer = User(clock), GatedTrainer()
    trainer.finish.set()  # every run ends at once with "ok"
    madmax = make(store, clock, user, trainer, session_cooldown=600)
    clock.advance(minutes=11)
    madmax.tick()
    assert madmax.last_session.wait(5) and madmax.last_session.status == "ok"
    clock.advance(minutes=5)
    madmax.tick()  # the window is still open, but the cooldown has not passed
    assert trainer.runs == 1 and madmax.session is None
    clock.advance(minutes=5)
    madmax.tick()
    assert madmax.last_session.wait(5) and trainer.runs == 2

    quick = GatedTrainer()
    quick.finish.set()
    once = make(store, clock, user, quick, session_cooldown=None, holder="B")
    once.tick()
    assert once.last_session.wait(5)
    clock.advance(hours=3)
    once.tick()
    assert len(once.sessions) == 1  # one per window
    user.types()
    once.tick()
    clock.advance(minutes=11)
    once.tick()
    assert once.last_session.wait(5) and len(once.sessions) == 2  # a new window starts at once


def test_two_schedulers_on_one_store_never_train_at_once(store):
    clock = FakeClock(T0)
    user = User(clock)
    ta, tb = GatedTrainer(), GatedTrainer()
    a = make(store, clock, user, ta, holder="A")
    b = make(store, clock, user, tb, holder="B")
    clock.advance(minutes=11)
    a.tick()
    b.tick()
    assert a.session is not None and b.session is None and ta.started.wait(5)
    skipped = recent_events(store, 1, event="skipped")[0]
    assert skipped.details["holder"] == "B" and skipped.details["lease_holder"] == "A"
    assert skipped.reasons[0].startswith("lease 'madmax' held by A until ")
    assert "another scheduler is training" in skipped.reasons[0] and skipped.reasons[1] == "idle 11 min >= 10"

    for _ in range(3):  # A keeps renewing; B keeps waiting and does not log the same skip again
        clock.advance(seconds=5)
        a.tick()
        b.tick()
        assert b.session is None
    assert len(recent_events(store, 100, event="skipped")) == 1

    user.types()
    a.tick()
    b.tick()
    assert a.last_session.wait(5)
    clock.advance(minutes=11)
    b.tick()  # B first this time
    a.tick()
    assert b.session is not None and a.session is None and tb.started.wait(5)
    assert current(store, "madmax").holder == "B"
    b.stop()
    a.stop()
    assert ta.runs == 1 and tb.runs == 1


def test_racing_schedulers_start_exactly_one_session(store_url):
    clock = FakeClock(T0)
    user = User(clock)
    stores = [TraceStore(store_url) for _ in range(3)]
    trainers = [GatedTrainer() for _ in stores]
    schedulers = [make(s, clock, user, t, holder=f"S{i}") for i, (s, t) in enumerate(zip(stores, trainers, strict=True))]
    try:
        for _ in range(3):
            clock.advance(minutes=11)
            barrier = threading.Barrier(len(schedulers))

            def check(s: MadMaxScheduler, barrier: threading.Barrier) -> None:
                barrier.wait()
                s.tick()

            threads = [threading.Thread(target=check, args=(s, barrier)) for s in schedulers]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            running = [s for s in schedulers if s.session is not None]
            assert len(running) == 1
            user.types()
            for s in schedulers:
                s.tick()
            assert running[0].last_session.wait(5)
            assert current(stores[0], "madmax") is None
    finally:
        for s in schedulers:
            s.stop()
        for s in stores:
            s.close()


def test_a_crashed_holder_blocks_until_its_lease_expires(store):
    clock = FakeClock(T0)
    user, trainer = User(clock), GatedTrainer()
    clock.advance(minutes=11)
    assert acquire(store, "madmax", "crashed:4242", 10, now=clock.now())  # then it died without releasing
    madmax = make(store, clock, user, trainer)
    madmax.tick()
    assert madmax.session is None
    clock.advance(seconds=9)
    madmax.tick()
    assert madmax.session is None
    clock.advance(seconds=1)
    madmax.tick()
    assert madmax.session is not None and trainer.started.wait(5)
    assert events(store) == ["opened", "skipped", "run_started"]
    assert recent_events(store, 1, event="skipped")[0].details["lease_holder"] == "crashed:4242"
    madmax.stop()


def test_losing_the_lease_stops_the_session(store):
    clock = FakeClock(T0)
    user, trainer = User(clock), GatedTrainer()
    madmax = make(store, clock, user, trainer)
    clock.advance(minutes=11)
    madmax.tick()
    session = madmax.session
    assert trainer.started.wait(5)
    with store.engine.begin() as conn:  # e.g. this process was suspended and another one took over
        conn.execute(update(leases).values(holder="thief"))
    clock.advance(seconds=5)
    madmax.tick()
    assert session.wait(5) and session.lease_lost
    assert session.status == "stopped" and session.reason.startswith("lease lost; stop requested")
    lost = recent_events(store, 1, event="lease_lost")[0]
    assert "now held by thief" in lost.reasons[0]
    assert current(store, "madmax").holder == "thief"  # not released: it is not ours


def test_scoring_runs_first_with_the_stop_event_and_its_report_is_recorded(store):
    clock = FakeClock(T0)
    user, trainer = User(clock), GatedTrainer()
    trainer.finish.set()
    calls = []

    class Report:
        def summary(self):
            return "prm: 3 scored"

    def score(s, *, stop_event):
        calls.append((s, stop_event, trainer.runs))
        return Report()

    madmax = make(store, clock, user, trainer, score_fn=score)
    clock.advance(minutes=11)
    madmax.tick()
    session = madmax.last_session
    assert session.wait(5)
    assert calls == [(store, session.stop_event, 0)]  # before the trainer ran
    ended = recent_events(store, 1, event="run_ended")[0]
    assert ended.details["scoring"]["status"] == "ok" and ended.details["scoring"]["summary"] == "prm: 3 scored"
    assert ended.details["status"] == "ok"


def test_failed_scoring_is_recorded_and_training_goes_on(store):
    clock = FakeClock(T0)
    user, trainer = User(clock), GatedTrainer()
    trainer.finish.set()

    def broken(s):  # no stop_event parameter: called without it
        raise RuntimeError("judge down")

    madmax = make(store, clock, user, trainer, score_fn=broken)
    clock.advance(minutes=11)
    madmax.tick()
    assert madmax.last_session.wait(5)
    ended = recent_events(store, 1, event="run_ended")[0]
    assert ended.details["scoring"] == {"status": "error", "reason": "RuntimeError: judge down",
                                        "elapsed_s": ended.details["scoring"]["elapsed_s"]}
    assert trainer.runs == 1 and ended.details["status"] == "ok"


def test_default_scoring_unavailable_is_skipped_with_a_reason(store, monkeypatch):
    monkeypatch.setitem(sys.modules, "langchain_metaclaw.scoring.scorer", None)  # import fails
    clock = FakeClock(T0)
    user, trainer = User(clock), GatedTrainer()
    trainer.finish.set()
    madmax = make(store, clock, user, trainer, score_fn=None)
    clock.advance(minutes=11)
    madmax.tick()
    assert madmax.last_session.wait(5)
    scoring = recent_events(store, 1, event="run_ended")[0].details["scoring"]
    assert scoring["status"] == "skipped" and scoring["reason"].startswith("scoring unavailable: ModuleNotFoundError")
    assert trainer.runs == 1


def test_default_scoring_is_score_pending(store):
    clock = FakeClock(T0)
    user, trainer = User(clock), GatedTrainer()
    trainer.finish.set()
    madmax = make(store, clock, user, trainer, score_fn=None)
    clock.advance(minutes=11)
    madmax.tick()
    assert madmax.last_session.wait(30)
    scoring = recent_events(store, 1, event="run_ended")[0].details["scoring"]
    assert scoring["status"] == "ok", scoring
    assert scoring["report"]["scored"] == 0


def test_a_failing_trainer_is_recorded_and_the_lease_released(store):
    clock = FakeClock(T0)
    user = User(clock)

    class Broken:
        def run(self, stop_event=None):  # no progress parameter: called without it
            raise ValueError("no backend")

    madmax = MadMaxScheduler(store, IDLE, trainer_factory=Broken, score_fn=no_scoring, signals=user.signals,
                             clock=clock, holder="A")
    clock.advance(minutes=11)
    madmax.tick()
    session = madmax.last_session
    assert session.wait(5) and (session.status, session.reason) == ("error", "ValueError: no backend")
    assert current(store, "madmax") is None
    assert recent_events(store, 1, event="run_ended")[0].reasons == ["error: ValueError: no backend"]


def test_a_window_kept_shut_by_a_guard_is_logged_as_skipped_once_per_cause(store):
    clock = FakeClock(T0)
    state = {"idle": 0.0, "rpm": 5.0, "battery": False}

    def signals(now):
        return WindowSignals(idle_seconds=state["idle"], requests_per_minute=state["rpm"],
                             on_battery=state["battery"])

    policy = WindowPolicy(idle_minutes=10, max_requests_per_minute=2, skip_on_battery=True, timezone="UTC")
    trainer = GatedTrainer()
    madmax = MadMaxScheduler(store, policy, trainer_factory=lambda: trainer, score_fn=no_scoring,
                             signals=signals, clock=clock, holder="A")
    madmax.tick()  # not idle: closed, nothing skipped
    state["idle"] = 700
    madmax.tick()  # idle, but serving load is too high: a skipped window
    madmax.tick()
    state["rpm"] = 6
    madmax.tick()  # same cause, different number: not logged again
    state["battery"] = True
    madmax.tick()  # a second guard: logged
    state.update(rpm=0, battery=False)
    madmax.tick()  # open
    assert madmax.session is not None and trainer.started.wait(5)
    state["rpm"] = 9
    madmax.tick()  # closed by the load guard: the closed event says why, no extra skip
    madmax.tick()
    assert madmax.last_session.wait(5)
    stored = list(reversed(recent_events(store, 100)))
    assert [e.event for e in stored] == [
        "closed", "skipped", "skipped", "opened", "run_started", "closed", "run_ended"
    ]
    load_skip, both_skip = stored[1], stored[2]
    assert load_skip.details == {"holder": "A", "cause": "guard", "blocked_by": ["load"]}
    assert load_skip.reasons == ["load 5 req/min >= 2", "idle 11 min >= 10"]
    assert both_skip.details["blocked_by"] == ["battery", "load"] and "on battery" in both_skip.reasons
    assert stored[5].reasons[0] == "load 9 req/min >= 2"
    madmax.stop()


def test_signal_errors_close_the_window_and_say_why(store):
    clock = FakeClock(T0)

    def broken(now):
        raise OSError("no display")

    madmax = MadMaxScheduler(store, IDLE, trainer_factory=GatedTrainer, score_fn=no_scoring, signals=broken,
                             clock=clock)
    assert madmax.tick().open is False
    assert recent_events(store, 1)[0].reasons == ["signals failed: OSError: no display"]


def test_status_reports_window_next_window_lease_events_and_detectors(store):
    clock = FakeClock(datetime(2025, 6, 10, 21, 0, tzinfo=UTC))
    policy = WindowPolicy(idle_minutes=10, sleep_hours="23:00-07:00", timezone="UTC")
    trainer = GatedTrainer()
    madmax = MadMaxScheduler(store, policy, trainer_factory=lambda: trainer, score_fn=no_scoring,
                             signals=WindowSignals(idle_seconds=30), clock=clock, holder="A")
    madmax.tick()

    class Detector:
        name = "fake"

        def available(self):
            return True

        def idle_seconds(self):
            return 3.0

    from langchain_metaclaw.schedule import SystemSignals

    signals = SystemSignals(idle=None, detectors=[Detector()])
    report = scheduler_status(store, policy, signals, now=clock.now())
    assert report["window"]["open"] is False
    assert report["next_window"] == datetime(2025, 6, 10, 23, 0, tzinfo=UTC)
    assert report["next_window_note"] == "from sleep hours and the calendar; idle may open one sooner"
    assert report["lease"] is None and report["training"] is False
    assert [e["event"] for e in report["events"]] == ["closed"]
    assert report["last_run"] is None
    assert report["detectors"] == [{"detector": "fake", "available": True, "reason": "idle 3.0 s"}]
    assert report["jobs"] == [] and report["scheduler_alive"] is None

    clock.set(datetime(2025, 6, 10, 23, 30, tzinfo=UTC))
    madmax.tick()
    assert trainer.started.wait(5)
    report = madmax.status()
    assert report["window"]["open"] is True and report["next_window"] == clock.now()
    assert report["training"] is True and report["lease"]["holder"] == "A"
    assert report["session"]["id"] == madmax.session.id
    assert [e["event"] for e in report["events"]][:2] == ["run_started", "opened"]
    madmax.stop()
    report = scheduler_status(store, policy, WindowSignals(idle_seconds=0), now=clock.now(), probe_detectors=False)
    assert report["last_run"]["details"]["status"] == "stopped" and report["training"] is False
    assert report["detectors"] == []


# --------------------------------------------------------------------------------------------------
# APScheduler in real time, with its job store in the trace database
# --------------------------------------------------------------------------------------------------


def job_rows(store) -> list[tuple[str, dict]]:
    with store.engine.connect() as conn:
        rows = conn.execute(text(f"SELECT id, job_state FROM {JOBSTORE_TABLE} ORDER BY id")).all()
    return [(r.id, pickle.loads(r.job_state)) for r in rows]


def test_background_scheduler_persists_one_watchdog_job_and_restarts_cleanly(store):
    open_window = WindowSignals(idle_seconds=10**6)
    trainer = GatedTrainer()
    madmax = MadMaxScheduler(store, IDLE, trainer_factory=lambda: trainer, score_fn=no_scoring,
                             signals=open_window, check_interval=0.1, holder="first")
    madmax.start()
    try:
        assert madmax.running and trainer.started.wait(10)
        rows = job_rows(store)
        assert [r[0] for r in rows] == ["madmax-watchdog"]
        state = rows[0][1]
        assert state["func"] == "langchain_metaclaw.schedule.scheduler:_watchdog_job"
        assert state["args"] == (madmax._key,) and state["max_instances"] == 1 and state["coalesce"] is True
        assert state["trigger"].interval == timedelta(seconds=0.1)
        first = madmax.session
        wait_for(lambda: current(store, "madmax").expires_at > first.started_at + timedelta(seconds=0.2))
        live = scheduler_status(store, IDLE, open_window, probe_detectors=False)
        assert live["scheduler_alive"] is True and live["training"] is True
        assert live["jobs"][0]["id"] == "madmax-watchdog"
    finally:
        madmax.stop()
    assert not madmax.running and first.status == "stopped"
    assert scheduler_status(store, IDLE, open_window, probe_detectors=False)["scheduler_alive"] is False
    assert current(store, "madmax") is None
    assert events(store) == ["scheduler_started", "opened", "run_started", "run_ended", "scheduler_stopped"]
    assert len(job_rows(store)) == 1  # the job survives the stop, in the database

    again = MadMaxScheduler(store, IDLE, trainer_factory=lambda: trainer, score_fn=no_scoring,
                            signals=open_window, check_interval=0.1, holder="second")
    again.start()
    try:
        wait_for(lambda: trainer.runs == 2)
        assert [r[0] for r in job_rows(store)] == ["madmax-watchdog"]  # replaced, not duplicated
        assert again.session is not None and current(store, "madmax").holder == "second"
    finally:
        again.stop()
    assert recent_events(store, 1)[0].event == "scheduler_stopped"


def test_an_in_memory_store_survives_the_scheduler(tmp_path):
    store = TraceStore("sqlite://")
    madmax = MadMaxScheduler(store, IDLE, trainer_factory=GatedTrainer, score_fn=no_scoring,
                             signals=WindowSignals(idle_seconds=0), check_interval=0.05)
    madmax.start()
    wait_for(lambda: len(recent_events(store, 10)) >= 2)
    madmax.stop()
    # the job store's shutdown must not dispose the shared engine (the StaticPool connection is the database)
    assert events(store) == ["scheduler_started", "closed", "scheduler_stopped"]
    assert [r[0] for r in job_rows(store)] == ["madmax-watchdog"]


def test_the_job_does_nothing_in_a_process_without_its_scheduler():
    _watchdog_job("madmax@0000000000000000")  # no error, nothing to tick


def test_a_scheduler_cannot_start_twice(store):
    madmax = MadMaxScheduler(store, IDLE, trainer_factory=GatedTrainer, score_fn=no_scoring,
                             signals=WindowSignals(idle_seconds=0), check_interval=1)
    madmax.start()
    try:
        with pytest.raises(RuntimeError, match="already started"):
            madmax.start()
    finally:
        madmax.stop()
    madmax.stop()  # idempotent


def test_the_training_heartbeat_checks_the_window_when_the_job_runs_elsewhere(store):
    # APScheduler 3 lets any process sharing the job store run the watchdog job; the training process
    # must still notice the window closing. Here the job stops reaching this process altogether.
    state = {"idle": 10.0**6}
    trainer = GatedTrainer()
    madmax = MadMaxScheduler(store, IDLE, trainer_factory=lambda: trainer, score_fn=no_scoring,
                             signals=lambda now: WindowSignals(idle_seconds=state["idle"]),
                             check_interval=0.1, holder="A")
    madmax.start()
    try:
        assert trainer.started.wait(10)
        session = madmax.session
        madmax._scheduler.pause_job(madmax.job_id)
        time.sleep(0.3)
        assert session.running
        state["idle"] = 0.0  # the user is back; only the heartbeat can see it now
        assert session.wait(10) and session.status == "stopped"
        assert recent_events(store, 1, event="closed")[0].details["stopping_session"] == session.id
    finally:
        madmax.stop()


# ------------------------------------------------------------------------------------- stop() and the trainer


class ClosingTrainer(GatedTrainer):
    """A GatedTrainer whose training backend records when it is closed, and by which thread."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.backend = SimpleNamespace(closed_by=None, close=self._close)

    def _close(self) -> None:
        time.sleep(0.2)  # freeing a model takes a while; stop() must wait for it
        self.backend.closed_by = threading.current_thread().name


def test_stop_closes_the_trainer_and_joins_the_session_threads(store):
    clock = FakeClock(T0)
    user, trainer = User(clock), ClosingTrainer()
    madmax = make(store, clock, user, trainer)
    clock.advance(minutes=11)
    assert madmax.tick().open
    session = madmax.session
    wait_for(lambda: session.steps >= 1)

    assert madmax.stop() is session
    assert session.status == "stopped"
    assert trainer.backend.closed_by == session.thread.name  # freed in the session's own thread
    assert not session.thread.is_alive() and not session.heartbeat.is_alive()
    assert current(store, "madmax") is None


def test_stop_joins_a_session_that_already_ended(store):
    """The race behind the SIGABRT: the session reported its end, its thread still frees the trainer."""
    clock = FakeClock(T0)
    user, trainer = User(clock), ClosingTrainer()
    madmax = make(store, clock, user, trainer)
    clock.advance(minutes=11)
    madmax.tick()
    session = madmax.last_session
    wait_for(lambda: session.steps >= 1)
    trainer.finish.set()
    assert session.wait(10) and madmax.session is None  # ended: the scheduler no longer calls it running
    madmax.stop()
    assert session.status == "ok" and trainer.backend.closed_by == session.thread.name
    assert not session.thread.is_alive() and not session.heartbeat.is_alive()


def test_a_run_that_never_trained_does_not_build_a_backend_to_close_it(store):
    class LazyBackendTrainer:
        built = False

        @property
        def backend(self):
            type(self).built = True
            raise AssertionError("the backend was built only to be closed")

        def run(self, stop_event=None):
            return {"status": "skipped", "reason": "no scored turns yet", "steps": 0}

    clock = FakeClock(T0)
    madmax = MadMaxScheduler(store, IDLE, trainer_factory=LazyBackendTrainer, score_fn=no_scoring,
                             signals=User(clock).signals, clock=clock)
    clock.advance(minutes=11)
    madmax.tick()
    session = madmax.last_session
    madmax.stop()
    assert (session.status, session.reason) == ("skipped", "no scored turns yet")
    assert not LazyBackendTrainer.built


def test_a_trainer_with_close_is_closed_with_it(store):
    closed = threading.Event()

    class Trainer:
        def run(self, stop_event=None):
            return {"status": "ok", "steps": 0}

        def close(self):
            closed.set()

    clock = FakeClock(T0)
    madmax = MadMaxScheduler(store, IDLE, trainer_factory=Trainer, score_fn=no_scoring,
                             signals=User(clock).signals, clock=clock)
    clock.advance(minutes=11)
    madmax.tick()
    madmax.stop()
    assert closed.is_set()
