"""The watchdog on a fake clock, the signal gathering, and a trainer loop stopped between steps."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from langchain_metaclaw.schedule.calendar import CalendarSource, Interval
from langchain_metaclaw.schedule.clock import FakeClock
from langchain_metaclaw.schedule.idle import DetectionResult
from langchain_metaclaw.schedule.idle_os import IdleUnavailable
from langchain_metaclaw.schedule.signals import SystemSignals, battery_status
from langchain_metaclaw.schedule.watchdog import Watchdog
from langchain_metaclaw.schedule.windows import WindowDecision, WindowPolicy, WindowSignals

DATA = Path(__file__).parent / "data"
BERLIN = ZoneInfo("Europe/Berlin")


def berlin(*args: int) -> datetime:
    return datetime(*args, tzinfo=BERLIN)


class User:
    """A fake user whose idle time follows the fake clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.last_input = clock.now()

    def types(self) -> None:
        self.last_input = self.clock.now()

    def signals(self, now: datetime) -> WindowSignals:
        return WindowSignals(idle_seconds=(now - self.last_input).total_seconds())


def test_watchdog_sets_the_stop_event_when_the_user_returns(caplog):
    caplog.set_level(logging.INFO, logger="langchain_metaclaw.schedule.windows")
    clock = FakeClock(berlin(2025, 6, 10, 12, 0))
    user = User(clock)
    seen: list[WindowDecision] = []
    dog = Watchdog(
        WindowPolicy(idle_minutes=10, timezone="Europe/Berlin"), user.signals, clock, on_decision=seen.append
    )

    clock.advance(minutes=5)
    assert dog.check().open is False
    assert not dog.stop_event.is_set()  # never opened: nothing to stop

    clock.advance(minutes=7)
    opened = dog.check()
    assert (opened.open, opened.reasons) == (True, ["idle 12 min >= 10"])
    clock.advance(seconds=5)
    assert dog.check().open is True  # no transition, no callback
    assert not dog.stop_event.is_set()

    user.types()  # the user is back
    clock.advance(seconds=5)
    closed = dog.check()
    assert (closed.open, closed.reasons) == (False, ["idle 5 s < 10"])
    assert dog.stop_event.is_set()
    assert dog.transitions == 2
    assert [d.open for d in seen] == [False, True, False]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "no training window: idle 5 min < 10",
        "training window open: idle 12 min >= 10",
        "training window closed: idle 5 s < 10",
    ]


def test_watchdog_closes_at_the_calendar_margin():
    clock = FakeClock(berlin(2025, 4, 2, 13, 58))
    busy = [Interval(berlin(2025, 4, 2, 14), berlin(2025, 4, 2, 15), "Team sync")]
    dog = Watchdog(
        WindowPolicy(calendar=True, timezone="Europe/Berlin"), lambda now: WindowSignals(busy=busy), clock
    )
    assert dog.check().open is False
    clock.set(berlin(2025, 4, 2, 14, 0))
    opened = dog.check()
    assert opened.open is True
    assert opened.closes_at == datetime(2025, 4, 2, 12, 55, tzinfo=UTC)
    clock.set(berlin(2025, 4, 2, 14, 54, 59))
    assert dog.check().open is True
    assert not dog.stop_event.is_set()
    clock.advance(seconds=1)  # 14:55
    closed = dog.check()
    assert closed.reasons == ["calendar: 'Team sync' ends at 15:00, inside the 5 min margin"]
    assert dog.stop_event.is_set()


def test_watchdog_keeps_an_open_window_past_min_window_and_reset_rearms():
    clock = FakeClock(berlin(2025, 6, 10, 22, 59))
    policy = WindowPolicy(sleep_hours="23:00-07:00", timezone="Europe/Berlin", min_window_minutes=30)
    dog = Watchdog(policy, lambda now: WindowSignals(), clock)
    dog.check()
    clock.advance(minutes=1)
    assert dog.check().open is True
    clock.set(berlin(2025, 6, 11, 6, 50))  # 10 min left < 30: still open, because it is already open
    assert dog.check().open is True
    clock.set(berlin(2025, 6, 11, 7, 0))
    assert dog.check().open is False
    assert dog.stop_event.is_set()

    dog.reset()
    assert not dog.stop_event.is_set()
    clock.set(berlin(2025, 6, 11, 22, 59))
    assert dog.check().open is False
    assert not dog.stop_event.is_set()
    clock.set(berlin(2025, 6, 11, 23, 0))
    assert dog.check().open is True
    clock.set(berlin(2025, 6, 12, 7, 0))
    dog.check()
    assert dog.stop_event.is_set()


def test_failing_signals_close_the_window_and_a_failing_callback_is_contained(caplog):
    clock = FakeClock(berlin(2025, 6, 10, 12))
    state = {"fail": False}

    def signals(now):
        if state["fail"]:
            raise OSError("store is gone")
        return WindowSignals(idle_seconds=3600)

    def callback(decision):
        raise RuntimeError("persisting failed")

    dog = Watchdog(WindowPolicy(idle_minutes=10), signals, clock, on_decision=callback)
    with caplog.at_level(logging.ERROR, logger="langchain_metaclaw.schedule.windows"):
        assert dog.check().open is True
        state["fail"] = True
        decision = dog.check()
    assert (decision.open, decision.reasons) == (False, ["signals failed: OSError: store is gone"])
    assert dog.stop_event.is_set()
    assert "on_decision callback failed" in caplog.text


def test_a_trainer_stops_between_steps_when_the_window_closes():
    clock = FakeClock(berlin(2025, 6, 10, 12))
    user = User(clock)
    clock.advance(minutes=15)
    dog = Watchdog(WindowPolicy(idle_minutes=10), user.signals, clock)
    assert dog.check().open is True
    steps = []
    started = threading.Event()

    def trainer(max_steps: int, stop_event: threading.Event) -> None:  # Trainer.run's shape
        for step in range(max_steps):
            if stop_event.is_set():
                return
            steps.append(step)
            started.set()
            stop_event.wait(0.001)

    thread = threading.Thread(target=trainer, args=(1_000_000, dog.stop_event))
    thread.start()
    assert started.wait(5)
    user.types()
    dog.check()
    thread.join(5)
    assert not thread.is_alive()
    assert 0 < len(steps) < 1_000_000


# --------------------------------------------------------------------------------------- SystemSignals


class FakeDetector:
    def __init__(self, name, values):
        self.name = name
        self.values = list(values)
        self.calls = 0

    def available(self):
        return True

    def idle_seconds(self):
        self.calls += 1
        value = self.values.pop(0) if len(self.values) > 1 else self.values[0]
        if isinstance(value, Exception):
            raise value
        return value


def test_system_signals_pick_a_detector_and_redetect_after_a_failure():
    down = FakeDetector("down", [IdleUnavailable("down", "no session bus")])
    flaky = FakeDetector("flaky", [30.0, 31.0, IdleUnavailable("flaky", "service restarted"), 40.0])
    signals = SystemSignals(detectors=[down, flaky])
    now = datetime(2025, 6, 10, 12, tzinfo=UTC)
    assert signals(now).idle_seconds == 31.0  # the probe read 30, then the first real read 31
    assert signals.detection == [
        DetectionResult("down", False, "no session bus"),
        DetectionResult("flaky", True, "idle 30.0 s"),
    ]
    failed = signals(now)
    assert (failed.idle_seconds, failed.idle_error) == (None, "idle detector flaky: service restarted")
    assert signals(now).idle_seconds == 40.0  # re-detected at once after the failure


def test_system_signals_with_no_detector_say_why_and_retry_later():
    down = FakeDetector("down", [IdleUnavailable("down", "no session bus")])
    signals = SystemSignals(detectors=[down], redetect_after=timedelta(minutes=10))
    now = datetime(2025, 6, 10, 12, tzinfo=UTC)
    first = signals(now)
    assert first.idle_seconds is None
    assert first.idle_error == "no idle detector available: down: no session bus"
    signals(now + timedelta(minutes=5))
    assert down.calls == 1
    signals(now + timedelta(minutes=10))
    assert down.calls == 2
    decision = WindowPolicy(idle_minutes=10).evaluate(now, first)
    assert decision.reasons == ["no idle detector available: down: no session bus"]


def test_system_signals_gather_calendar_load_and_battery():
    calendar = CalendarSource(DATA / "mixed_events.ics", tz="Europe/Berlin")
    calls = []

    def rpm():
        calls.append(1)
        return 1.5

    signals = SystemSignals(
        idle=FakeDetector("fixed", [700.0]),
        calendar=calendar,
        requests_per_minute=rpm,
        battery=True,
        battery_reader=lambda: (False, "on AC power"),
    )
    now = datetime(2025, 4, 1, 13, 10, tzinfo=UTC)
    got = signals(now)
    assert got.idle_seconds == 700.0
    assert "Release call" in [i.summary for i in got.busy]
    assert (got.requests_per_minute, got.on_battery, got.battery_note) == (1.5, False, "on AC power")
    policy = WindowPolicy(
        calendar=True,
        idle_minutes=10,
        max_requests_per_minute=2,
        skip_on_battery=True,
        timezone="Europe/Berlin",
    )
    decision = policy.evaluate(now, got)
    assert decision.open is True
    assert decision.reasons == [
        "idle 11 min >= 10",
        "calendar: 'Release call' until 15:25 (ends 15:30, 5 min margin)",
        "load 1.5 req/min < 2",
        "on AC power",
    ]


def test_system_signals_turn_failures_into_reasons(tmp_path):
    def broken_rpm():
        raise ConnectionError("store offline")

    signals = SystemSignals(
        idle=None, calendar=CalendarSource(tmp_path / "missing.ics"), requests_per_minute=broken_rpm
    )
    got = signals(datetime(2025, 4, 1, tzinfo=UTC))
    assert got.idle_error == "no idle detector configured"
    assert got.calendar_error.startswith("file not found: ")
    assert got.load_error == "load signal failed: ConnectionError: store offline"
    assert got.battery_note == "battery not checked"


def test_for_policy_only_reads_what_the_policy_uses():
    policy = WindowPolicy(sleep_hours="23:00-07:00")
    signals = SystemSignals.for_policy(
        policy, calendar=CalendarSource("/nonexistent.ics"), requests_per_minute=5
    )
    assert (signals.idle, signals.calendar, signals.requests_per_minute, signals.battery) == (
        None,
        None,
        None,
        False,
    )
    idle_policy = WindowPolicy(idle_minutes=5, skip_on_battery=True, max_requests_per_minute=3)
    idle_signals = SystemSignals.for_policy(idle_policy, requests_per_minute=1)
    assert (idle_signals.idle, idle_signals.requests_per_minute, idle_signals.battery) == ("auto", 1, True)


def test_battery_status_never_raises():
    on_battery, note = battery_status()
    assert on_battery in (True, False, None)
    assert isinstance(note, str) and note


def test_battery_status_without_psutil(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_psutil(name, *args, **kwargs):
        if name == "psutil":
            raise ImportError("no psutil")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_psutil)
    assert battery_status() == (None, "psutil not installed")


@pytest.mark.parametrize(
    ("plugged", "expected"),
    [
        (True, (False, "on AC power")),
        (False, (True, "on battery")),
        (None, (None, "power source not reported")),
    ],
)
def test_battery_status_reads_psutil(monkeypatch, plugged, expected):
    psutil = pytest.importorskip("psutil")

    class Battery:
        percent = 50
        power_plugged = plugged

    monkeypatch.setattr(psutil, "sensors_battery", lambda: Battery())
    assert battery_status() == expected


def test_watchdog_through_the_spring_forward_night_minute_by_minute():
    clock = FakeClock(berlin(2025, 3, 29, 22, 50))
    dog = Watchdog(
        WindowPolicy(sleep_hours="23:00-07:00", timezone="Europe/Berlin"), lambda now: WindowSignals(), clock
    )
    opened_at = closed_at = None
    for _ in range(9 * 60):
        decision = dog.check()
        if decision.open and opened_at is None:
            opened_at = clock.now()
        if dog.stop_event.is_set() and closed_at is None:
            closed_at = clock.now()
        clock.advance(minutes=1)
    assert opened_at == datetime(2025, 3, 29, 22, 0, tzinfo=UTC)  # 23:00 CET
    assert closed_at == datetime(2025, 3, 30, 5, 0, tzinfo=UTC)  # 07:00 CEST
    assert closed_at - opened_at == timedelta(hours=7)
    assert dog.last_decision.reasons == ["outside sleep hours 23:00-07:00, next start 23:00"]


def test_policy_and_decision_pickle():
    import pickle

    policy = WindowPolicy(idle_minutes=10, sleep_hours="23:00-07:00", timezone="Europe/Berlin", mode="all")
    assert pickle.loads(pickle.dumps(policy)) == policy
    decision = policy.evaluate(berlin(2025, 6, 11, 3), WindowSignals(idle_seconds=900))
    assert pickle.loads(pickle.dumps(decision)) == decision
    assert WindowDecision.model_validate_json(decision.model_dump_json()) == decision
