"""Busy time from an iCalendar (ICS) file or a secret ICS link (Google Calendar, Outlook).

:class:`CalendarSource` loads the calendar, keeps the last good copy (in memory and on disk) when a
fetch fails, and expands it with ``icalendar`` + ``recurring-ical-events`` into :class:`Interval`\\ s:

- recurring events (``RRULE``, ``EXDATE``, moved and cancelled occurrences via ``RECURRENCE-ID``);
- time zones (``TZID``, including Outlook's Windows names and ``X-WR-TIMEZONE``), DST included;
- all-day events are *dates*: they become midnight-to-midnight in the user's time zone (23 or 25 hours
  on DST days);
- floating times (no zone) are read in the user's time zone;
- free time is not busy: ``TRANSP:TRANSPARENT``, Outlook's ``X-MICROSOFT-CDO-BUSYSTATUS:FREE``,
  ``STATUS:CANCELLED``, and events the configured attendee declined.

``icalendar`` and ``recurring-ical-events`` come with the ``schedule`` extra and are imported lazily.
Secret links carry a token in their path, so the link is never logged or put in an error message:
:func:`redact_url` keeps only the scheme and host.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

from langchain_metaclaw._compat import require
from langchain_metaclaw.errors import MetaClawError
from langchain_metaclaw.schedule.clock import Clock, SystemClock, local_timezone, resolve_local

__all__ = [
    "CalendarSource",
    "CalendarStatus",
    "CalendarUnavailable",
    "Interval",
    "merge_intervals",
    "redact_url",
]

logger = logging.getLogger(__name__)

#: Refuse calendars larger than this (a runaway or wrong URL); Google exports of busy calendars are < 10 MB.
DEFAULT_MAX_BYTES = 32 * 1024 * 1024

Fetcher = Callable[[str, float, int], bytes]


class CalendarUnavailable(MetaClawError, RuntimeError):
    """No good copy of the calendar has ever been loaded; ``reason`` says why."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"calendar {source}: {reason}")

    def __reduce__(self):
        return (type(self), (self.source, self.reason))


@dataclass(frozen=True, order=True)
class Interval:
    """A half-open busy interval ``[start, end)``; both ends are stored in UTC.

    UTC on purpose: Python compares and subtracts two datetimes that share a ``tzinfo`` by wall time,
    which is wrong across a DST change (a 23-hour day would read as 24 hours).
    """

    start: datetime
    end: datetime
    summary: str = ""
    uid: str | None = None
    all_day: bool = False

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            value = getattr(self, name)
            if value.tzinfo is None or value.utcoffset() is None:
                msg = f"Interval.{name} must be timezone-aware, got {value!r}"
                raise ValueError(msg)
            object.__setattr__(self, name, value.astimezone(UTC))
        if self.end <= self.start:
            msg = f"Interval must end after it starts ({self.start.isoformat()} .. {self.end.isoformat()})"
            raise ValueError(msg)

    def contains(self, when: datetime) -> bool:
        return self.start <= when < self.end

    def overlaps(self, start: datetime, end: datetime) -> bool:
        return self.start < end and start < self.end

    @property
    def duration(self) -> timedelta:
        return self.end - self.start


def merge_intervals(intervals: Iterable[Interval]) -> list[Interval]:
    """Overlapping or touching intervals merged into blocks; a block keeps the first event's summary and uid,
    and lists the others in its summary (``"Team sync + Planning"``)."""
    merged: list[Interval] = []
    for iv in sorted(intervals, key=lambda i: (i.start, i.end)):
        if merged and iv.start <= merged[-1].end:
            last = merged[-1]
            summary = last.summary
            if iv.summary and iv.summary not in summary.split(" + "):
                summary = f"{summary} + {iv.summary}" if summary else iv.summary
            merged[-1] = Interval(
                last.start, max(last.end, iv.end), summary, last.uid, last.all_day and iv.all_day
            )
        else:
            merged.append(iv)
    return merged


def redact_url(url: str) -> str:
    """``https://calendar.google.com/…`` : scheme and host only (secret ICS links carry a token)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    return (
        f"{parts.scheme}://{host}/…"
        if parts.path not in ("", "/") or parts.query
        else f"{parts.scheme}://{host}"
    )


def _http_get(url: str, timeout: float, max_bytes: int) -> bytes:
    """GET ``url`` with a timeout and a size cap (the one network call; tests replace it)."""
    request = urllib.request.Request(
        url, headers={"User-Agent": "langchain-metaclaw", "Accept": "text/calendar, */*;q=0.5"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - http(s) only, checked
        data = response.read(max_bytes + 1)
    if len(data) > max_bytes:
        msg = f"calendar is larger than {max_bytes} bytes"
        raise ValueError(msg)
    return data


def _describe_fetch_error(exc: BaseException) -> str:
    """A message about a failed fetch that never contains the (secret) URL."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        return (
            f"network error: {type(reason).__name__}: {reason}"
            if isinstance(reason, BaseException)
            else (f"network error: {reason}")
        )
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class CalendarStatus:
    """What ``metaclaw status`` shows about a calendar."""

    source: str
    """The file path, or the link with its secret part removed."""
    loaded_at: datetime | None
    """When the calendar in use was loaded (``None``: never)."""
    from_cache: bool
    """The calendar in use came from the on-disk last-good copy, not a fresh fetch."""
    last_error: str | None
    """Why the last refresh failed (``None`` when it succeeded)."""
    last_error_at: datetime | None
    events: int
    """Number of ``VEVENT`` components (series count once) in the calendar in use."""


class _Loaded:
    """A parsed calendar and its recurrence query, built once per successful load."""

    def __init__(self, data: bytes) -> None:
        icalendar = require("icalendar", backend="calendar", extra="schedule")
        recurring = require("recurring_ical_events", backend="calendar", extra="schedule")
        calendar = icalendar.Calendar.from_ical(data)
        if getattr(calendar, "name", None) != "VCALENDAR":
            msg = f"not an iCalendar file (top component is {getattr(calendar, 'name', None)!r})"
            raise ValueError(msg)
        self.calendar = calendar
        self.events = len(calendar.walk("VEVENT"))
        self.query = recurring.of(calendar, skip_bad_series=True)


class CalendarSource:
    """An ICS calendar from a file or an http(s)/webcal link, expanded into busy intervals.

    Args:
        source (`str | Path`): a file path, or an ``http://``/``https://``/``webcal://`` link (e.g. Google's
            "Secret address in iCal format" or Outlook's published ICS link). Anything with a ``str()``
            of that form (a pydantic ``HttpUrl``, an ``httpx.URL``) works.
        tz (`str | tzinfo`, *optional*): the user's time zone for all-day events and floating times;
            defaults to the machine's zone.
        timeout (`float`, defaults to 10): seconds for each network operation of a fetch.
        refresh_interval (`timedelta`, defaults to 15 min): how often a link is fetched again (a file is
            re-read as soon as its modification time changes).
        cache_dir (`Path`, *optional*): where the last good copy of a link is kept (default
            ``$METACLAW_HOME/calendars``); ``use_disk_cache=False`` keeps it in memory only.
        attendee (`str`, *optional*): the user's e-mail; events in which this attendee has
            ``PARTSTAT=DECLINED`` are free.
        clock (`Clock`, *optional*): for the refresh timer and status timestamps.
        fetch (*optional*): ``fetch(url, timeout, max_bytes) -> bytes`` replacing the HTTP GET (tests).
        auto_refresh (`bool`, defaults to True): :meth:`busy_intervals` refreshes when due (a link fetch
            then blocks the caller for up to ``timeout`` per network operation). With ``False`` only the
            first call loads; call :meth:`refresh` yourself (e.g. from its own scheduler job).

    A failing fetch never throws away a good calendar: the previous copy (in memory, else on disk) stays
    in use and :attr:`status` reports the error. Only when no good copy was ever loaded does
    :meth:`busy_intervals` raise :class:`CalendarUnavailable`.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | Any,
        *,
        tz: str | tzinfo | None = None,
        timeout: float = 10.0,
        refresh_interval: timedelta = timedelta(minutes=15),
        cache_dir: str | os.PathLike[str] | None = None,
        use_disk_cache: bool = True,
        attendee: str | None = None,
        clock: Clock | None = None,
        fetch: Fetcher | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        auto_refresh: bool = True,
    ) -> None:
        text = os.fspath(source) if isinstance(source, os.PathLike) else str(source)
        scheme = urllib.parse.urlsplit(text).scheme.lower()
        self.kind: Literal["file", "url"]
        if scheme in ("http", "https", "webcal", "webcals"):
            self.kind = "url"
            self.url: str | None = "https" + text[len(scheme) :] if scheme.startswith("webcal") else text
            self.path: Path | None = None
            self.display = redact_url(self.url)
        else:
            self.kind = "file"
            self.url = None
            self.path = Path(text).expanduser()
            self.display = str(self.path)
        self.tz: tzinfo = ZoneInfo(tz) if isinstance(tz, str) else (tz or local_timezone())
        self.timeout = timeout
        self.refresh_interval = refresh_interval
        self.attendee = attendee.lower().removeprefix("mailto:") if attendee else None
        self.clock = clock or SystemClock()
        self.max_bytes = max_bytes
        self.auto_refresh = auto_refresh
        self._fetch = fetch or _http_get
        self._use_disk_cache = use_disk_cache and self.kind == "url"
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._lock = threading.RLock()
        self._loaded: _Loaded | None = None
        self._generation = 0
        self._loaded_at: datetime | None = None
        self._from_cache = False
        self._last_attempt: float | None = None
        self._last_error: str | None = None
        self._last_error_at: datetime | None = None
        self._file_stamp: tuple[int, int] | None = None
        self._span: tuple[int, datetime, datetime, list[Interval]] | None = None

    # -- loading -------------------------------------------------------------------------------------

    @property
    def cache_path(self) -> Path | None:
        """Where the last good copy of a link lives (``None`` for files or without disk cache)."""
        if not self._use_disk_cache or self.url is None:
            return None
        if self._cache_dir is not None:
            directory = self._cache_dir
        else:
            from langchain_metaclaw.config import metaclaw_home

            directory = metaclaw_home() / "calendars"
        digest = hashlib.sha256(self.url.encode()).hexdigest()[:20]
        return directory / f"{digest}.ics"

    def _read(self) -> bytes:
        if self.path is not None:
            return self.path.read_bytes()
        assert self.url is not None
        return self._fetch(self.url, self.timeout, self.max_bytes)

    def _install(self, loaded: _Loaded, *, from_cache: bool) -> None:
        self._loaded = loaded
        self._generation += 1
        self._span = None
        self._loaded_at = self.clock.now()
        self._from_cache = from_cache

    def _write_cache(self, data: bytes) -> None:
        path = self.cache_path
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the link's content is private
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            logger.warning("could not write calendar cache %s: %s", path, exc)

    def _load_cache(self) -> bool:
        path = self.cache_path
        if path is None or not path.exists():
            return False
        try:
            self._install(_Loaded(path.read_bytes()), from_cache=True)
        except Exception as exc:  # noqa: BLE001 - a corrupt cache is just no cache
            logger.warning("ignoring unreadable calendar cache %s: %s", path, exc)
            return False
        return True

    def refresh(self) -> bool:
        """Load the calendar now. True when a new good copy is in use; False when the load failed (the
        previous good copy, or the disk cache, stays in use and :attr:`status` has the error)."""
        with self._lock:
            self._last_attempt = self.clock.monotonic()
            stamp = None
            try:
                if self.path is not None:
                    st = self.path.stat()
                    stamp = (st.st_mtime_ns, st.st_size)
                data = self._read()
                loaded = _Loaded(data)
            except Exception as exc:  # noqa: BLE001 - every failure keeps the last good calendar
                if self.path is not None and self.path.exists() is False:
                    error = f"file not found: {self.path}"
                elif self.url is not None:
                    error = _describe_fetch_error(exc)
                else:
                    error = f"{type(exc).__name__}: {exc}"
                self._last_error = error
                self._last_error_at = self.clock.now()
                self._file_stamp = stamp  # a broken or vanished file is retried once it changes again
                if self._loaded is None and self._load_cache():
                    logger.warning("calendar %s: %s; using the cached copy", self.display, error)
                else:
                    kept = "keeping the last good copy" if self._loaded is not None else "no calendar yet"
                    logger.warning("calendar %s: %s; %s", self.display, error, kept)
                return False
            self._install(loaded, from_cache=False)
            self._file_stamp = stamp
            self._last_error = None
            self._last_error_at = None
            if self.url is not None:
                self._write_cache(data)
            logger.info("calendar %s loaded (%d events)", self.display, loaded.events)
            return True

    def _maybe_refresh(self) -> None:
        if self._last_attempt is None:
            self.refresh()
            return
        if not self.auto_refresh:
            return
        if self.path is not None:
            try:
                st = self.path.stat()
                changed = (st.st_mtime_ns, st.st_size) != self._file_stamp
            except OSError:
                changed = self._file_stamp is not None  # file vanished: report it, keep the last copy
            if changed and self.clock.monotonic() - self._last_attempt >= 1.0:
                self.refresh()
            return
        if self.clock.monotonic() - self._last_attempt >= self.refresh_interval.total_seconds():
            self.refresh()

    @property
    def status(self) -> CalendarStatus:
        with self._lock:
            return CalendarStatus(
                source=self.display,
                loaded_at=self._loaded_at,
                from_cache=self._from_cache,
                last_error=self._last_error,
                last_error_at=self._last_error_at,
                events=self._loaded.events if self._loaded else 0,
            )

    @property
    def last_error(self) -> str | None:
        """Why the last refresh failed, or ``None``."""
        return self._last_error

    # -- expansion -----------------------------------------------------------------------------------

    def busy_intervals(self, start: datetime, end: datetime) -> list[Interval]:
        """Busy intervals overlapping ``[start, end)``, sorted, unclipped (an event that began before
        ``start`` keeps its real start and end). Refreshes first when due.

        Raises:
            CalendarUnavailable: no good copy of the calendar has been loaded.
        """
        for name, value in (("start", start), ("end", end)):
            if value.tzinfo is None or value.utcoffset() is None:
                msg = f"busy_intervals needs timezone-aware datetimes ({name}={value!r})"
                raise ValueError(msg)
        with self._lock:
            self._maybe_refresh()
            if self._loaded is None:
                raise CalendarUnavailable(self.display, self._last_error or "not loaded")
            span = self._span
            if span is None or span[0] != self._generation or not (span[1] <= start and end <= span[2]):
                # Expand a day beyond what was asked so a watchdog sliding forward hits the cache.
                span_end = max(end, start + timedelta(days=1)) + timedelta(days=1)
                span = (self._generation, start, span_end, self._expand(self._loaded, start, span_end))
                self._span = span
            return [iv for iv in span[3] if iv.overlaps(start, end)]

    def _expand(self, loaded: _Loaded, start: datetime, end: datetime) -> list[Interval]:
        intervals = []
        # Ask a day wider, in the user's zone: floating times are compared as local times, and the exact
        # overlap test below runs on the converted intervals.
        pad = timedelta(days=1)
        for event in loaded.query.between((start - pad).astimezone(self.tz), (end + pad).astimezone(self.tz)):
            interval = self._to_interval(event)
            if interval is not None and interval.overlaps(start, end):
                intervals.append(interval)
        return sorted(intervals, key=lambda i: (i.start, i.end, i.summary))

    def _is_free(self, event: Any) -> bool:
        if str(event.get("STATUS", "")).upper() == "CANCELLED":
            return True
        if str(event.get("TRANSP", "OPAQUE")).upper() == "TRANSPARENT":
            return True
        if str(event.get("X-MICROSOFT-CDO-BUSYSTATUS", "")).upper() == "FREE":
            return True
        if self.attendee:
            attendees = event.get("ATTENDEE")
            for attendee in attendees if isinstance(attendees, list) else [attendees] if attendees else []:
                address = str(attendee).lower().removeprefix("mailto:")
                if (
                    address == self.attendee
                    and str(attendee.params.get("PARTSTAT", "")).upper() == "DECLINED"
                ):
                    return True
        return False

    def _as_instant(self, value: date | datetime) -> datetime:
        if isinstance(value, datetime):
            return value.replace(tzinfo=self.tz) if value.tzinfo is None else value
        return resolve_local(value, time(0), self.tz)

    def _to_interval(self, event: Any) -> Interval | None:
        if self._is_free(event):
            return None
        dtstart = event.get("DTSTART")
        if dtstart is None:
            return None
        raw_start = dtstart.dt
        all_day = not isinstance(raw_start, datetime)
        dtend = event.get("DTEND")
        if dtend is not None:
            raw_end = dtend.dt
        elif event.get("DURATION") is not None:
            raw_end = raw_start + event.get("DURATION").dt
        else:  # RFC 5545: a date lasts one day, a date-time without end takes no time
            raw_end = raw_start + timedelta(days=1) if all_day else raw_start
        start = self._as_instant(raw_start)
        end = self._as_instant(raw_end)
        if end <= start:
            return None
        uid = event.get("UID")
        return Interval(
            start=start,
            end=end,
            summary=str(event.get("SUMMARY", "")),
            uid=str(uid) if uid is not None else None,
            all_day=all_day,
        )

    def __repr__(self) -> str:
        return f"CalendarSource({self.display!r}, tz={self.tz!s})"
