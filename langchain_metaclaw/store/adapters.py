"""Every statement on the ``adapters`` table: the row accessors, numbering, and the serving switch.

:class:`AdapterStatements` is a base of :class:`~langchain_metaclaw.store.trace_store.TraceStore`, so the
registry (``langchain_metaclaw.adapters``) issues no SQL of its own: it counts versions to number the next one
and switches the serving pointer in one transaction.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, text, update

from langchain_metaclaw.store import schema
from langchain_metaclaw.store.base import StoreBase
from langchain_metaclaw.store.records import AdapterVersion

_SWITCH_LOCK_ID = 72077266
"""PostgreSQL advisory lock id that serialises serving switches."""


class AdapterStatements(StoreBase):
    """Adapter-version statements of a store (a mixin of :class:`TraceStore`)."""

    def add_adapter(
        self,
        version: str,
        *,
        backend: str,
        uri: str,
        base_model: str | None = None,
        parent_version: str | None = None,
        status: str = "candidate",
        metrics: dict[str, Any] | None = None,
        notes: str | None = None,
    ) -> AdapterVersion:
        row = {
            "version": version,
            "parent_version": parent_version,
            "backend": backend,
            "base_model": base_model,
            "uri": uri,
            "status": status,
            "created_at": datetime.now(UTC),
            "metrics": metrics or {},
            "notes": notes,
        }
        with self.engine.begin() as conn:
            conn.execute(schema.adapters.insert(), row)
        return AdapterVersion.model_validate(row)

    def adapter(self, version: str) -> AdapterVersion | None:
        return self._select_one(AdapterVersion, select(schema.adapters).where(schema.adapters.c.version == version))

    def adapters(self, status: str | None = None) -> list[AdapterVersion]:
        t = schema.adapters
        stmt = select(t).order_by(t.c.created_at, t.c.version)
        if status is not None:
            stmt = stmt.where(t.c.status == status)
        return self._select(AdapterVersion, stmt)

    def update_adapter(self, version: str, **fields: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(schema.adapters).where(schema.adapters.c.version == version).values(**fields))

    def count_adapters(self) -> int:
        """How many adapter versions were ever registered (the registry numbers the next ``v<n+1>``)."""
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(schema.adapters)).scalar_one()

    def switch_serving_adapter(self, version: str, *, retire_as: str, notes: str | None = None) -> None:
        """In one transaction: the serving version becomes ``retire_as`` and ``version`` serves from now on."""
        t = schema.adapters
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # READ COMMITTED lets two concurrent switches both retire the old pointer and both set theirs:
                # serialise switches (SQLite already does, with its single writer).
                conn.execute(text(f"SELECT pg_advisory_xact_lock({_SWITCH_LOCK_ID})"))
            conn.execute(update(t).where(t.c.status == "serving").values(status=retire_as))
            values: dict[str, Any] = {"status": "serving", "promoted_at": datetime.now(UTC)}
            if notes is not None:
                values["notes"] = notes
            conn.execute(update(t).where(t.c.version == version).values(**values))
