"""Which adapter versions this process holds, and how each chat model follows the registry.

Two parts, one home:

- :class:`AdapterFollower`, **one per process and serving target** (the local engine every local backend of the
  process shares; a remote backend is its own target): the only place adapter lifetime is counted. Every holder
  (a chat model serving a version or keeping it warm, each request pinned to it, the server's dynamic-LoRA
  endpoint) takes a hold; the version is loaded through the backend's public ``load_adapter`` on the first hold
  and unloaded through ``unload_adapter`` when the last holder lets go. So one chat model retiring a version
  never pulls it from under another, and a long request keeps its version whatever is promoted meanwhile.
- :class:`RegistryWatch`, one per chat model: the version new requests use (one reference flip, read once per
  request), the warm versions it keeps (the serving one plus the last ones, for instant rollback), the newest
  candidate preloaded (warm standby), and the thread that polls :meth:`AdapterRegistry.current` every
  ``poll_interval``. It never fails a request because of the registry: a version that does not load is logged
  once and remembered (it is tried again only when its files change), and the model keeps serving what it has.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from langchain_metaclaw.adapters.registry import AdapterRegistry
from langchain_metaclaw.errors import AdapterError
from langchain_metaclaw.store.records import AdapterVersion

if TYPE_CHECKING:
    from langchain_metaclaw.store.trace_store import TraceStore

__all__ = ["KEEP_LOADED", "AdapterFollower", "FollowSettings", "RegistryWatch"]

logger = logging.getLogger(__name__)

KEEP_LOADED = 3
"""Adapter versions a chat model keeps loaded (serving + the last ones, for instant rollback)."""


class AdapterBackend(Protocol):
    """What the follower needs of a serving backend (``ServingBackend``'s adapter half)."""

    name: str

    def load_adapter(self, version: str, uri: str) -> None: ...

    def unload_adapter(self, version: str) -> None: ...


_FOLLOWERS: weakref.WeakValueDictionary[int, AdapterFollower] = weakref.WeakValueDictionary()
_FOLLOWERS_LOCK = threading.Lock()


class AdapterFollower:
    """Ref-counted adapter holds of one serving target in this process (get it with :meth:`for_backend`).

    Loads and unloads run outside the count lock (a load takes ~0.5 s): a request pinning an already held
    version never waits for another version's load.
    """

    def __init__(self, backend: AdapterBackend) -> None:
        self.backend = backend
        self._cond = threading.Condition()
        self._holds: dict[str, int] = {}
        self._busy: set[str] = set()  # names being loaded or unloaded right now

    @classmethod
    def for_backend(cls, backend: AdapterBackend) -> AdapterFollower:
        """The process's follower for ``backend``'s target: its shared ``engine`` when it has one, else itself.

        Alive while a holder (chat model, server) keeps it; a new one finds what the engine still has loaded
        (the backend's ``load_adapter`` is idempotent for the same name and path).
        """
        target = getattr(backend, "engine", backend)
        with _FOLLOWERS_LOCK:
            follower = _FOLLOWERS.get(id(target))
            if follower is None:
                follower = _FOLLOWERS[id(target)] = cls(backend)
            return follower

    def holders(self, name: str) -> int:
        """How many holders ``name`` has (0: not held; the backend may still be finishing its unload)."""
        with self._cond:
            return self._holds.get(name, 0)

    def hold(self, name: str, uri: str) -> None:
        """Take a hold on ``name``, loading ``uri`` under it on the first hold.

        Raises:
            AdapterError: the backend refused the adapter (validated first); nothing is held then.
        """
        with self._cond:
            self._cond.wait_for(lambda: name not in self._busy)
            if self._holds.get(name):
                self._holds[name] += 1
                return
            self._busy.add(name)
        try:
            self.backend.load_adapter(name, uri)
        finally:
            with self._cond:
                self._busy.discard(name)
                self._cond.notify_all()
        with self._cond:
            self._holds[name] = self._holds.get(name, 0) + 1

    def pin(self, name: str) -> None:
        """One more hold on a version that is already held (a request of a model serving it): never loads."""
        with self._cond:
            if not self._holds.get(name):
                msg = f"adapter {name!r} is not held in this process; hold() it first"
                raise AdapterError(msg)
            self._holds[name] += 1

    def release(self, name: str, *, strict: bool = False) -> None:
        """Let go of one hold; the last one unloads ``name`` (the backend waits for requests still using it).

        An unload that fails is logged: the backend keeps the adapter, and a later hold reuses it. With
        ``strict`` (the server's unload endpoint, whose caller must learn it) the hold is given back and the
        error raised, so the unload can be tried again.
        """
        with self._cond:
            left = self._holds.get(name, 0) - 1
            if left > 0:
                self._holds[name] = left
                return
            self._holds.pop(name, None)
            if left < 0:
                return
            self._busy.add(name)
        try:
            self.backend.unload_adapter(name)
        except Exception as exc:
            if strict:
                with self._cond:
                    self._holds[name] = self._holds.get(name, 0) + 1
                raise
            logger.warning("metaclaw: could not unload adapter %s: %s", name, exc)
        finally:
            with self._cond:
                self._busy.discard(name)
                self._cond.notify_all()


def _stamp(uri: str) -> int | None:
    """When the adapter's weights last changed (a refused version is tried again once they do)."""
    with contextlib.suppress(OSError):
        return Path(uri, "adapter_model.safetensors").stat().st_mtime_ns
    return None


class FollowSettings(Protocol):
    """What a follower reads, live, from its chat model's fields."""

    adapter: str | None
    """Serve this version instead of following the registry."""
    poll_interval: float
    """Seconds between checks of the registry."""
    preload_candidates: bool
    """Keep the newest candidate loaded, so its promotion is a reference flip."""


class RegistryWatch:
    """One chat model's view of the registry: what new requests use, what it keeps loaded, the polling thread.

    Args:
        backend: the model's serving backend (its holds go through :meth:`AdapterFollower.for_backend`).
        store: the trace store whose registry decides the serving version.
        settings: the chat model, whose fields are read at each use (held weakly: the polling thread stops
            when the model is gone).
    """

    def __init__(self, backend: AdapterBackend, store: TraceStore, settings: FollowSettings) -> None:
        self.backend = backend
        self.follower = AdapterFollower.for_backend(backend)
        self.registry = AdapterRegistry(store)
        self._settings = weakref.ref(settings)
        self.serving: tuple[str | None, str | None] = (None, None)
        """(version, backend name) new requests pin; replaced as a whole, never mutated."""
        self.loaded: list[str] = []
        """Backend names this model holds, oldest first."""
        self._lock = threading.Lock()  # guards serving and loaded (never held across a load)
        self._swap_lock = threading.Lock()  # one switch at a time (watcher, promote, rollback, refresh)
        self._refused: dict[tuple[str, str], tuple[int | None, str]] = {}
        """(version, uri) -> (weights' mtime, reason) of versions that did not load: not retried until it changes."""
        self._last_error: str | None = None
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def pinned(self) -> str | None:
        """The version this model serves instead of following the registry (``None``: follow it), read from
        the chat model's ``adapter`` field at each use."""
        settings = self._settings()
        return settings.adapter if settings is not None else None

    @property
    def local(self) -> bool:
        return self.backend.name == "local"

    def backend_name(self, adapter: AdapterVersion) -> str:
        """The name ``adapter`` is loaded under in the backend.

        The local engine is shared by every chat model of the process, and two stores may both have a ``v1``
        with different weights, so a local name carries a digest of the weights' location as well.
        """
        if not self.local:
            return adapter.version
        digest = hashlib.sha1(str(Path(adapter.uri).expanduser().resolve()).encode()).hexdigest()[:10]
        safe = re.sub(r"[^A-Za-z0-9_\-:+]", "_", adapter.version)
        return f"{safe}-{digest}" if safe[:1].isalnum() else f"a{safe}-{digest}"

    # ------------------------------------------------------------------ requests

    @contextlib.contextmanager
    def pin(self) -> Iterator[tuple[str | None, str | None]]:
        """``(version, backend name)`` one request uses, held until it ends (read once: a promotion meanwhile
        does not change it)."""
        with self._lock:
            version, name = self.serving
            if name is not None:
                self.follower.pin(name)
        try:
            yield version, name
        finally:
            if name is not None:
                self.follower.release(name)

    # ------------------------------------------------------------------ following

    def _warm(self, adapter: AdapterVersion) -> str:
        """Hold ``adapter`` for this model (loading it if no one in the process has); returns its backend name."""
        name = self.backend_name(adapter)
        with self._lock:
            if name in self.loaded:
                return name
        self.follower.hold(name, adapter.uri)
        with self._lock:
            self.loaded.append(name)
        return name

    def _publish(self, adapter: AdapterVersion) -> None:
        name = self._warm(adapter)  # validates; raises before anything changes
        with self._lock:
            self.serving = (adapter.version, name)  # one reference flip: each request reads it once
            self.loaded.remove(name)
            self.loaded.append(name)
        logger.info("metaclaw: serving adapter %s", adapter.version)

    def sync(self) -> None:
        """Point new requests at the wanted version (pinned, or the registry's), loading it first.

        Raises:
            AdapterError: the wanted version does not load (it is remembered: :meth:`tick` does not retry it
                until its files change); the serving version is unchanged.
        """
        pinned = self.pinned
        wanted = self.registry.get(pinned) if pinned else self.registry.current()
        if (wanted.version if wanted else None) == self.serving[0]:
            return
        if wanted is None:
            with self._lock:
                self.serving = (None, None)
            logger.info("metaclaw: serving the base model")
            return
        key = (wanted.version, wanted.uri)
        refused = self._refused.get(key)
        if refused is not None and refused[0] == _stamp(wanted.uri):
            raise AdapterError(refused[1])  # the same reason: its files have not changed since
        try:
            self._publish(wanted)
        except Exception as exc:
            self._remember_refusal(key, wanted.uri, exc)
            raise

    def _remember_refusal(self, key: tuple[str, str], uri: str, exc: Exception) -> None:
        """Remember why ``uri`` did not load, keyed on its weights' mtime, so the same file is not re-read every
        poll. A version with no local weights file (a remote backend's name, a missing directory) is not
        remembered: what failed there may be a passing network error, so the next poll tries again."""
        stamp = _stamp(uri)
        if stamp is not None:
            self._refused[key] = (stamp, str(exc))

    def _preload(self) -> None:
        """Warm standby: hold the newest candidate so that promoting it is a flip. One that does not load is
        skipped (its promotion will be refused with the reason)."""
        settings = self._settings()
        if settings is None or not settings.preload_candidates or not self.local:
            return
        candidates = self.registry.store.adapters(status="candidate")
        if not candidates:
            return
        newest = candidates[-1]
        key = (newest.version, newest.uri)
        refused = self._refused.get(key)
        if self.backend_name(newest) in self.loaded or (refused is not None and refused[0] == _stamp(newest.uri)):
            return
        try:
            self._warm(newest)
        except Exception as exc:
            self._remember_refusal(key, newest.uri, exc)
            logger.info("metaclaw: candidate %s not preloaded: %s", newest.version, exc)
            return
        logger.info("metaclaw: candidate %s preloaded", newest.version)

    def evict(self) -> None:
        """Let go of versions beyond the last :data:`KEEP_LOADED` (never the serving one). A version a request
        still holds stays loaded until that request ends."""
        with self._lock:
            surplus = len(self.loaded) - KEEP_LOADED
            victims = [n for n in self.loaded if n != self.serving[1]][: max(surplus, 0)]
            for name in victims:
                self.loaded.remove(name)
        for name in victims:
            self.follower.release(name)

    def tick(self) -> None:
        """One watcher step: follow the registry, preload the newest candidate, let go of what is not needed.

        Never raises: a version that does not load is logged once and the model keeps serving what it has.
        """
        try:
            with self._swap_lock:
                self.sync()
                self._preload()
                self.evict()
            self._last_error = None
        except Exception as exc:
            if str(exc) != self._last_error:
                self._last_error = str(exc)
                logger.error("metaclaw: could not switch to the registry's adapter (still serving %s): %s",
                             self.serving[0] or "the base model", exc)

    def refresh(self) -> str | None:
        """Check the registry now; returns the serving version (raises when the wanted one does not load)."""
        with self._swap_lock:
            self.sync()
            self.evict()
        return self.serving[0]

    def promote(self, version: str) -> AdapterVersion:
        """Promote through the registry, loading ``version`` against this backend's base as the last check."""
        with self._swap_lock:
            promoted = self.registry.promote(version, validator=self._warm)
            self.sync()
            self.evict()
        return promoted

    def rollback(self, to: str | None = None) -> AdapterVersion | None:
        with self._swap_lock:
            result = self.registry.rollback(to)
            self.sync()
            self.evict()
        return result

    def start(self) -> None:
        """Poll the registry every ``poll_interval`` in a daemon thread while the chat model lives."""
        if self.pinned is not None:
            return
        ref, stop = self._settings, self._stop  # the thread must not keep the model alive

        def watch() -> None:
            while (settings := ref()) is not None and not stop.wait(settings.poll_interval):
                del settings
                self.tick()

        with self._swap_lock:
            if self._watcher is None and not stop.is_set():
                self._watcher = threading.Thread(target=watch, name="metaclaw-adapter-watcher", daemon=True)
                self._watcher.start()

    def close(self) -> None:
        """Stop polling and let go of every version this model holds (new requests get the base model)."""
        self._stop.set()
        with self._swap_lock, self._lock:
            self.serving = (None, None)
            held, self.loaded = self.loaded, []
        for name in held:
            self.follower.release(name)
