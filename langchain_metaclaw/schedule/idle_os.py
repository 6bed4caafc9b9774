"""What each operating system says about keyboard idle time, and how to read it.

The pure parsers (tested on recorded outputs), the D-Bus messages the detectors send, and the operating-system
calls themselves (one small function each: a subprocess, a D-Bus round trip, a ctypes call; tests replace
them). The detectors that combine them are in :mod:`~langchain_metaclaw.schedule.idle`.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from langchain_metaclaw.errors import MetaClawError

if TYPE_CHECKING:  # jeepney is optional; only the D-Bus detectors import it, lazily
    from jeepney import Message

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "CommandRunner",
    "DBusCall",
    "IdleUnavailable",
    "dbus_call",
    "dbus_error_name",
    "logind_get_session_message",
    "logind_properties_message",
    "logind_session_path",
    "mutter_idletime_message",
    "parse_ioreg_idle",
    "parse_logind_reply",
    "parse_mutter_reply",
    "parse_xprintidle",
    "read_windows_ticks",
    "run_command",
    "windows_idle_seconds",
]

#: Seconds any single OS call may take (subprocess, D-Bus connect + round trip).
DEFAULT_TIMEOUT_S = 2.0


class IdleUnavailable(MetaClawError, RuntimeError):
    """The idle time cannot be read with this detector; ``reason`` says why (shown to the user)."""

    def __init__(self, detector: str, reason: str) -> None:
        self.detector = detector
        self.reason = reason
        super().__init__(f"{detector}: {reason}")

    def __reduce__(self):  # picklable across process pools
        return (type(self), (self.detector, self.reason))



# --------------------------------------------------------------------------------------------------
# Pure parsers (tested on recorded outputs)
# --------------------------------------------------------------------------------------------------

_IOREG_VALUE = r'"HIDIdleTime"\s*=\s*(?:(?P<int>\d+)|<(?P<hex>[0-9A-Fa-f]+)>)'
# A property line of the entry ("      |   "HIDIdleTime" = 123"), preferred over a key nested in a dict value.
_IOREG_PROPERTY_RE = re.compile(r"^[\s|]*" + _IOREG_VALUE, re.MULTILINE)
_IOREG_ANY_RE = re.compile(_IOREG_VALUE)


def parse_ioreg_idle(output: str) -> float:
    """Seconds of idle time from ``ioreg -c IOHIDSystem`` output (``"HIDIdleTime" = <nanoseconds>``).

    Takes the first ``HIDIdleTime`` property line (the IOHIDSystem entry). Very old macOS printed the
    value as little-endian data (``<00e40b5402000000>``); both forms are read.
    """
    match = _IOREG_PROPERTY_RE.search(output) or _IOREG_ANY_RE.search(output)
    if match is None:
        raise IdleUnavailable("ioreg", "no HIDIdleTime in `ioreg -c IOHIDSystem` output")
    if match.group("int") is not None:
        nanoseconds = int(match.group("int"))
    else:
        nanoseconds = int.from_bytes(bytes.fromhex(match.group("hex")), "little")
    return nanoseconds / 1e9


def parse_xprintidle(output: str) -> float:
    """Seconds of idle time from ``xprintidle`` stdout (milliseconds, one integer)."""
    text = output.strip()
    if not text.isdigit():
        shown = text[:80] or "<empty>"
        raise IdleUnavailable("xprintidle", f"unexpected xprintidle output: {shown!r}")
    return int(text) / 1000.0


def dbus_error_name(reply: Message) -> str | None:
    from jeepney import HeaderFields, MessageType

    if reply.header.message_type == MessageType.error:
        name = reply.header.fields.get(HeaderFields.error_name, "unknown error")
        detail = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
        return f"{name}: {detail}" if detail else str(name)
    return None


def parse_mutter_reply(reply: Message) -> float:
    """Seconds of idle time from the reply to ``org.gnome.Mutter.IdleMonitor.GetIdletime`` (``t``, ms)."""
    error = dbus_error_name(reply)
    if error is not None:
        raise IdleUnavailable("gnome-mutter", f"D-Bus error {error}")
    body = reply.body
    if len(body) != 1 or not isinstance(body[0], int) or isinstance(body[0], bool) or body[0] < 0:
        raise IdleUnavailable("gnome-mutter", f"unexpected GetIdletime reply body {body!r}")
    return body[0] / 1000.0


def parse_logind_reply(reply: Message, *, now_realtime_us: int, now_monotonic_us: int) -> float:
    """Seconds of idle time from ``Properties.GetAll("org.freedesktop.login1.Session")``.

    ``IdleHint`` false means the session says it is in use: 0 s. When true, idle time counts from
    ``IdleSinceHintMonotonic`` (immune to wall-clock jumps) or else ``IdleSinceHint`` (both in µs).
    Mind that a desktop sets the hint only after its own idle delay (GNOME: the screen-blank delay), so
    logind is coarser than the other detectors; the clocks are arguments to keep this function pure.
    """
    error = dbus_error_name(reply)
    if error is not None:
        raise IdleUnavailable("logind", f"D-Bus error {error}")
    if len(reply.body) != 1 or not isinstance(reply.body[0], dict):
        raise IdleUnavailable("logind", f"unexpected GetAll reply body {reply.body!r}")
    props: Mapping[str, Any] = {k: v[1] if isinstance(v, tuple) else v for k, v in reply.body[0].items()}
    if "IdleHint" not in props:
        raise IdleUnavailable("logind", "session has no IdleHint property")
    if not props["IdleHint"]:
        return 0.0
    since_mono = int(props.get("IdleSinceHintMonotonic") or 0)
    if since_mono > 0:
        return max(0, now_monotonic_us - since_mono) / 1e6
    since_real = int(props.get("IdleSinceHint") or 0)
    if since_real > 0:
        return max(0, now_realtime_us - since_real) / 1e6
    raise IdleUnavailable("logind", "IdleHint is set but IdleSinceHint is 0 (idle since unknown)")


_TICK_MASK = 0xFFFFFFFF


def windows_idle_seconds(tick_count: int, last_input_tick: int) -> float:
    """Seconds between ``LASTINPUTINFO.dwTime`` and ``GetTickCount()`` (both 32-bit ms, wrapping at 49.7 days).

    Input that lands between the two calls can put ``last_input_tick`` a few ms *after* ``tick_count``;
    that reads as 0, not as 49 days.
    """
    delta = (tick_count - last_input_tick) & _TICK_MASK
    if delta > _TICK_MASK - 60_000:  # last input "in the future" by < 1 min: a race, not 49 days
        return 0.0
    return delta / 1000.0


# --------------------------------------------------------------------------------------------------
# D-Bus message construction (real jeepney messages; tests inspect them)
# --------------------------------------------------------------------------------------------------

MUTTER_BUS_NAME = "org.gnome.Mutter.IdleMonitor"
MUTTER_OBJECT_PATH = "/org/gnome/Mutter/IdleMonitor/Core"
MUTTER_INTERFACE = "org.gnome.Mutter.IdleMonitor"

LOGIND_BUS_NAME = "org.freedesktop.login1"
LOGIND_SESSION_INTERFACE = "org.freedesktop.login1.Session"
LOGIND_MANAGER_PATH = "/org/freedesktop/login1"
LOGIND_MANAGER_INTERFACE = "org.freedesktop.login1.Manager"


def mutter_idletime_message() -> Message:
    """The ``GetIdletime`` method call to Mutter's core idle monitor."""
    from jeepney import DBusAddress, new_method_call

    address = DBusAddress(MUTTER_OBJECT_PATH, bus_name=MUTTER_BUS_NAME, interface=MUTTER_INTERFACE)
    return new_method_call(address, "GetIdletime")


def logind_session_path(session: str) -> str | None:
    """Object path for ``"auto"`` / ``"self"``; ``None`` for a session id (ask ``GetSession`` for it)."""
    if session in ("auto", "self"):
        return f"{LOGIND_MANAGER_PATH}/session/{session}"
    if session.startswith("/"):
        return session
    return None


def logind_get_session_message(session_id: str) -> Message:
    """``Manager.GetSession(id)``, which answers the session's object path."""
    from jeepney import DBusAddress, new_method_call

    address = DBusAddress(LOGIND_MANAGER_PATH, bus_name=LOGIND_BUS_NAME, interface=LOGIND_MANAGER_INTERFACE)
    return new_method_call(address, "GetSession", "s", (session_id,))


def logind_properties_message(session_path: str) -> Message:
    """``Properties.GetAll("org.freedesktop.login1.Session")`` on ``session_path``."""
    from jeepney import DBusAddress, Properties

    address = DBusAddress(session_path, bus_name=LOGIND_BUS_NAME, interface=LOGIND_SESSION_INTERFACE)
    return Properties(address).get_all()


# --------------------------------------------------------------------------------------------------
# The operating-system calls (one small function each; tests replace them)
# --------------------------------------------------------------------------------------------------

CommandRunner = Callable[[Sequence[str], float], str]
DBusCall = Callable[[str, "Message", float], "Message"]


def run_command(argv: Sequence[str], timeout: float) -> str:
    """Run ``argv`` and return stdout; any failure becomes :class:`IdleUnavailable`."""
    name = os.path.basename(argv[0])
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise IdleUnavailable(name, f"{argv[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise IdleUnavailable(name, f"{argv[0]} did not answer within {timeout:g} s") from None
    except OSError as exc:
        raise IdleUnavailable(name, f"could not run {argv[0]}: {exc}") from exc
    if proc.returncode != 0:
        stderr = (proc.stderr or "").strip().splitlines()
        detail = f": {stderr[-1][:200]}" if stderr else ""
        raise IdleUnavailable(name, f"{argv[0]} exited with status {proc.returncode}{detail}")
    return proc.stdout


def _bus_label(bus: str) -> str:
    return f"{bus.lower()} bus" if bus in ("SESSION", "SYSTEM") else f"D-Bus at {bus}"


def dbus_call(bus: str, message: Message, timeout: float) -> Message:
    """Send ``message`` on ``bus`` (``"SESSION"``, ``"SYSTEM"`` or an address) and return the reply."""
    from jeepney.io.blocking import open_dbus_connection

    label = _bus_label(bus)
    try:
        with open_dbus_connection(bus=bus, auth_timeout=timeout) as conn:
            return conn.send_and_get_reply(message, timeout=timeout)
    except KeyError as exc:  # jeepney reads DBUS_SESSION_BUS_ADDRESS from os.environ
        raise IdleUnavailable("dbus", f"no {label} address ({exc.args[0]} unset)") from None
    except TimeoutError:
        raise IdleUnavailable("dbus", f"{label} did not answer within {timeout:g} s") from None
    except Exception as exc:  # noqa: BLE001 - socket, auth and protocol errors all mean "unavailable"
        raise IdleUnavailable("dbus", f"{label}: {type(exc).__name__}: {exc}") from exc


def read_windows_ticks() -> tuple[int, int]:
    """``(GetTickCount(), LASTINPUTINFO.dwTime)``; the tick count is read second so it is never older."""
    import ctypes
    from ctypes import wintypes

    class LASTINPUTINFO(ctypes.Structure):
        _fields_ = [("cbSize", wintypes.UINT), ("dwTime", wintypes.DWORD)]

    info = LASTINPUTINFO()
    info.cbSize = ctypes.sizeof(LASTINPUTINFO)
    user32 = ctypes.windll.user32  # type: ignore[attr-defined]
    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    if not user32.GetLastInputInfo(ctypes.byref(info)):
        raise IdleUnavailable("windows", f"GetLastInputInfo failed: {ctypes.WinError()}")  # type: ignore[attr-defined]
    kernel32.GetTickCount.restype = wintypes.DWORD
    return int(kernel32.GetTickCount()), int(info.dwTime)
