"""ICS calendars: recurrence, EXDATE, DST, all-day dates, transparency, cancellations, links and caching."""

from __future__ import annotations

import logging
import os
import pickle
import stat
import threading
import time as _time
import urllib.error
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from langchain_metaclaw.schedule.calendar import (
    CalendarSource,
    CalendarUnavailable,
    Interval,
    _http_get,
    merge_intervals,
    redact_url,
)
from langchain_metaclaw.schedule.clock import FakeClock

DATA = Path(__file__).parent / "data"
BERLIN = ZoneInfo("Europe/Berlin")
SECRET_URL = "https://calendar.google.com/calendar/ical/ada%40example.com/private-0123456789abcdef/basic.ics"


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def spans(intervals: list[Interval]) -> list[tuple[str, str, str]]:
    """``(summary, start, end)`` in UTC ISO form, for exact comparison."""
    return [
        (i.summary, i.start.astimezone(UTC).isoformat(), i.end.astimezone(UTC).isoformat()) for i in intervals
    ]


def test_weekly_meeting_across_the_berlin_dst_change_with_exdate_moved_and_cancelled():
    cal = CalendarSource(DATA / "berlin_weekly_dst.ics", tz="Europe/Berlin")
    busy = cal.busy_intervals(utc(2025, 3, 17), utc(2025, 4, 30))
    assert spans(busy) == [
        ("Team sync", "2025-03-19T13:00:00+00:00", "2025-03-19T14:00:00+00:00"),  # 14:00 CET
        ("Team sync", "2025-03-26T13:00:00+00:00", "2025-03-26T14:00:00+00:00"),
        # clocks went forward on 2025-03-30: 14:00 local is now 12:00 UTC
        ("Team sync", "2025-04-02T12:00:00+00:00", "2025-04-02T13:00:00+00:00"),
        # 2025-04-09 is an EXDATE; 2025-04-16 was moved to 16:00; 2025-04-23 was cancelled
        ("Team sync (moved)", "2025-04-16T14:00:00+00:00", "2025-04-16T15:00:00+00:00"),
    ]
    assert all(not i.all_day for i in busy)
    assert {i.uid for i in busy} == {"7q1kq3b1c2d3e4f5g6h7i8j9k0@google.com"}
    assert busy[2].start.astimezone(BERLIN).hour == 14
    assert busy[2].start.tzinfo is UTC


def test_busy_intervals_overlapping_the_range_are_returned_unclipped():
    cal = CalendarSource(DATA / "berlin_weekly_dst.ics", tz="Europe/Berlin")
    busy = cal.busy_intervals(utc(2025, 4, 2, 12, 30), utc(2025, 4, 2, 12, 31))
    assert spans(busy) == [("Team sync", "2025-04-02T12:00:00+00:00", "2025-04-02T13:00:00+00:00")]
    assert cal.busy_intervals(utc(2025, 4, 2, 13, 0), utc(2025, 4, 2, 14, 0)) == []  # half-open


def test_all_day_transparent_cancelled_utc_duration_and_declined_events():
    cal = CalendarSource(DATA / "mixed_events.ics", tz="Europe/Berlin", attendee="Ada@Example.com")
    busy = cal.busy_intervals(utc(2025, 3, 29), utc(2025, 4, 5))
    assert spans(busy) == [
        # all-day on the DST day: local midnight to midnight is 23 hours
        ("Sunday hike", "2025-03-29T23:00:00+00:00", "2025-03-30T22:00:00+00:00"),
        ("1:1 with Sam", "2025-04-01T07:00:00+00:00", "2025-04-01T07:45:00+00:00"),  # DURATION:PT45M
        ("Release call", "2025-04-01T13:00:00+00:00", "2025-04-01T13:30:00+00:00"),  # a UTC event
        # two all-day dates, 2025-04-02 and 2025-04-03, in the user's zone
        ("Offsite", "2025-04-01T22:00:00+00:00", "2025-04-03T22:00:00+00:00"),
    ]
    # excluded: "Ada's birthday" and "Focus time" (TRANSP:TRANSPARENT), "Old planning" (STATUS:CANCELLED),
    # "Budget review" (declined by the configured attendee)
    assert [i.all_day for i in busy] == [True, False, False, True]
    assert busy[0].duration == timedelta(hours=23)


def test_declined_events_count_without_an_attendee():
    cal = CalendarSource(DATA / "mixed_events.ics", tz="Europe/Berlin")
    busy = cal.busy_intervals(utc(2025, 4, 1, 14), utc(2025, 4, 1, 15, 30))
    assert spans(busy) == [("Budget review", "2025-04-01T14:00:00+00:00", "2025-04-01T15:00:00+00:00")]


def test_all_day_events_follow_the_users_time_zone():
    cal = CalendarSource(DATA / "mixed_events.ics", tz="America/New_York", attendee="ada@example.com")
    offsite = [i for i in cal.busy_intervals(utc(2025, 4, 2), utc(2025, 4, 3)) if i.summary == "Offsite"]
    assert spans(offsite) == [("Offsite", "2025-04-02T04:00:00+00:00", "2025-04-04T04:00:00+00:00")]


def test_outlook_windows_time_zone_names_floating_times_and_busystatus_free():
    cal = CalendarSource(DATA / "outlook_windows_tz.ics", tz="Europe/Berlin")
    busy = cal.busy_intervals(utc(2025, 10, 24), utc(2025, 10, 29))
    assert spans(busy) == [
        ("Standup", "2025-10-24T07:30:00+00:00", "2025-10-24T07:45:00+00:00"),
        ("Dentist", "2025-10-24T15:00:00+00:00", "2025-10-24T16:00:00+00:00"),  # floating 17:00, Berlin
        ("Standup", "2025-10-25T07:30:00+00:00", "2025-10-25T07:45:00+00:00"),
        # clocks went back on 2025-10-26: 09:30 local is now 08:30 UTC; UNTIL ends the series on the 27th
        ("Standup", "2025-10-26T08:30:00+00:00", "2025-10-26T08:45:00+00:00"),
        ("Standup", "2025-10-27T08:30:00+00:00", "2025-10-27T08:45:00+00:00"),
    ]
    in_utc = CalendarSource(DATA / "outlook_windows_tz.ics", tz="UTC")
    dentist = [
        i for i in in_utc.busy_intervals(utc(2025, 10, 24), utc(2025, 10, 25)) if i.summary == "Dentist"
    ]
    assert spans(dentist) == [("Dentist", "2025-10-24T17:00:00+00:00", "2025-10-24T18:00:00+00:00")]


def test_naive_datetimes_are_rejected():
    cal = CalendarSource(DATA / "mixed_events.ics", tz="UTC")
    with pytest.raises(ValueError, match="timezone-aware"):
        cal.busy_intervals(datetime(2025, 4, 1), utc(2025, 4, 2))


def test_merge_intervals_joins_overlapping_and_touching_events():
    a = Interval(utc(2025, 4, 1, 9), utc(2025, 4, 1, 10), "A")
    b = Interval(utc(2025, 4, 1, 10), utc(2025, 4, 1, 11), "B")
    c = Interval(utc(2025, 4, 1, 10, 30), utc(2025, 4, 1, 10, 45), "C")
    d = Interval(utc(2025, 4, 1, 12), utc(2025, 4, 1, 13), "D")
    merged = merge_intervals([d, c, b, a])
    assert spans(merged) == [
        ("A + B + C", "2025-04-01T09:00:00+00:00", "2025-04-01T11:00:00+00:00"),
        ("D", "2025-04-01T12:00:00+00:00", "2025-04-01T13:00:00+00:00"),
    ]


def test_interval_validation():
    with pytest.raises(ValueError, match="timezone-aware"):
        Interval(datetime(2025, 1, 1), utc(2025, 1, 2))
    with pytest.raises(ValueError, match="must end after it starts"):
        Interval(utc(2025, 1, 2), utc(2025, 1, 1))


# -------------------------------------------------------------------------------- links and caching


class FlakyFetch:
    """Replays a script of bodies / exceptions and records the URLs asked for."""

    def __init__(self, *steps):
        self.steps = list(steps)
        self.urls: list[str] = []

    def __call__(self, url, timeout, max_bytes):
        self.urls.append(url)
        step = self.steps.pop(0)
        if isinstance(step, Exception):
            raise step
        return step


def _http_error(code: int, reason: str) -> urllib.error.HTTPError:
    return urllib.error.HTTPError(SECRET_URL, code, reason, hdrs=None, fp=None)


def test_failing_fetch_keeps_the_last_good_calendar_and_reports_the_error(tmp_path, caplog):
    good = (DATA / "berlin_weekly_dst.ics").read_bytes()
    clock = FakeClock(utc(2025, 3, 19, 12))
    fetch = FlakyFetch(good, _http_error(503, "Service Unavailable"), b"<html>Sign in</html>", good)
    cal = CalendarSource(SECRET_URL, tz="Europe/Berlin", clock=clock, fetch=fetch, cache_dir=tmp_path)
    caplog.set_level(logging.INFO, logger="langchain_metaclaw.schedule.calendar")

    window = (utc(2025, 3, 19), utc(2025, 3, 20))
    assert len(cal.busy_intervals(*window)) == 1
    assert cal.status.last_error is None and cal.status.events == 3

    clock.advance(minutes=15)  # refresh due: the server answers 503
    assert len(cal.busy_intervals(*window)) == 1
    assert cal.status.last_error == "HTTP 503 Service Unavailable"
    assert cal.status.last_error_at == clock.now()

    clock.advance(minutes=15)  # a login page with status 200 is not a calendar: keep the good one
    assert len(cal.busy_intervals(*window)) == 1
    assert cal.last_error.startswith("ValueError: Content line could not be parsed")

    clock.advance(minutes=15)
    cal.busy_intervals(*window)
    assert cal.last_error is None
    assert fetch.urls == [SECRET_URL] * 4

    # the secret part of the link appears nowhere: not in logs, status or errors
    assert "private-0123456789abcdef" not in caplog.text
    assert "private-0123456789abcdef" not in repr(cal.status) + repr(cal)
    assert cal.status.source == "https://calendar.google.com/…"


def test_refresh_waits_for_the_interval(tmp_path):
    good = (DATA / "berlin_weekly_dst.ics").read_bytes()
    clock = FakeClock(utc(2025, 3, 19, 12))
    fetch = FlakyFetch(good, good)
    cal = CalendarSource(
        SECRET_URL, clock=clock, fetch=fetch, cache_dir=tmp_path, refresh_interval=timedelta(minutes=30)
    )
    for _ in range(5):
        cal.busy_intervals(utc(2025, 3, 19), utc(2025, 3, 20))
        clock.advance(minutes=5)
    assert len(fetch.urls) == 1
    clock.advance(minutes=10)
    cal.busy_intervals(utc(2025, 3, 19), utc(2025, 3, 20))
    assert len(fetch.urls) == 2


def test_a_restart_with_the_network_down_uses_the_disk_cache(tmp_path):
    good = (DATA / "mixed_events.ics").read_bytes()
    first = CalendarSource(SECRET_URL, tz="Europe/Berlin", fetch=FlakyFetch(good), cache_dir=tmp_path)
    assert first.refresh() is True
    cached = first.cache_path
    assert cached is not None and cached.read_bytes() == good
    assert cached.parent == tmp_path and "private" not in cached.name
    if os.name == "posix":
        assert stat.S_IMODE(cached.stat().st_mode) == 0o600

    offline = urllib.error.URLError(TimeoutError("timed out"))
    second = CalendarSource(SECRET_URL, tz="Europe/Berlin", fetch=FlakyFetch(offline), cache_dir=tmp_path)
    busy = second.busy_intervals(utc(2025, 4, 1, 13), utc(2025, 4, 1, 14))
    assert [i.summary for i in busy] == ["Release call"]
    status = second.status
    assert status.from_cache is True
    assert status.last_error == "network error: TimeoutError: timed out"


def test_no_good_copy_ever_raises_calendar_unavailable(tmp_path):
    cal = CalendarSource(SECRET_URL, fetch=FlakyFetch(_http_error(404, "Not Found")), cache_dir=tmp_path)
    with pytest.raises(CalendarUnavailable) as info:
        cal.busy_intervals(utc(2025, 4, 1), utc(2025, 4, 2))
    assert info.value.reason == "HTTP 404 Not Found"
    assert str(info.value) == "calendar https://calendar.google.com/…: HTTP 404 Not Found"
    restored = pickle.loads(pickle.dumps(info.value))
    assert isinstance(restored, RuntimeError) and restored.reason == "HTTP 404 Not Found"


def test_missing_file_is_unavailable_with_the_path(tmp_path):
    cal = CalendarSource(tmp_path / "nope.ics")
    with pytest.raises(CalendarUnavailable, match="file not found"):
        cal.busy_intervals(utc(2025, 4, 1), utc(2025, 4, 2))


def test_a_file_is_reloaded_when_it_changes(tmp_path):
    path = tmp_path / "cal.ics"
    path.write_bytes((DATA / "berlin_weekly_dst.ics").read_bytes())
    clock = FakeClock(utc(2025, 3, 19, 12))
    cal = CalendarSource(path, tz="Europe/Berlin", clock=clock)
    assert [i.summary for i in cal.busy_intervals(utc(2025, 4, 1), utc(2025, 4, 2))] == []
    path.write_bytes((DATA / "mixed_events.ics").read_bytes())
    os.utime(path, ns=(1, 10**18))
    clock.advance(seconds=2)
    assert [i.summary for i in cal.busy_intervals(utc(2025, 4, 1, 13), utc(2025, 4, 1, 14))] == [
        "Release call"
    ]


def test_webcal_links_are_fetched_over_https(tmp_path):
    fetch = FlakyFetch((DATA / "mixed_events.ics").read_bytes())
    cal = CalendarSource(
        "webcal://outlook.office365.com/owa/calendar/abc/def/calendar.ics", fetch=fetch, cache_dir=tmp_path
    )
    cal.refresh()
    assert fetch.urls == ["https://outlook.office365.com/owa/calendar/abc/def/calendar.ics"]


def test_redact_url():
    assert redact_url(SECRET_URL) == "https://calendar.google.com/…"
    assert redact_url("https://example.com") == "https://example.com"


# ------------------------------------------------------------------ the real HTTP GET on loopback


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        if self.path == "/slow.ics":
            _time.sleep(1.5)
        if self.path == "/missing.ics":
            self.send_error(404, "Not Found")
            return
        body = (DATA / "mixed_events.ics").read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "text/calendar; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def ics_server():
    class Server(ThreadingHTTPServer):
        def handle_error(self, request, client_address):  # the slow client hung up on purpose
            pass

    server = Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_get_on_loopback(ics_server, tmp_path):
    cal = CalendarSource(f"{ics_server}/secret/basic.ics", tz="Europe/Berlin", cache_dir=tmp_path, timeout=5)
    assert [i.summary for i in cal.busy_intervals(utc(2025, 4, 1, 13), utc(2025, 4, 1, 14))] == [
        "Release call"
    ]
    with pytest.raises(urllib.error.HTTPError):
        _http_get(f"{ics_server}/missing.ics", 5, 1 << 20)
    with pytest.raises(ValueError, match="larger than 100 bytes"):
        _http_get(f"{ics_server}/big.ics", 5, 100)


def test_http_timeout_is_reported(ics_server, tmp_path):
    cal = CalendarSource(f"{ics_server}/slow.ics", cache_dir=tmp_path, timeout=0.3)
    assert cal.refresh() is False
    assert cal.status.last_error in ("timed out", "network error: TimeoutError: timed out")


def test_a_broken_file_keeps_the_last_copy_and_is_not_retried_until_it_changes(tmp_path, caplog):
    path = tmp_path / "cal.ics"
    path.write_bytes((DATA / "mixed_events.ics").read_bytes())
    clock = FakeClock(utc(2025, 4, 1, 13))
    cal = CalendarSource(path, tz="Europe/Berlin", clock=clock)
    window = (utc(2025, 4, 1, 13), utc(2025, 4, 1, 14))
    assert [i.summary for i in cal.busy_intervals(*window)] == ["Release call"]
    path.write_text("BEGIN:VCALENDAR\r\nhalf-written")
    os.utime(path, ns=(1, 2 * 10**18))
    caplog.set_level(logging.WARNING, logger="langchain_metaclaw.schedule.calendar")
    for _ in range(5):
        clock.advance(seconds=5)
        assert [i.summary for i in cal.busy_intervals(*window)] == ["Release call"]
    assert len(caplog.records) == 1  # one warning, not one per check
    assert cal.last_error is not None


def test_auto_refresh_off_loads_once_and_leaves_refresh_to_the_caller(tmp_path):
    good = (DATA / "berlin_weekly_dst.ics").read_bytes()
    clock = FakeClock(utc(2025, 3, 19, 12))
    fetch = FlakyFetch(good, good)
    cal = CalendarSource(SECRET_URL, clock=clock, fetch=fetch, cache_dir=tmp_path, auto_refresh=False)
    cal.busy_intervals(utc(2025, 3, 19), utc(2025, 3, 20))
    clock.advance(timedelta(hours=5))
    cal.busy_intervals(utc(2025, 3, 19), utc(2025, 3, 20))
    assert len(fetch.urls) == 1
    assert cal.refresh() is True
    assert len(fetch.urls) == 2
