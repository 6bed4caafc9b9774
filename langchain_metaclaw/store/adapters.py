"""Statements on the ``adapters`` table that the adapter registry needs beyond the row accessors.

:class:`AdapterStatements` is a base of :class:`~langchain_metaclaw.store.trace_store.TraceStore`, so the
registry (``langchain_metaclaw.adapters``) issues no SQL of its own: it counts versions to number the next one
and switches the serving pointer in one transaction.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, text, update

from langchain_metaclaw.store import schema

if TYPE_CHECKING:
    from sqlalchemy import Engine

_SWITCH_LOCK_ID = 72077266
"""PostgreSQL advisory lock id that serialises serving switches."""


class AdapterStatements:
    """Adapter-version statements of a store (a mixin: needs ``self.engine``)."""

    engine: Engine

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
