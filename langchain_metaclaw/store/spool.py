"""Crash-safe spool: capture appends each record here before queueing it for the database.

A record is appended with one unbuffered ``os.write`` of a whole JSON line on the calling thread, so once
the callback returns the kernel holds the bytes: a SIGKILL of the agent loses nothing it acknowledged.
Records go to numbered segment files; the writer thread deletes a segment once every record in it is
committed and the segment is no longer the one being appended to. Whoever opens the store next replays
the segments that a dead process left behind (an advisory ``flock`` held by the owner tells live
segments from orphans; on platforms without ``fcntl`` a segment is an orphan when its pid is gone).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".jsonl"


class Spool:
    """Append-only segment files owned by one process (thread-safe)."""

    def __init__(self, directory: Path, *, max_segment_bytes: int = 4 << 20) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_segment_bytes = max_segment_bytes
        self._prefix = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        self._segment = -1
        self._fd = -1
        self._size = 0
        self._pending: dict[int, int] = {}
        self._paths: dict[int, Path] = {}
        self._closed = False
        self._open_segment()

    def _open_segment(self) -> None:
        self._segment += 1
        path = self.directory / f"{self._prefix}-{self._segment:06d}{SEGMENT_SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._fd, self._size = fd, 0
        self._paths[self._segment] = path
        self._pending[self._segment] = 0

    def append(self, line: bytes) -> int:
        """Write one newline-terminated record; returns its segment number. Raises ``OSError`` (disk full)."""
        with self._lock:
            if self._closed:
                raise OSError("spool is closed")
            if self._size >= self.max_segment_bytes:
                self._rotate_locked()
            os.write(self._fd, line)
            self._size += len(line)
            self._pending[self._segment] += 1
            return self._segment

    def committed(self, segments: Iterator[int] | list[int]) -> None:
        """Mark one record per entry as committed; delete segments that are finished and rotated out."""
        with self._lock:
            for seg in segments:
                self._pending[seg] -= 1
            for seg in [s for s, n in self._pending.items() if n == 0 and s != self._segment]:
                self._unlink_locked(seg)

    def _rotate_locked(self) -> None:
        old_fd = self._fd
        self._open_segment()
        os.close(old_fd)
        for seg in [s for s, n in self._pending.items() if n == 0 and s != self._segment]:
            self._unlink_locked(seg)

    def _unlink_locked(self, seg: int) -> None:
        path = self._paths.pop(seg)
        self._pending.pop(seg)
        try:
            path.unlink()
        except FileNotFoundError:
            pass

    @property
    def pending(self) -> int:
        with self._lock:
            return sum(self._pending.values())

    def close(self) -> None:
        """Close the current segment; delete it when everything in it was committed."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._fd)
            for seg in [s for s, n in self._pending.items() if n == 0]:
                self._unlink_locked(seg)


def _owner_alive(path: Path) -> bool:
    if fcntl is not None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return True  # deleted meanwhile: nothing to replay
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False
    pid = int(path.name.split("-", 1)[0])
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def orphan_segments(directory: Path) -> list[Path]:
    """Segments whose owning process is gone, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(
        (p for p in directory.glob(f"*{SEGMENT_SUFFIX}") if not _owner_alive(p)),
        key=lambda p: (p.stat().st_mtime, p.name),
    )


def read_segment(path: Path) -> tuple[list[dict], int]:
    """Records of one segment and the number of unreadable lines (a write cut by a crash).

    Each line holds the JSON list of records of one callback event.
    """
    records: list[dict] = []
    bad = 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                event = json.loads(raw)
            except ValueError:
                bad += 1
                continue
            records.extend(event if isinstance(event, list) else [event])
    if bad:
        logger.warning("spool %s: skipped %d unreadable line(s)", path.name, bad)
    return records, bad
