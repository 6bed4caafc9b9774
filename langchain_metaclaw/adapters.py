"""AdapterRegistry: which adapter version serves, which are candidates, and the way back.

The registry lives in the trace store, so every process that shares the store agrees on the serving
version: a promotion is one transaction that retires the old pointer and sets the new one, and each
``MetaClawChatModel`` polls :meth:`AdapterRegistry.current` (one indexed query) and switches within a
second. A version is only promoted after validation (safetensors only, a LoRA config, weights that parse);
serving models validate again, against their base model, before they flip.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text, update

from langchain_metaclaw.errors import AdapterError
from langchain_metaclaw.store import schema
from langchain_metaclaw.store.records import AdapterVersion
from langchain_metaclaw.store.trace_store import TraceStore

logger = logging.getLogger(__name__)

Validator = Callable[[AdapterVersion], None]

REMOTE_SCHEMES = ("tinker://", "mint://")


def validate_adapter_dir(path: str | Path) -> dict[str, Any]:
    """File-level checks of a peft LoRA directory; returns its ``adapter_config.json``.

    Refuses pickled weights (``.bin``/``.pt``: unpickling can run code), a missing or unparseable
    ``adapter_model.safetensors``, and a non-LoRA config, each with a message that says what to do.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_dir():
        msg = f"adapter directory {path} does not exist"
        raise AdapterError(msg)
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".pkl"})
        found = f" (found pickled weights: {', '.join(pickles)})" if pickles else ""
        msg = (f"adapter at {path} has no adapter_model.safetensors{found}; only safetensors adapters are loaded. "
               "Re-save it with save_pretrained(safe_serialization=True).")
        raise AdapterError(msg)
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        msg = f"adapter at {path} has no readable adapter_config.json: {exc}"
        raise AdapterError(msg) from exc
    if str(config.get("peft_type", "")).upper() != "LORA":
        msg = f"adapter at {path} is {config.get('peft_type')!r}; only LORA adapters can be served"
        raise AdapterError(msg)
    try:
        with safe_open(str(weights), framework="pt") as f:
            if not list(f.keys()):
                msg = f"adapter at {path} has no tensors"
                raise AdapterError(msg)
    except AdapterError:
        raise
    except Exception as exc:
        msg = f"adapter weights at {weights} are corrupt: {exc}"
        raise AdapterError(msg) from exc
    return config


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
        """Record a trained adapter as a *candidate*. Local adapters are validated first."""
        uri = str(uri)
        if backend == "local" and not uri.startswith(REMOTE_SCHEMES):
            validate_adapter_dir(uri)
        for _ in range(5):
            name = version or self._next_version()
            try:
                return self.store.add_adapter(name, backend=backend, uri=uri, base_model=base_model,
                                              parent_version=parent_version, metrics=metrics, notes=notes)
            except Exception as exc:  # a concurrent register took the same number
                if version is not None or self.store.adapter(name) is None:
                    raise AdapterError(f"could not register adapter {name}: {exc}") from exc
        msg = "could not allocate an adapter version number"
        raise AdapterError(msg)

    def _next_version(self) -> str:
        with self.store.engine.connect() as conn:
            n = conn.execute(select(func.count()).select_from(schema.adapters)).scalar_one()
        return f"v{n + 1}"

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
        """File-level validation of a registered version (remote URIs are the backend's to check)."""
        adapter = self.get(version)
        if adapter.backend == "local" and not adapter.uri.startswith(REMOTE_SCHEMES):
            validate_adapter_dir(adapter.uri)

    def promote(self, version: str, *, validator: Validator | None = None, notes: str | None = None) -> AdapterVersion:
        """Make ``version`` the serving adapter. Invalid adapters are refused and nothing changes.

        ``validator`` (e.g. a serving model that loads the adapter against its base) runs after the file
        checks and before the switch; whatever it raises is re-raised as :class:`AdapterError`.
        """
        adapter = self.get(version)
        try:
            self.validate(version)
            if validator is not None:
                validator(adapter)
        except Exception as exc:
            # the serving version keeps its status: marking it rejected would switch every model to the base
            if adapter.status != "serving":
                self.store.update_adapter(version, status="rejected", notes=str(exc))
            if isinstance(exc, AdapterError):
                raise
            msg = f"adapter {version} failed validation: {exc}"
            raise AdapterError(msg) from exc
        self._switch(version, retire_as="retired", notes=notes)
        return self.get(version)

    def rollback(self, to: str | None = None) -> AdapterVersion | None:
        """Retire the serving version as ``rolled_back`` and serve ``to`` (default: the previous one).

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
        self.validate(to)
        self._switch(to, retire_as="rolled_back")
        return self.get(to)

    def _switch(self, version: str, *, retire_as: str, notes: str | None = None) -> None:
        t = schema.adapters
        now = datetime.now(UTC)
        with self.store.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # READ COMMITTED lets two concurrent switches both retire the old pointer and both set theirs:
                # serialise switches (SQLite already does, with its single writer).
                conn.execute(text("SELECT pg_advisory_xact_lock(72077266)"))
            conn.execute(update(t).where(t.c.status == "serving").values(status=retire_as))
            values: dict[str, Any] = {"status": "serving", "promoted_at": now}
            if notes is not None:
                values["notes"] = notes
            conn.execute(update(t).where(t.c.version == version).values(**values))
        logger.info("adapter %s is now serving", version)
