"""How long the user has been away from the keyboard, per operating system.

Each detector keeps its operating-system call in one small function (a subprocess, a D-Bus round trip, a
ctypes call) and its *parsing* in a pure function that the tests feed with recorded outputs, both in
:mod:`~langchain_metaclaw.schedule.idle_os`:

=================  ==========================================  =====================================
name               source                                      pure parser
=================  ==========================================  =====================================
``ioreg``          macOS ``ioreg -c IOHIDSystem`` HIDIdleTime  :func:`parse_ioreg_idle`
``gnome-mutter``   ``org.gnome.Mutter.IdleMonitor.GetIdletime`` :func:`parse_mutter_reply`
                   on the session bus (GNOME, X11 or Wayland)
``xprintidle``     ``xprintidle`` (X11 only)                   :func:`parse_xprintidle`
``logind``         ``org.freedesktop.login1`` session           :func:`parse_logind_reply`
                   ``IdleHint``/``IdleSinceHint`` (system bus)
``windows``        ``GetLastInputInfo`` + ``GetTickCount``      :func:`windows_idle_seconds`
=================  ==========================================  =====================================

A detector never invents a value: when it cannot read the idle time it raises :class:`IdleUnavailable`
with the reason, and the window policy treats the idle trigger as not satisfied.
:func:`detect_idle_detector` picks the first detector that works here, in a per-platform order, and
:func:`detection_report` says why each candidate does or does not work. D-Bus uses ``jeepney`` (pure
Python, the ``schedule`` extra), imported only when a D-Bus detector is used.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

from langchain_metaclaw.errors import ConfigurationError
from langchain_metaclaw.schedule.idle_os import (
    DEFAULT_TIMEOUT_S,
    CommandRunner,
    DBusCall,
    IdleUnavailable,
    dbus_call,
    dbus_error_name,
    logind_get_session_message,
    logind_properties_message,
    logind_session_path,
    mutter_idletime_message,
    parse_ioreg_idle,
    parse_logind_reply,
    parse_mutter_reply,
    parse_xprintidle,
    read_windows_ticks,
    run_command,
    windows_idle_seconds,
)

__all__ = [
    "DETECTORS",
    "DetectionResult",
    "IdleDetector",
    "IoregIdleDetector",
    "LogindIdleDetector",
    "MutterIdleDetector",
    "WindowsIdleDetector",
    "XprintidleDetector",
    "default_detector_order",
    "detect_idle_detector",
    "detection_report",
    "format_detection_report",
]

logger = logging.getLogger(__name__)

@runtime_checkable
class IdleDetector(Protocol):
    """Anything that can say how many seconds the user has not touched keyboard or mouse."""

    name: str

    def available(self) -> bool:
        """Whether :meth:`idle_seconds` works on this machine right now."""
        ...

    def idle_seconds(self) -> float:
        """Seconds since the last user input; raises :class:`IdleUnavailable`, never returns a made-up value."""
        ...


# --------------------------------------------------------------------------------------------------
# Detectors
# --------------------------------------------------------------------------------------------------


def _is_unix_desktop(platform: str) -> bool:
    return platform.startswith(("linux", "freebsd", "openbsd", "netbsd", "dragonfly"))


class _Detector:
    """Shared plumbing: environment injection (``platform``, ``environ``, ``which``) and the probe."""

    name: ClassVar[str] = "detector"

    def __init__(
        self,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        platform: str | None = None,
        environ: Mapping[str, str] | None = None,
        which: Callable[[str], str | None] | None = None,
    ) -> None:
        self.timeout = timeout
        self._platform = platform if platform is not None else sys.platform
        self._environ = environ if environ is not None else os.environ
        self._which = which or shutil.which

    def precondition(self) -> str | None:
        """Why this detector cannot work here without even trying (``None`` when it may work)."""
        return None

    def unavailable_reason(self) -> str | None:
        """``None`` when a real reading succeeds now; otherwise why not (preconditions, then one reading)."""
        reason = self.precondition()
        if reason is not None:
            return reason
        try:
            self.idle_seconds()
        except IdleUnavailable as exc:
            return exc.reason
        return None

    def available(self) -> bool:
        return self.unavailable_reason() is None

    def idle_seconds(self) -> float:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    def _fail(self, reason: str) -> IdleUnavailable:
        return IdleUnavailable(self.name, reason)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class IoregIdleDetector(_Detector):
    """macOS: ``HIDIdleTime`` (ns since the last HID event) from ``ioreg -c IOHIDSystem``."""

    name = "ioreg"
    argv: ClassVar[tuple[str, ...]] = ("ioreg", "-c", "IOHIDSystem")

    def __init__(self, *, run: CommandRunner | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._run = run or run_command

    def precondition(self) -> str | None:
        if self._platform != "darwin":
            return f"macOS only (platform is {self._platform})"
        if self._which("ioreg") is None:
            return "ioreg not on PATH"
        return None

    def idle_seconds(self) -> float:
        try:
            return parse_ioreg_idle(self._run(self.argv, self.timeout))
        except IdleUnavailable as exc:
            raise self._fail(exc.reason) from None


class XprintidleDetector(_Detector):
    """Linux/BSD X11: ``xprintidle`` (ms since the last X input). Not used on Wayland sessions."""

    name = "xprintidle"

    def __init__(self, *, run: CommandRunner | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._run = run or run_command

    def precondition(self) -> str | None:
        if not _is_unix_desktop(self._platform):
            return f"X11 desktops only (platform is {self._platform})"
        if not self._environ.get("DISPLAY"):
            return "DISPLAY is not set (no X11 session)"
        if self._environ.get("XDG_SESSION_TYPE") == "wayland" or self._environ.get("WAYLAND_DISPLAY"):
            return "Wayland session: xprintidle would only see input to XWayland windows"
        if self._which("xprintidle") is None:
            return "xprintidle not on PATH (apt install xprintidle)"
        return None

    def idle_seconds(self) -> float:
        try:
            return parse_xprintidle(self._run(("xprintidle",), self.timeout))
        except IdleUnavailable as exc:
            raise self._fail(exc.reason) from None


def _jeepney_missing() -> str | None:
    from langchain_metaclaw._compat import is_available

    if not is_available("jeepney"):
        return "jeepney is not installed (pip install 'langchain-metaclaw[schedule]')"
    return None


class MutterIdleDetector(_Detector):
    """GNOME (X11 or Wayland): ``org.gnome.Mutter.IdleMonitor.GetIdletime`` on the session bus."""

    name = "gnome-mutter"

    def __init__(self, *, call: DBusCall | None = None, bus: str = "SESSION", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._call = call or dbus_call
        self.bus = bus

    def precondition(self) -> str | None:
        if not _is_unix_desktop(self._platform):
            return f"GNOME desktops only (platform is {self._platform})"
        missing = _jeepney_missing()
        if missing:
            return missing
        if self.bus == "SESSION" and not self._environ.get("DBUS_SESSION_BUS_ADDRESS"):
            return "no D-Bus session bus (DBUS_SESSION_BUS_ADDRESS is not set)"
        return None

    def idle_seconds(self) -> float:
        try:
            reply = self._call(self.bus, mutter_idletime_message(), self.timeout)
            return parse_mutter_reply(reply)
        except IdleUnavailable as exc:
            raise self._fail(exc.reason) from None


class LogindIdleDetector(_Detector):
    """systemd-logind: the session's ``IdleHint`` / ``IdleSinceHint`` on the system bus.

    ``session`` is ``"auto"`` (the caller's session, else the user's display session), ``"self"``, an
    object path, or a session id (resolved with ``Manager.GetSession``). Coarse: desktops raise the hint
    only after their own idle delay, so a short ``idle_minutes`` may never be reached through logind.
    """

    name = "logind"

    def __init__(
        self,
        *,
        call: DBusCall | None = None,
        bus: str = "SYSTEM",
        session: str = "auto",
        clocks: Callable[[], tuple[int, int]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._call = call or dbus_call
        self.bus = bus
        self.session = session
        self._clocks = clocks or _realtime_and_monotonic_us

    def precondition(self) -> str | None:
        if not self._platform.startswith("linux"):
            return f"Linux with systemd only (platform is {self._platform})"
        return _jeepney_missing()

    def _session_path(self) -> str:
        path = logind_session_path(self.session)
        if path is not None:
            return path
        reply = self._call(self.bus, logind_get_session_message(self.session), self.timeout)
        error = dbus_error_name(reply)
        if error is not None or len(reply.body) != 1 or not isinstance(reply.body[0], str):
            detail = error if error is not None else f"unexpected reply {reply.body!r}"
            raise self._fail(f"GetSession({self.session!r}) failed: {detail}")
        return reply.body[0]

    def idle_seconds(self) -> float:
        try:
            reply = self._call(self.bus, logind_properties_message(self._session_path()), self.timeout)
            realtime_us, monotonic_us = self._clocks()
            return parse_logind_reply(reply, now_realtime_us=realtime_us, now_monotonic_us=monotonic_us)
        except IdleUnavailable as exc:
            raise self._fail(exc.reason) from None


def _realtime_and_monotonic_us() -> tuple[int, int]:
    return time.time_ns() // 1000, time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class WindowsIdleDetector(_Detector):
    """Windows: ``GetLastInputInfo`` against ``GetTickCount`` (ctypes). Sees the caller's desktop session
    only: a Windows service in session 0 never sees user input, so run the scheduler as the user."""

    name = "windows"

    def __init__(self, *, read_ticks: Callable[[], tuple[int, int]] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._read_ticks = read_ticks or read_windows_ticks

    def precondition(self) -> str | None:
        if self._platform != "win32":
            return f"Windows only (platform is {self._platform})"
        return None

    def idle_seconds(self) -> float:
        try:
            tick_count, last_input = self._read_ticks()
        except IdleUnavailable as exc:
            raise self._fail(exc.reason) from None
        except OSError as exc:
            raise self._fail(f"GetLastInputInfo failed: {exc}") from exc
        return windows_idle_seconds(tick_count, last_input)


#: Detector classes by name; ``detect_idle_detector(preferred=[...])`` takes these names.
DETECTORS: dict[str, type[_Detector]] = {
    cls.name: cls
    for cls in (
        IoregIdleDetector,
        MutterIdleDetector,
        XprintidleDetector,
        LogindIdleDetector,
        WindowsIdleDetector,
    )
}


def default_detector_order(platform: str | None = None) -> list[str]:
    """Detector names to try on ``platform`` (default: this one), most precise first.

    Linux: Mutter (exact, works on GNOME Wayland), then xprintidle (exact, X11 only), then logind
    (any systemd desktop that maintains ``IdleHint``, but coarse).
    """
    platform = platform if platform is not None else sys.platform
    if platform == "darwin":
        return ["ioreg"]
    if platform == "win32":
        return ["windows"]
    if _is_unix_desktop(platform):
        order = ["gnome-mutter", "xprintidle"]
        return [*order, "logind"] if platform.startswith("linux") else order
    return []


# --------------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------------


class DetectionResult(NamedTuple):
    """One line of :func:`detection_report`."""

    detector: str
    """Detector name (a key of :data:`DETECTORS`, or a custom detector's ``name``)."""
    available: bool
    reason: str
    """Why not, or the reading that proved it works (``"idle 3.2 s"``)."""


def _candidates(
    preferred: Sequence[str] | None, candidates: Iterable[IdleDetector] | None, platform: str | None
) -> list[IdleDetector]:
    if candidates is not None:
        return list(candidates)
    names = list(preferred) if preferred is not None else default_detector_order(platform)
    unknown = [n for n in names if n not in DETECTORS]
    if unknown:
        msg = f"unknown idle detector(s) {unknown}; known: {sorted(DETECTORS)}"
        raise ConfigurationError(msg)
    kwargs = {"platform": platform} if platform is not None else {}
    return [DETECTORS[n](**kwargs) for n in names]


def _probe(detector: IdleDetector) -> DetectionResult:
    """Preconditions first (cheap), then one real reading: a detector is available only if it reads."""
    name = str(getattr(detector, "name", type(detector).__name__))
    try:
        precondition = getattr(detector, "precondition", None)
        if callable(precondition):
            reason = precondition()
            if reason is not None:
                return DetectionResult(name, False, reason)
        elif not detector.available():
            return DetectionResult(name, False, "available() returned False")
        seconds = detector.idle_seconds()
    except IdleUnavailable as exc:
        return DetectionResult(name, False, exc.reason)
    except Exception as exc:  # noqa: BLE001 - detection must never crash the scheduler
        return DetectionResult(name, False, f"probe failed: {type(exc).__name__}: {exc}")
    if not isinstance(seconds, int | float) or not math.isfinite(seconds) or seconds < 0:
        return DetectionResult(name, False, f"idle_seconds() returned an invalid value {seconds!r}")
    return DetectionResult(name, True, f"idle {seconds:.1f} s")


def _iter_probes(detectors: Sequence[IdleDetector]) -> Iterator[tuple[IdleDetector, DetectionResult]]:
    for detector in detectors:
        yield detector, _probe(detector)


def detection_report(
    preferred: Sequence[str] | None = None,
    *,
    candidates: Iterable[IdleDetector] | None = None,
    platform: str | None = None,
) -> list[DetectionResult]:
    """Probe every candidate (``preferred`` names, else the platform order) and say which work and why."""
    return [result for _, result in _iter_probes(_candidates(preferred, candidates, platform))]


def detect_idle_detector(
    preferred: Sequence[str] | None = None,
    *,
    candidates: Iterable[IdleDetector] | None = None,
    platform: str | None = None,
    report: list[DetectionResult] | None = None,
) -> IdleDetector | None:
    """The first detector that can read the idle time here, or ``None``.

    ``preferred`` is the exact list of detector names to try, in order (a user who names detectors
    means those); ``None`` tries :func:`default_detector_order`. ``candidates`` passes detector objects
    instead (tests, custom detectors). Probing stops at the first that works; pass a list as ``report``
    to receive each probe's :class:`DetectionResult`. Never raises for an unavailable detector, only
    :class:`~langchain_metaclaw.errors.ConfigurationError` for an unknown name.
    """
    results: list[DetectionResult] = [] if report is None else report
    for detector, result in _iter_probes(_candidates(preferred, candidates, platform)):
        results.append(result)
        if result.available:
            logger.info("idle detector: %s (%s)", result.detector, result.reason)
            return detector
    logger.warning("no idle detector available: %s", format_detection_report(results))
    return None


def format_detection_report(results: Iterable[DetectionResult]) -> str:
    """``"gnome-mutter: no D-Bus session bus ...; xprintidle: DISPLAY is not set ..."``."""
    text = "; ".join(f"{r.detector}: {r.reason}" for r in results)
    return text or "no idle detector for this platform"
