"""Clocks and DST-safe local times."""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from langchain_metaclaw.schedule.clock import Clock, FakeClock, SystemClock, local_timezone, resolve_local

BERLIN = ZoneInfo("Europe/Berlin")


def test_fake_clock_travels():
    clock = FakeClock(datetime(2025, 3, 30, 1, 59, tzinfo=BERLIN), monotonic_start=10.0, tz=BERLIN)
    assert isinstance(clock, Clock)
    assert clock.advance(minutes=1) == datetime(2025, 3, 30, 3, 0, tzinfo=BERLIN)  # across the DST jump
    assert clock.now().utcoffset() == timedelta(hours=2)
    assert clock.monotonic() == 70.0
    clock.advance(timedelta(seconds=30))
    clock.advance(15)
    assert clock.monotonic() == 115.0
    clock.sleep(5)
    assert clock.monotonic() == 120.0
    assert FakeClock(datetime(2025, 3, 30, 1, 59, tzinfo=BERLIN)).now().tzinfo is UTC  # UTC by default


def test_fake_clock_set_moves_monotonic_only_forward():
    clock = FakeClock(datetime(2025, 1, 1, tzinfo=UTC), monotonic_start=0.0)
    clock.set(datetime(2025, 1, 1, 1, tzinfo=UTC))
    assert clock.monotonic() == 3600.0
    clock.set(datetime(2024, 12, 31, tzinfo=UTC))  # the wall clock jumps back (NTP, user change)
    assert clock.now() == datetime(2024, 12, 31, tzinfo=UTC)
    assert clock.monotonic() == 3600.0
    with pytest.raises(ValueError, match="cannot go backwards"):
        clock.advance(-1)
    with pytest.raises(ValueError, match="timezone-aware"):
        clock.set(datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="timezone-aware"):
        FakeClock(datetime(2025, 1, 1))


def test_fake_clock_is_thread_safe():
    clock = FakeClock(datetime(2025, 1, 1, tzinfo=UTC), monotonic_start=0.0)
    threads = [threading.Thread(target=lambda: [clock.advance(1) for _ in range(500)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert clock.monotonic() == 2000.0
    assert clock.now() == datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=2000)


def test_system_clock_is_aware_and_monotonic():
    clock = SystemClock()
    assert isinstance(clock, Clock)
    assert clock.now().tzinfo is UTC
    a = clock.monotonic()
    assert clock.monotonic() >= a
    assert SystemClock(BERLIN).now().tzinfo is BERLIN


@pytest.mark.parametrize(
    ("day", "at", "expected_utc"),
    [
        (date(2025, 6, 10), time(7, 0), datetime(2025, 6, 10, 5, 0, tzinfo=UTC)),
        (date(2025, 3, 30), time(2, 30), datetime(2025, 3, 30, 1, 0, tzinfo=UTC)),  # gap: the jump
        (date(2025, 3, 30), time(2, 0), datetime(2025, 3, 30, 1, 0, tzinfo=UTC)),
        (date(2025, 3, 30), time(3, 0), datetime(2025, 3, 30, 1, 0, tzinfo=UTC)),
        (date(2025, 10, 26), time(2, 30), datetime(2025, 10, 26, 0, 30, tzinfo=UTC)),  # repeated: first
        (date(2025, 10, 26), time(3, 0), datetime(2025, 10, 26, 2, 0, tzinfo=UTC)),
    ],
)
def test_resolve_local(day, at, expected_utc):
    assert resolve_local(day, at, BERLIN) == expected_utc


def test_local_timezone_follows_tz():
    code = "from langchain_metaclaw.schedule.clock import local_timezone; print(local_timezone())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"TZ": "Asia/Tokyo"}
    )
    assert out.stdout.strip() == "Asia/Tokyo"
    assert local_timezone() is not None
