"""The window policy: a pure function of (now, signals), checked with plain values and exact reasons."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from langchain_metaclaw.schedule.calendar import Interval
from langchain_metaclaw.schedule.windows import WindowPolicy, WindowSignals, parse_sleep_hours

BERLIN = ZoneInfo("Europe/Berlin")
NO_SIGNALS = WindowSignals()


def berlin(*args: int, fold: int = 0) -> datetime:
    return datetime(*args, tzinfo=BERLIN, fold=fold)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def sleep_policy(hours: str = "23:00-07:00", **kwargs) -> WindowPolicy:
    return WindowPolicy(sleep_hours=hours, timezone="Europe/Berlin", **kwargs)


def meeting(start: datetime, end: datetime, summary: str = "Team sync", all_day: bool = False) -> Interval:
    return Interval(start, end, summary, all_day=all_day)


# ------------------------------------------------------------------------------------------ sleep hours


def test_sleep_hours_across_midnight_on_an_ordinary_night():
    policy = sleep_policy()
    before = policy.evaluate(berlin(2025, 6, 10, 22, 59), NO_SIGNALS)
    assert before.open is False
    assert before.reasons == ["outside sleep hours 23:00-07:00, next start 23:00"]

    start = policy.evaluate(berlin(2025, 6, 10, 23, 0), NO_SIGNALS)
    assert start.open is True
    assert start.closes_at == utc(2025, 6, 11, 5, 0)  # 07:00 CEST
    assert start.reasons == ["sleep hours end at 2025-06-11 07:00"]

    night = policy.evaluate(berlin(2025, 6, 11, 3, 0), NO_SIGNALS)
    assert (night.open, night.reasons, night.closes_at) == (
        True,
        ["sleep hours end at 07:00"],
        utc(2025, 6, 11, 5),
    )
    assert policy.evaluate(berlin(2025, 6, 11, 6, 59, 59), NO_SIGNALS).open is True

    after = policy.evaluate(berlin(2025, 6, 11, 7, 0), NO_SIGNALS)
    assert after.open is False
    assert after.reasons == ["outside sleep hours 23:00-07:00, next start 23:00"]
    assert after.closes_at is None


def test_sleep_hours_on_the_spring_forward_night_last_seven_hours():
    policy = sleep_policy()  # Berlin: 2025-03-30 02:00 CET -> 03:00 CEST
    start = policy.evaluate(berlin(2025, 3, 29, 23, 0), NO_SIGNALS)
    assert start.open is True
    assert start.closes_at == utc(2025, 3, 30, 5, 0)  # 07:00 CEST
    assert start.closes_at - utc(2025, 3, 29, 22, 0) == timedelta(hours=7)
    assert policy.evaluate(utc(2025, 3, 30, 0, 59, 59), NO_SIGNALS).open is True  # 01:59:59 CET
    assert policy.evaluate(utc(2025, 3, 30, 1, 0), NO_SIGNALS).open is True  # 03:00 CEST
    assert policy.evaluate(utc(2025, 3, 30, 4, 59, 59), NO_SIGNALS).open is True
    end = policy.evaluate(utc(2025, 3, 30, 5, 0), NO_SIGNALS)
    assert (end.open, end.reasons) == (False, ["outside sleep hours 23:00-07:00, next start 23:00"])


def test_sleep_hours_on_the_fall_back_night_last_nine_hours():
    policy = sleep_policy()  # Berlin: 2025-10-26 03:00 CEST -> 02:00 CET
    start = policy.evaluate(berlin(2025, 10, 25, 23, 0), NO_SIGNALS)
    assert start.closes_at == utc(2025, 10, 26, 6, 0)  # 07:00 CET
    assert start.closes_at - utc(2025, 10, 25, 21, 0) == timedelta(hours=9)
    first_pass = policy.evaluate(berlin(2025, 10, 26, 2, 30, fold=0), NO_SIGNALS)
    second_pass = policy.evaluate(berlin(2025, 10, 26, 2, 30, fold=1), NO_SIGNALS)
    assert first_pass.open is second_pass.open is True
    assert first_pass.reasons == second_pass.reasons == ["sleep hours end at 07:00"]
    assert policy.evaluate(utc(2025, 10, 26, 5, 59, 59), NO_SIGNALS).open is True
    assert policy.evaluate(utc(2025, 10, 26, 6, 0), NO_SIGNALS).open is False


def test_sleep_hours_ending_inside_the_spring_gap_end_at_the_jump():
    policy = sleep_policy("22:00-02:30")  # 02:30 does not exist on 2025-03-30 in Berlin
    decision = policy.evaluate(berlin(2025, 3, 29, 23, 0), NO_SIGNALS)
    assert decision.closes_at == utc(2025, 3, 30, 1, 0)  # the jump to 03:00 CEST, not 03:30
    assert decision.reasons == ["sleep hours end at 2025-03-30 03:00"]
    assert policy.evaluate(utc(2025, 3, 30, 0, 59, 59), NO_SIGNALS).open is True
    assert policy.evaluate(utc(2025, 3, 30, 1, 0), NO_SIGNALS).open is False


def test_sleep_hours_ending_inside_the_repeated_hour_do_not_reopen_on_the_second_pass():
    policy = sleep_policy("22:00-02:30")
    decision = policy.evaluate(berlin(2025, 10, 25, 23, 0), NO_SIGNALS)
    assert decision.closes_at == utc(2025, 10, 26, 0, 30)  # the first 02:30 (CEST)
    assert policy.evaluate(utc(2025, 10, 26, 0, 29), NO_SIGNALS).open is True
    assert policy.evaluate(utc(2025, 10, 26, 0, 30), NO_SIGNALS).open is False
    # 02:15 CET on the second pass reads "before 02:30" on the wall but the night's window is over
    assert policy.evaluate(berlin(2025, 10, 26, 2, 15, fold=1), NO_SIGNALS).open is False


def test_sleep_hours_within_one_day():
    policy = sleep_policy("13:00-15:00")
    assert policy.evaluate(berlin(2025, 6, 10, 12, 59), NO_SIGNALS).open is False
    decision = policy.evaluate(berlin(2025, 6, 10, 13, 0), NO_SIGNALS)
    assert (decision.open, decision.closes_at) == (True, utc(2025, 6, 10, 13, 0))
    late = policy.evaluate(berlin(2025, 6, 10, 15, 0), NO_SIGNALS)
    assert late.reasons == ["outside sleep hours 13:00-15:00, next start 2025-06-11 13:00"]


def test_parse_sleep_hours():
    assert parse_sleep_hours(" 23:30 - 6:45 ") == (
        datetime(1, 1, 1, 23, 30).time(),
        datetime(1, 1, 1, 6, 45).time(),
    )
    for bad, message in [
        ("25:00-07:00", "impossible time"),
        ("23-7", "must look like"),
        ("07:00-07:00", "same time"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_sleep_hours(bad)


# ----------------------------------------------------------------------------------------------- idle


def test_idle_trigger_reasons():
    policy = WindowPolicy(idle_minutes=10, timezone="UTC")
    now = utc(2025, 6, 10, 12)
    open_ = policy.evaluate(now, WindowSignals(idle_seconds=12 * 60 + 5))
    assert (open_.open, open_.reasons, open_.closes_at) == (True, ["idle 12 min >= 10"], None)
    closed = policy.evaluate(now, WindowSignals(idle_seconds=599))
    assert (closed.open, closed.reasons) == (False, ["idle 9 min < 10"])
    assert policy.evaluate(now, WindowSignals(idle_seconds=600)).open is True
    assert policy.evaluate(now, WindowSignals(idle_seconds=42)).reasons == ["idle 42 s < 10"]


def test_idle_unknown_never_opens_and_says_why():
    policy = WindowPolicy(idle_minutes=10, timezone="UTC")
    signals = WindowSignals(
        idle_error="no idle detector available: xprintidle: DISPLAY is not set (no X11 session)"
    )
    decision = policy.evaluate(utc(2025, 6, 10, 12), signals)
    assert decision.open is False
    assert decision.reasons == ["no idle detector available: xprintidle: DISPLAY is not set (no X11 session)"]
    assert decision.triggers["idle"].ok is False


# ------------------------------------------------------------------------------------------- calendar


def test_calendar_window_closes_before_the_event_ends():
    policy = WindowPolicy(calendar=True, timezone="Europe/Berlin")
    busy = [meeting(berlin(2025, 4, 2, 14), berlin(2025, 4, 2, 15))]
    signals = WindowSignals(busy=busy)

    before = policy.evaluate(berlin(2025, 4, 2, 13, 0), signals)
    assert before.reasons == ["calendar: no busy event now (next 'Team sync' at 14:00)"]

    during = policy.evaluate(berlin(2025, 4, 2, 14, 10), signals)
    assert during.open is True
    assert during.reasons == ["calendar: 'Team sync' until 14:55 (ends 15:00, 5 min margin)"]
    assert during.closes_at == utc(2025, 4, 2, 12, 55)

    margin = policy.evaluate(berlin(2025, 4, 2, 14, 55), signals)
    assert margin.open is False
    assert margin.reasons == ["calendar: 'Team sync' ends at 15:00, inside the 5 min margin"]

    assert policy.evaluate(berlin(2025, 4, 2, 15, 0), signals).reasons == ["calendar: no busy event now"]


def test_back_to_back_events_are_one_block():
    policy = WindowPolicy(calendar=True, timezone="Europe/Berlin", close_before_end_minutes=10)
    busy = [
        meeting(berlin(2025, 4, 2, 15), berlin(2025, 4, 2, 16), "Planning"),
        meeting(berlin(2025, 4, 2, 14), berlin(2025, 4, 2, 15), "Team sync"),
    ]
    decision = policy.evaluate(berlin(2025, 4, 2, 14, 55), WindowSignals(busy=busy))
    assert decision.open is True
    assert decision.reasons == ["calendar: 'Team sync + Planning' until 15:50 (ends 16:00, 10 min margin)"]
    assert decision.closes_at == utc(2025, 4, 2, 13, 50)


def test_all_day_events_can_be_ignored():
    offsite = meeting(berlin(2025, 4, 2), berlin(2025, 4, 4), "Offsite", all_day=True)
    now = berlin(2025, 4, 2, 10)
    counted = WindowPolicy(calendar=True, timezone="Europe/Berlin").evaluate(
        now, WindowSignals(busy=[offsite])
    )
    assert counted.reasons == [
        "calendar: 'Offsite' until 2025-04-03 23:55 (ends 2025-04-04 00:00, 5 min margin)"
    ]
    ignored = WindowPolicy(calendar=True, timezone="Europe/Berlin", calendar_all_day=False)
    assert ignored.evaluate(now, WindowSignals(busy=[offsite])).open is False


def test_calendar_unavailable_or_stale():
    policy = WindowPolicy(calendar=True, timezone="Europe/Berlin", close_before_end_minutes=0)
    down = policy.evaluate(berlin(2025, 4, 2, 14), WindowSignals(calendar_error="HTTP 404 Not Found"))
    assert down.reasons == ["calendar unavailable: HTTP 404 Not Found"]
    busy = [meeting(berlin(2025, 4, 2, 14), berlin(2025, 4, 2, 15))]
    stale = policy.evaluate(berlin(2025, 4, 2, 14), WindowSignals(busy=busy, calendar_warning="HTTP 503"))
    assert stale.open is True
    assert stale.reasons == ["calendar: 'Team sync' until 15:00 [calendar stale: HTTP 503]"]


# ------------------------------------------------------------------------------------- load, battery


def test_load_guard():
    policy = WindowPolicy(idle_minutes=10, max_requests_per_minute=2, timezone="UTC")
    now = utc(2025, 6, 10, 12)
    quiet = policy.evaluate(now, WindowSignals(idle_seconds=720, requests_per_minute=0.5))
    assert (quiet.open, quiet.reasons) == (True, ["idle 12 min >= 10", "load 0.5 req/min < 2"])
    busy = policy.evaluate(now, WindowSignals(idle_seconds=720, requests_per_minute=3))
    assert (busy.open, busy.reasons) == (False, ["load 3 req/min >= 2", "idle 12 min >= 10"])
    unknown = policy.evaluate(now, WindowSignals(idle_seconds=720, load_error="store not open"))
    assert unknown.reasons == ["serving load unknown: store not open", "idle 12 min >= 10"]
    assert unknown.triggers["load"].role == "guard"


def test_low_load_as_a_trigger_for_servers():
    policy = WindowPolicy(max_requests_per_minute=1, load_is_trigger=True, timezone="UTC")
    assert policy.enabled_triggers == ["load"]
    decision = policy.evaluate(utc(2025, 6, 10, 12), WindowSignals(requests_per_minute=0))
    assert (decision.open, decision.reasons) == (True, ["load 0 req/min < 1"])
    assert decision.triggers["load"].role == "trigger"


def test_battery_guard():
    policy = sleep_policy(skip_on_battery=True)
    night = berlin(2025, 6, 11, 3)
    on_battery = policy.evaluate(night, WindowSignals(on_battery=True))
    assert (on_battery.open, on_battery.reasons) == (False, ["on battery", "sleep hours end at 07:00"])
    plugged = policy.evaluate(night, WindowSignals(on_battery=False, battery_note="on AC power"))
    assert (plugged.open, plugged.reasons) == (True, ["sleep hours end at 07:00", "on AC power"])
    unknown = policy.evaluate(night, WindowSignals(battery_note="psutil not installed"))
    assert unknown.open is True
    assert unknown.reasons[-1] == "battery state unknown (psutil not installed)"


# ---------------------------------------------------------------------------------------- min window


def test_min_window_refuses_a_window_that_cannot_last():
    policy = sleep_policy(min_window_minutes=30)
    late = policy.evaluate(berlin(2025, 6, 11, 6, 45), NO_SIGNALS)
    assert late.open is False
    assert late.reasons == [
        "window would last 15 min (until 07:00) < min_window 30 min",
        "sleep hours end at 07:00",
    ]
    assert policy.evaluate(berlin(2025, 6, 11, 6, 30), NO_SIGNALS).open is True
    # an open window is not cut short: min_window only applies to opening
    still = policy.evaluate(berlin(2025, 6, 11, 6, 45), NO_SIGNALS, currently_open=True)
    assert (still.open, still.closes_at) == (True, utc(2025, 6, 11, 5, 0))


def test_min_window_for_a_short_meeting():
    policy = WindowPolicy(calendar=True, timezone="Europe/Berlin", min_window_minutes=20)
    busy = [meeting(berlin(2025, 4, 2, 14), berlin(2025, 4, 2, 14, 20), "Quick chat")]
    decision = policy.evaluate(berlin(2025, 4, 2, 14), WindowSignals(busy=busy))
    assert decision.open is False
    assert decision.reasons[0] == "window would last 15 min (until 14:15) < min_window 20 min"


def test_min_window_ignores_open_ended_triggers_in_any_mode():
    policy = sleep_policy(idle_minutes=10, min_window_minutes=30)
    decision = policy.evaluate(berlin(2025, 6, 11, 6, 45), WindowSignals(idle_seconds=3600))
    assert decision.open is True
    assert decision.closes_at is None  # idle has no known end, so the window may outlast 07:00
    assert "min_window" not in decision.triggers


# ------------------------------------------------------------------------------------------ any / all


def test_mode_any_opens_on_one_trigger_and_all_needs_every_one():
    night, day = berlin(2025, 6, 11, 3), berlin(2025, 6, 11, 12)
    idle = WindowSignals(idle_seconds=1800)
    active = WindowSignals(idle_seconds=30)
    any_ = sleep_policy(idle_minutes=10)
    all_ = sleep_policy(idle_minutes=10, mode="all")

    assert any_.evaluate(day, idle).reasons == ["idle 30 min >= 10"]
    assert any_.evaluate(day, idle).open is True
    both = any_.evaluate(night, idle)
    assert (both.open, both.closes_at) == (True, None)  # idle may outlast the night
    assert both.reasons == ["idle 30 min >= 10", "sleep hours end at 07:00"]
    none = any_.evaluate(day, active)
    assert none.reasons == ["idle 30 s < 10", "outside sleep hours 23:00-07:00, next start 23:00"]

    day_all = all_.evaluate(day, idle)
    assert (day_all.open, day_all.reasons) == (False, ["outside sleep hours 23:00-07:00, next start 23:00"])
    night_all = all_.evaluate(night, idle)
    assert (night_all.open, night_all.closes_at) == (True, utc(2025, 6, 11, 5))
    assert night_all.reasons == ["idle 30 min >= 10", "sleep hours end at 07:00"]
    assert all_.evaluate(night, active).reasons == ["idle 30 s < 10"]


def test_mode_all_closes_at_the_earliest_known_end():
    policy = sleep_policy(calendar=True, mode="all")
    busy = [meeting(berlin(2025, 6, 11, 6), berlin(2025, 6, 11, 8), "Early call")]
    decision = policy.evaluate(berlin(2025, 6, 11, 6, 30), WindowSignals(busy=busy))
    assert decision.open is True
    assert decision.closes_at == utc(2025, 6, 11, 5, 0)  # sleep ends 07:00, before the call's 07:55


def test_decision_is_plain_data():
    policy = sleep_policy(idle_minutes=10, max_requests_per_minute=2)
    decision = policy.evaluate(berlin(2025, 6, 11, 3), WindowSignals(idle_seconds=0, requests_per_minute=0))
    dumped = decision.model_dump(mode="json")
    assert dumped["open"] is True
    assert dumped["closes_at"] == "2025-06-11T05:00:00Z"  # only sleep hours hold (idle 0 s)
    assert set(dumped["triggers"]) == {"idle", "sleep_hours", "load"}
    assert dumped["triggers"]["sleep_hours"] == {
        "role": "trigger",
        "ok": True,
        "reason": "sleep hours end at 07:00",
        "ends_at": "2025-06-11T05:00:00Z",
    }
    assert decision.summary == "open: sleep hours end at 07:00; load 0 req/min < 2"


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "enable at least one trigger"),
        ({"max_requests_per_minute": 3}, "enable at least one trigger"),
        ({"load_is_trigger": True}, "load_is_trigger needs max_requests_per_minute"),
        ({"sleep_hours": "7am-9am"}, "must look like '23:00-07:00'"),
        ({"idle_minutes": 10, "timezone": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        ({"idle_minutes": 0}, "greater than 0"),
        ({"idle_minutes": 10, "idle_minute": 5}, "Extra inputs are not permitted"),
        ({"idle_minutes": 10, "mode": "some"}, "'any' or 'all'"),
    ],
)
def test_invalid_policies(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WindowPolicy(**kwargs)


def test_evaluate_rejects_naive_datetimes():
    with pytest.raises(ValueError, match="timezone-aware"):
        WindowPolicy(idle_minutes=1).evaluate(datetime(2025, 1, 1), NO_SIGNALS)


# ----------------------------------------------------------------------------------------- next window


def test_next_window_from_sleep_hours():
    policy = sleep_policy()
    assert policy.next_window(berlin(2025, 6, 10, 12)) == utc(2025, 6, 10, 21, 0)  # 23:00 CEST
    assert policy.next_window(berlin(2025, 6, 11, 2)) == utc(2025, 6, 11, 0, 0)  # inside: now
    assert policy.next_window(berlin(2025, 6, 10, 12), horizon=timedelta(hours=6)) is None
    # a short-notice start that cannot reach min_window is skipped for the next night
    short = sleep_policy(min_window_minutes=30)
    assert short.next_window(berlin(2025, 6, 11, 6, 45)) == utc(2025, 6, 11, 21, 0)


def test_next_window_from_the_calendar_and_combined():
    busy = [
        meeting(berlin(2025, 4, 2, 10), berlin(2025, 4, 2, 10, 10), "Stand-up"),  # 5 min after the margin
        meeting(berlin(2025, 4, 2, 14), berlin(2025, 4, 2, 15)),
        meeting(berlin(2025, 4, 2, 22, 30), berlin(2025, 4, 2, 23, 30), "Late call"),
    ]
    now = berlin(2025, 4, 2, 9)
    calendar = WindowPolicy(calendar=True, timezone="Europe/Berlin", min_window_minutes=10)
    assert calendar.next_window(now, busy=busy) == utc(2025, 4, 2, 12, 0)  # 14:00 CEST; stand-up too short
    both_any = sleep_policy(calendar=True)
    assert both_any.next_window(now, busy=busy) == utc(2025, 4, 2, 8, 0)  # the stand-up
    both_all = sleep_policy(calendar=True, mode="all")
    assert both_all.next_window(now, busy=busy) == utc(2025, 4, 2, 21, 0)  # sleep ∩ late call: 23:00
    assert WindowPolicy(idle_minutes=5).next_window(now) is None  # idle cannot be foreseen
