"""What every part of :class:`~langchain_metaclaw.store.TraceStore` shares: its engine and how rows become records.

``TraceStore`` is assembled from one mixin per concept (scores and feedback, training queries, health);
each mixin builds on :class:`StoreBase` so that its SQL runs through the same engine and its reads come
back as the same typed records.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel
from sqlalchemy import Engine, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.pool import StaticPool

R = TypeVar("R", bound=BaseModel)

CHUNK = 500
"""Ids per ``IN (...)`` list: well below SQLite's bound-parameter limit."""


def chunks(items: Sequence[str], size: int = CHUNK) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def to_record(model: type[R], row: Any) -> R:
    """A result row as a typed record (``None`` columns fall back to the record's defaults)."""
    return model.model_validate({k: v for k, v in row._mapping.items() if v is not None})


class StoreBase:
    """The engine and the helpers that every store mixin's SQL goes through."""

    engine: Engine

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def single_connection(self) -> bool:
        """Whether the whole database lives in one shared connection (in-memory SQLite).

        Writers that would hand work to another thread write inline instead: that thread would only
        wait for the connection.
        """
        return isinstance(self.engine.pool, StaticPool)

    def _insert(self, table: Table):
        """``INSERT`` with this dialect's ``ON CONFLICT`` support (SQLite and PostgreSQL spell it alike)."""
        return (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(table)

    def _select(self, model: type[R], stmt) -> list[R]:
        with self.engine.connect() as conn:
            return [to_record(model, row) for row in conn.execute(stmt)]

    def _select_one(self, model: type[R], stmt) -> R | None:
        with self.engine.connect() as conn:
            row = conn.execute(stmt).first()
        return None if row is None else to_record(model, row)
