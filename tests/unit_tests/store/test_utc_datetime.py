"""``UTCDateTime``: UTC in, aware UTC out, on SQLite and PostgreSQL, with the DDL of ``DateTime(timezone=True)``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import Column, DateTime, MetaData, Table, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.schema import CreateTable

from langchain_metaclaw.store import schema

PLUS_TWO = timezone(timedelta(hours=2))


def _write_lease(store, name: str, expires_at: datetime) -> None:
    with store.engine.begin() as conn:
        conn.execute(schema.leases.insert().values(name=name, holder="test", expires_at=expires_at))


def _read_leases(store, *where) -> dict[str, datetime]:
    t = schema.leases
    with store.engine.connect() as conn:
        return dict(conn.execute(select(t.c.name, t.c.expires_at).where(*where).order_by(t.c.name)).all())


def test_aware_values_are_stored_as_utc_and_read_back_aware(store):
    noon_utc = datetime(2025, 6, 10, 12, 0, tzinfo=UTC)
    _write_lease(store, "a", noon_utc.astimezone(PLUS_TWO))  # 14:00+02:00: the same instant
    _write_lease(store, "b", datetime(2025, 6, 10, 13, 0))  # naive: taken as UTC
    got = _read_leases(store)
    assert got == {"a": noon_utc, "b": datetime(2025, 6, 10, 13, 0, tzinfo=UTC)}
    assert all(value.tzinfo is UTC for value in got.values())
    # Comparisons run in time order whatever zone the bound value is in (SQLite compares the stored text).
    half_past_one_plus_two = datetime(2025, 6, 10, 14, 30, tzinfo=PLUS_TWO)  # 12:30 UTC
    assert list(_read_leases(store, schema.leases.c.expires_at > half_past_one_plus_two)) == ["b"]


def test_records_come_back_aware(store):
    store.add_adapter("v1", backend="local", uri="/tmp/v1")
    store.add_feedback("run", 1.0)
    assert store.adapter("v1").created_at.tzinfo is UTC
    assert store.feedback("run")[0].created_at.tzinfo is UTC


def test_a_non_datetime_is_refused(store):
    with pytest.raises(Exception, match="expected a datetime"):
        _write_lease(store, "a", "2025-06-10T12:00:00")


@pytest.mark.parametrize("dialect", [sqlite.dialect(), postgresql.dialect()], ids=["sqlite", "postgresql"])
def test_ddl_is_unchanged(dialect):
    """Existing databases need no migration: the column type is the one ``DateTime(timezone=True)`` makes."""
    plain = Table("t", MetaData(), Column("at", DateTime(timezone=True), nullable=False))
    decorated = Table("t", MetaData(), Column("at", schema.UTCDateTime, nullable=False))
    assert str(CreateTable(decorated).compile(dialect=dialect)) == str(CreateTable(plain).compile(dialect=dialect))
