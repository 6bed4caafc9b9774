"""AdapterRegistry: which adapter version serves, which are candidates, and the way back.

The registry lives in the trace store, so every process that shares the store agrees on the serving
version: a promotion is one transaction that retires the old pointer and sets the new one
(:meth:`~langchain_metaclaw.store.adapters.AdapterStatements.switch_serving_adapter`), and each process's
:class:`~langchain_metaclaw.adapters.follower.AdapterFollower` polls :meth:`AdapterRegistry.current` (one
indexed query) and switches within a second.

Every path that makes a version serve goes through :meth:`AdapterRegistry.promote` or
:meth:`AdapterRegistry.rollback` (the CLI, the chat model, the trainer), and both run the one validator
(:mod:`langchain_metaclaw.adapters.validate`): files, LoRA config and a dry run of keys and shapes against the
base model. A refused promotion marks the version ``rejected`` with the reason in its notes and changes nothing
else, so no process is ever told to serve an adapter that cannot load.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_metaclaw.adapters.validate import (
    base_structure,
    is_remote,
    validate_adapter,
    validate_adapter_dir,
)
from langchain_metaclaw.errors import AdapterError, BackendUnavailableError, ConfigurationError
from langchain_metaclaw.store.records import AdapterVersion

if TYPE_CHECKING:
    from langchain_metaclaw.store.trace_store import TraceStore

logger = logging.getLogger(__name__)

Validator = Callable[[AdapterVersion], None]


def check_adapter(adapter: AdapterVersion) -> None:
    """Run the one validator on a registered version, as fits its backend.

    - ``local``: files, LoRA config and the dry run against ``adapter.base_model`` (``None``: the embedded
      model), built on the meta device: no model is loaded.
    - another backend (``openai``: the path is on the vLLM host; ``tinker`` / ``mint``: a ``tinker://`` URI):
      no local checks; the server that loads it checks it, and a model that cannot load it keeps serving
      what it has.

    Raises:
        AdapterError: the adapter's files do not fit (the version is refused).
        ConfigurationError, BackendUnavailableError: the base model's structure cannot be read here (missing
            extra, config not available offline); says nothing about the adapter.
    """
    if adapter.backend != "local" or is_remote(adapter.uri):
        return
    validate_adapter(adapter.uri, base_structure(adapter.base_model), name=adapter.version)


class AdapterRegistry:
    """Adapter versions of one store: register candidates, promote, roll back, and read the serving one.

    >>> registry = AdapterRegistry(store)                               # doctest: +SKIP
    >>> v = registry.register("/path/to/adapter", backend="local")     # a candidate, not serving
    >>> registry.promote(v.version)                                     # doctest: +SKIP
    >>> registry.rollback()                                             # back to the previous one
    """

    def __init__(self, store: TraceStore) -> None:
        self.store = store

    def register(
        self,
        uri: str | Path,
        *,
        backend: str = "local",
        base_model: str | None = None,
        parent_version: str | None = None,
        metrics: dict[str, Any] | None = None,
        version: str | None = None,
        notes: str | None = None,
    ) -> AdapterVersion:
        """Record a trained adapter as a *candidate*. Local files are checked first (the full check against the
        base model runs at promotion)."""
        uri = str(uri)
        if backend == "local" and not is_remote(uri):
            validate_adapter_dir(uri)
        for _ in range(5):
            name = version or f"v{self.store.count_adapters() + 1}"
            try:
                return self.store.add_adapter(name, backend=backend, uri=uri, base_model=base_model,
                                              parent_version=parent_version, metrics=metrics, notes=notes)
            except Exception as exc:  # a concurrent register took the same number
                if version is not None or self.store.adapter(name) is None:
                    raise AdapterError(f"could not register adapter {name}: {exc}") from exc
        msg = "could not allocate an adapter version number"
        raise AdapterError(msg)

    def get(self, version: str) -> AdapterVersion:
        found = self.store.adapter(version)
        if found is None:
            msg = f"no adapter version {version!r} in {self.store.url}"
            raise AdapterError(msg)
        return found

    def current(self) -> AdapterVersion | None:
        """The serving version, or ``None`` when the base model serves."""
        serving = self.store.adapters(status="serving")
        return serving[-1] if serving else None

    def versions(self) -> list[AdapterVersion]:
        return self.store.adapters()

    def validate(self, version: str) -> None:
        """Run the one validator on a registered version (see :func:`check_adapter`)."""
        check_adapter(self.get(version))

    def promote(self, version: str, *, validator: Validator | None = None, notes: str | None = None) -> AdapterVersion:
        """Make ``version`` the serving adapter, after the one validator; a refused version changes nothing else.

        ``validator`` (e.g. a serving model that loads the adapter, or a trainer's reward gate) runs after
        the validator and before the switch; whatever it raises is re-raised as :class:`AdapterError`. A refused
        version is marked ``rejected`` with the reason in its notes (unless it is the serving one: marking it
        would switch every model to the base).
        """
        adapter = self.get(version)
        try:
            check_adapter(adapter)
            if validator is not None:
                validator(adapter)
        except (BackendUnavailableError, ConfigurationError):
            raise  # this environment cannot check it: the version is not to blame, so it is not marked
        except Exception as exc:
            reason = str(exc) if isinstance(exc, AdapterError) else f"adapter {version} failed validation: {exc}"
            if adapter.status != "serving":
                self.store.update_adapter(version, status="rejected", notes=reason)
            logger.warning("adapter %s refused: %s", version, reason)
            if isinstance(exc, AdapterError):
                raise
            raise AdapterError(reason) from exc
        self.store.switch_serving_adapter(version, retire_as="retired", notes=notes)
        logger.info("adapter %s is now serving", version)
        return self.get(version)

    def rollback(self, to: str | None = None) -> AdapterVersion | None:
        """Retire the serving version as ``rolled_back`` and serve ``to`` (default: the previous one).

        ``to`` is validated like a promotion (``AdapterError``, and nothing changes, when it no longer loads).
        Returns the version now serving, ``None`` when that is the base model.
        """
        current = self.current()
        if to is None:
            previous = [a for a in self.store.adapters() if a.promoted_at is not None
                        and a.status == "retired" and (current is None or a.version != current.version)]
            previous.sort(key=lambda a: a.promoted_at)
            to = previous[-1].version if previous else None
        if to is None:
            if current is not None:
                self.store.update_adapter(current.version, status="rolled_back")
            return None
        target = self.get(to)
        if target.status == "rejected":
            msg = f"cannot roll back to adapter {to}: it was rejected ({target.notes}); promote() re-validates it"
            raise AdapterError(msg)
        check_adapter(target)
        self.store.switch_serving_adapter(to, retire_as="rolled_back")
        logger.info("adapter %s is now serving", to)
        return self.get(to)
