"""Idle detectors: parsers on recorded outputs, each OS call faked at its boundary, detection fallbacks."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from jeepney import HeaderFields, Message, MessageType, new_error, new_method_return
from jeepney.low_level import Parser

from langchain_metaclaw.errors import ConfigurationError
from langchain_metaclaw.schedule import idle_os
from langchain_metaclaw.schedule.idle import (
    DetectionResult,
    IoregIdleDetector,
    LogindIdleDetector,
    MutterIdleDetector,
    WindowsIdleDetector,
    XprintidleDetector,
    default_detector_order,
    detect_idle_detector,
    detection_report,
    format_detection_report,
)
from langchain_metaclaw.schedule.idle_os import (
    IdleUnavailable,
    logind_properties_message,
    mutter_idletime_message,
    parse_ioreg_idle,
    parse_logind_reply,
    parse_mutter_reply,
    parse_xprintidle,
    windows_idle_seconds,
)
from tests.unit_tests.schedule.dbus_service import (
    dbus_daemon_available,
    logind_handler,
    mutter_handler,
    private_bus,
    serve,
)

DATA = Path(__file__).parent / "data"
LINUX_GNOME = {"DBUS_SESSION_BUS_ADDRESS": "unix:path=/run/user/1000/bus", "DISPLAY": ":0"}


def recorded(name: str) -> Message:
    """A reply message recorded off a real dbus-daemon (see record_dbus_replies.py)."""
    (msg,) = Parser().feed(bytes.fromhex((DATA / name).read_text().strip()))
    return msg


def which_none(_name: str) -> None:
    return None


def which_all(name: str) -> str:
    return f"/usr/bin/{name}"


# ---------------------------------------------------------------------------------------------- parsers


def test_parse_ioreg_recorded_sonoma_output():
    assert parse_ioreg_idle((DATA / "ioreg_iohidsystem_macos14.txt").read_text()) == pytest.approx(
        0.754236416
    )


def test_parse_ioreg_legacy_data_blob_is_little_endian_nanoseconds():
    assert parse_ioreg_idle((DATA / "ioreg_iohidsystem_legacy_data.txt").read_text()) == 10.0


def test_parse_ioreg_prefers_the_property_line_over_a_nested_dict_key():
    output = (
        '      |   "HIDParameters" = {"HIDClickTime"=500000000,"HIDIdleTime"=1}\n'
        '      |   "HIDIdleTime" = 2500000000\n'
    )
    assert parse_ioreg_idle(output) == 2.5


def test_parse_ioreg_without_idle_time_raises():
    with pytest.raises(IdleUnavailable, match="no HIDIdleTime"):
        parse_ioreg_idle("+-o Root  <class IORegistryEntry, id 0x100000100, retain 29>\n")


def test_parse_xprintidle_recorded_output():
    assert parse_xprintidle((DATA / "xprintidle_stdout.txt").read_text()) == 184.213


@pytest.mark.parametrize("output", ["", "  \n", "couldn't open display", "-5", "12.5"])
def test_parse_xprintidle_rejects_garbage(output):
    with pytest.raises(IdleUnavailable, match="unexpected xprintidle output"):
        parse_xprintidle(output)


def test_parse_mutter_recorded_reply():
    reply = recorded("dbus_mutter_getidletime.hex")
    assert reply.header.message_type == MessageType.method_return
    assert parse_mutter_reply(reply) == 754.321


def test_parse_mutter_recorded_service_unknown_error():
    with pytest.raises(IdleUnavailable) as info:
        parse_mutter_reply(recorded("dbus_mutter_service_unknown.hex"))
    assert info.value.reason == (
        "D-Bus error org.freedesktop.DBus.Error.ServiceUnknown: "
        "The name org.gnome.Mutter.IdleMonitor was not provided by any .service files"
    )


def test_parse_mutter_rejects_an_unexpected_body():
    reply = new_method_return(mutter_idletime_message(), "s", ("soon",))
    with pytest.raises(IdleUnavailable, match="unexpected GetIdletime reply body"):
        parse_mutter_reply(reply)


def test_parse_logind_recorded_idle_session_uses_the_monotonic_hint():
    reply = recorded("dbus_logind_getall_idle.hex")
    # IdleSinceHintMonotonic = 86400 s after boot; now = 87000 s after boot -> 600 s.
    seconds = parse_logind_reply(reply, now_realtime_us=0, now_monotonic_us=87_000_000_000)
    assert seconds == 600.0


def test_parse_logind_falls_back_to_the_realtime_hint():
    props = {"IdleHint": ("b", True), "IdleSinceHint": ("t", 1_743_300_000_000_000)}
    reply = new_method_return(
        logind_properties_message("/org/freedesktop/login1/session/auto"), "a{sv}", (props,)
    )
    assert parse_logind_reply(reply, now_realtime_us=1_743_300_090_000_000, now_monotonic_us=1) == 90.0


def test_parse_logind_recorded_active_session_is_zero():
    reply = recorded("dbus_logind_getall_active.hex")
    assert parse_logind_reply(reply, now_realtime_us=10**18, now_monotonic_us=10**12) == 0.0


def test_parse_logind_idle_without_since_is_unavailable_not_zero():
    props = {"IdleHint": ("b", True), "IdleSinceHint": ("t", 0), "IdleSinceHintMonotonic": ("t", 0)}
    reply = new_method_return(
        logind_properties_message("/org/freedesktop/login1/session/auto"), "a{sv}", (props,)
    )
    with pytest.raises(IdleUnavailable, match="IdleSinceHint is 0"):
        parse_logind_reply(reply, now_realtime_us=1, now_monotonic_us=1)


def test_parse_logind_error_reply():
    call = logind_properties_message("/org/freedesktop/login1/session/auto")
    reply = new_error(call, "org.freedesktop.DBus.Error.AccessDenied", "s", ("nope",))
    with pytest.raises(IdleUnavailable, match="AccessDenied: nope"):
        parse_logind_reply(reply, now_realtime_us=1, now_monotonic_us=1)


@pytest.mark.parametrize(
    ("now", "last", "expected"),
    [
        (120_000, 60_000, 60.0),
        (5_000, 0xFFFFFFFF - 4_999, 10.0),  # the 32-bit tick count wrapped after 49.7 days
        (1_000, 1_003, 0.0),  # input between the two calls: 0, not 49 days
        (7, 7, 0.0),
    ],
)
def test_windows_idle_seconds(now, last, expected):
    assert windows_idle_seconds(now, last) == expected


# ------------------------------------------------------------------------ D-Bus messages (real jeepney)


def test_mutter_message_is_the_documented_method_call():
    msg = mutter_idletime_message()
    fields = msg.header.fields
    assert msg.header.message_type == MessageType.method_call
    assert fields[HeaderFields.destination] == "org.gnome.Mutter.IdleMonitor"
    assert fields[HeaderFields.path] == "/org/gnome/Mutter/IdleMonitor/Core"
    assert fields[HeaderFields.interface] == "org.gnome.Mutter.IdleMonitor"
    assert fields[HeaderFields.member] == "GetIdletime"
    assert msg.body == ()


def test_logind_message_is_properties_getall_on_the_session():
    msg = logind_properties_message("/org/freedesktop/login1/session/auto")
    fields = msg.header.fields
    assert fields[HeaderFields.destination] == "org.freedesktop.login1"
    assert fields[HeaderFields.path] == "/org/freedesktop/login1/session/auto"
    assert fields[HeaderFields.interface] == "org.freedesktop.DBus.Properties"
    assert fields[HeaderFields.member] == "GetAll"
    assert msg.body == ("org.freedesktop.login1.Session",)


# ------------------------------------------------------------------ detectors with faked OS boundaries


def test_ioreg_detector_runs_ioreg_and_parses():
    calls = []

    def run(argv, timeout):
        calls.append((tuple(argv), timeout))
        return (DATA / "ioreg_iohidsystem_macos14.txt").read_text()

    det = IoregIdleDetector(run=run, platform="darwin", which=which_all)
    assert det.available() is True
    assert det.idle_seconds() == pytest.approx(0.754236416)
    assert calls[0] == (("ioreg", "-c", "IOHIDSystem"), 2.0)


def test_ioreg_detector_on_linux_is_unavailable_without_running_anything():
    def run(argv, timeout):  # pragma: no cover - must not be called
        raise AssertionError("ran ioreg on linux")

    det = IoregIdleDetector(run=run, platform="linux", which=which_all)
    assert det.unavailable_reason() == "macOS only (platform is linux)"


def test_xprintidle_detector_preconditions():
    env = {"DISPLAY": ":0"}
    assert XprintidleDetector(platform="linux", environ={}, which=which_all).precondition() == (
        "DISPLAY is not set (no X11 session)"
    )
    assert XprintidleDetector(platform="linux", environ=env, which=which_none).precondition() == (
        "xprintidle not on PATH (apt install xprintidle)"
    )
    wayland = {"DISPLAY": ":0", "XDG_SESSION_TYPE": "wayland"}
    assert (
        "Wayland session"
        in XprintidleDetector(platform="linux", environ=wayland, which=which_all).precondition()
    )
    det = XprintidleDetector(platform="linux", environ=env, which=which_all, run=lambda argv, t: "1500\n")
    assert det.unavailable_reason() is None
    assert det.idle_seconds() == 1.5


def test_command_failures_become_idle_unavailable():
    with pytest.raises(IdleUnavailable, match="not found"):
        idle_os.run_command(["/nonexistent/xprintidle"], 1.0)
    with pytest.raises(IdleUnavailable, match=r"exited with status 3: boom"):
        idle_os.run_command(
            [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"], 5.0
        )
    out = idle_os.run_command([sys.executable, "-c", "print(4200)"], 5.0)
    assert parse_xprintidle(out) == 4.2


def test_command_timeout_becomes_idle_unavailable(monkeypatch):
    def slow(*args, **kwargs):
        raise subprocess.TimeoutExpired(cmd="xprintidle", timeout=2.0)

    monkeypatch.setattr(idle_os.subprocess, "run", slow)
    with pytest.raises(IdleUnavailable, match="did not answer within 2 s"):
        idle_os.run_command(["xprintidle"], 2.0)


def test_mutter_detector_fakes_the_dbus_call():
    sent = []

    def call(bus, message, timeout):
        sent.append((bus, message.header.fields[HeaderFields.member], timeout))
        return new_method_return(message, "t", (65_000,))

    det = MutterIdleDetector(call=call, platform="linux", environ=LINUX_GNOME)
    assert det.idle_seconds() == 65.0
    assert sent == [("SESSION", "GetIdletime", 2.0)]


def test_mutter_detector_without_session_bus():
    det = MutterIdleDetector(platform="linux", environ={})
    assert det.unavailable_reason() == "no D-Bus session bus (DBUS_SESSION_BUS_ADDRESS is not set)"


def test_mutter_detector_not_running_reports_the_bus_error():
    def call(bus, message, timeout):
        return recorded("dbus_mutter_service_unknown.hex")

    det = MutterIdleDetector(call=call, platform="linux", environ=LINUX_GNOME)
    assert det.available() is False
    with pytest.raises(IdleUnavailable) as info:
        det.idle_seconds()
    assert info.value.detector == "gnome-mutter"
    assert "ServiceUnknown" in info.value.reason


def test_dbus_call_without_a_session_address(monkeypatch):
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    with pytest.raises(IdleUnavailable, match=r"no session bus address \(DBUS_SESSION_BUS_ADDRESS unset\)"):
        idle_os.dbus_call("SESSION", mutter_idletime_message(), 0.5)


def test_dbus_call_to_a_missing_socket():
    with pytest.raises(IdleUnavailable, match="FileNotFoundError"):
        idle_os.dbus_call("unix:path=/nonexistent/metaclaw-bus", mutter_idletime_message(), 0.5)


def test_logind_detector_resolves_a_session_id_then_reads_properties():
    sent = []

    def call(bus, message, timeout):
        member = message.header.fields[HeaderFields.member]
        sent.append((bus, member, message.header.fields[HeaderFields.path]))
        if member == "GetSession":
            assert message.body == ("c2",)
            return new_method_return(message, "o", ("/org/freedesktop/login1/session/c2",))
        props = {"IdleHint": ("b", True), "IdleSinceHintMonotonic": ("t", 1_000_000)}
        return new_method_return(message, "a{sv}", (props,))

    det = LogindIdleDetector(call=call, platform="linux", session="c2", clocks=lambda: (0, 31_000_000))
    assert det.idle_seconds() == 30.0
    assert sent == [
        ("SYSTEM", "GetSession", "/org/freedesktop/login1"),
        ("SYSTEM", "GetAll", "/org/freedesktop/login1/session/c2"),
    ]


def test_windows_detector_with_faked_ctypes_boundary():
    det = WindowsIdleDetector(platform="win32", read_ticks=lambda: (90_000, 30_000))
    assert det.available() is True
    assert det.idle_seconds() == 60.0
    assert WindowsIdleDetector(platform="linux").unavailable_reason() == "Windows only (platform is linux)"

    def failing():
        raise OSError("access denied")

    with pytest.raises(IdleUnavailable, match="GetLastInputInfo failed: access denied"):
        WindowsIdleDetector(platform="win32", read_ticks=failing).idle_seconds()


def test_idle_unavailable_is_picklable_and_a_runtime_error():
    err = pickle.loads(pickle.dumps(IdleUnavailable("xprintidle", "DISPLAY is not set")))
    assert isinstance(err, RuntimeError)
    assert (err.detector, err.reason, str(err)) == (
        "xprintidle",
        "DISPLAY is not set",
        "xprintidle: DISPLAY is not set",
    )


# ------------------------------------------------------------------------------------------- detection


def test_default_order_per_platform():
    assert default_detector_order("darwin") == ["ioreg"]
    assert default_detector_order("win32") == ["windows"]
    assert default_detector_order("linux") == ["gnome-mutter", "xprintidle", "logind"]
    assert default_detector_order("freebsd14") == ["gnome-mutter", "xprintidle"]
    assert default_detector_order("emscripten") == []


def test_nothing_available_returns_none_with_reasons(monkeypatch):
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/metaclaw-system-bus")
    report: list[DetectionResult] = []
    assert detect_idle_detector(platform="linux", report=report) is None
    assert [(r.detector, r.available) for r in report] == [
        ("gnome-mutter", False),
        ("xprintidle", False),
        ("logind", False),
    ]
    assert report[0].reason == "no D-Bus session bus (DBUS_SESSION_BUS_ADDRESS is not set)"
    assert report[1].reason == "DISPLAY is not set (no X11 session)"
    assert report[2].reason.startswith("system bus: FileNotFoundError")
    text = format_detection_report(report)
    assert text.startswith("gnome-mutter: no D-Bus session bus")
    assert "; xprintidle: DISPLAY is not set" in text


def test_detection_falls_back_in_order_and_stops_at_the_first_that_works():
    class Fake:
        def __init__(self, name, result):
            self.name, self.result, self.calls = name, result, 0

        def available(self):
            return True

        def idle_seconds(self):
            self.calls += 1
            if isinstance(self.result, Exception):
                raise self.result
            return self.result

    broken = Fake("broken", ZeroDivisionError("bug"))
    gone = Fake("gone", IdleUnavailable("gone", "service went away"))
    nan = Fake("nan", float("nan"))
    good = Fake("good", 42.0)
    never = Fake("never", 1.0)
    report: list[DetectionResult] = []
    assert detect_idle_detector(candidates=[broken, gone, nan, good, never], report=report) is good
    assert report == [
        DetectionResult("broken", False, "probe failed: ZeroDivisionError: bug"),
        DetectionResult("gone", False, "service went away"),
        DetectionResult("nan", False, "idle_seconds() returned an invalid value nan"),
        DetectionResult("good", True, "idle 42.0 s"),
    ]
    assert never.calls == 0


def test_detection_report_lists_every_candidate():
    results = detection_report(
        candidates=[
            XprintidleDetector(
                platform="linux", environ={"DISPLAY": ":0"}, which=which_all, run=lambda a, t: "10"
            ),
            WindowsIdleDetector(platform="linux"),
        ]
    )
    assert results == [
        DetectionResult("xprintidle", True, "idle 0.0 s"),
        DetectionResult("windows", False, "Windows only (platform is linux)"),
    ]


def test_preferred_names_are_exactly_what_is_tried():
    report: list[DetectionResult] = []
    assert detect_idle_detector(["windows", "ioreg"], platform="linux", report=report) is None
    assert [r.detector for r in report] == ["windows", "ioreg"]
    with pytest.raises(ConfigurationError, match=r"unknown idle detector\(s\) \['kde'\]"):
        detect_idle_detector(["kde"])


def test_unsupported_platform_reports_nothing_and_never_crashes():
    report: list[DetectionResult] = []
    assert detect_idle_detector(platform="emscripten", report=report) is None
    assert report == []
    assert format_detection_report(report) == "no idle detector for this platform"


# ----------------------------------------------------------------- over a real (private) dbus-daemon

needs_dbus = pytest.mark.skipif(not dbus_daemon_available(), reason="dbus-daemon not installed")


@needs_dbus
def test_mutter_and_logind_over_a_real_bus():
    with private_bus() as address:
        env = {"DBUS_SESSION_BUS_ADDRESS": address}
        mutter = MutterIdleDetector(bus=address, platform="linux", environ=env)
        reason = mutter.unavailable_reason()
        assert reason == (
            "D-Bus error org.freedesktop.DBus.Error.ServiceUnknown: "
            "The name org.gnome.Mutter.IdleMonitor was not provided by any .service files"
        )
        with serve(address, "org.gnome.Mutter.IdleMonitor", mutter_handler(754_321)):
            assert mutter.idle_seconds() == 754.321
            report: list[DetectionResult] = []
            chosen = detect_idle_detector(candidates=[mutter], report=report)
            assert chosen is mutter
            assert report == [DetectionResult("gnome-mutter", True, "idle 754.3 s")]

        props = {"IdleHint": ("b", True), "IdleSinceHintMonotonic": ("t", 5_000_000)}
        with serve(
            address,
            "org.freedesktop.login1",
            logind_handler(props, {"3": "/org/freedesktop/login1/session/_33"}),
        ):
            logind = LogindIdleDetector(bus=address, platform="linux", clocks=lambda: (0, 65_000_000))
            assert logind.idle_seconds() == 60.0
            unknown = LogindIdleDetector(bus=address, platform="linux", session="9")
            assert unknown.unavailable_reason() == (
                "GetSession('9') failed: org.freedesktop.login1.NoSuchSession: No session '9' known"
            )
