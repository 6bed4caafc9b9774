"""Forward-only schema migrations, recorded in the ``_metaclaw_migrations`` table.

The scheme is the one ``simonw/llm`` uses: ``MIGRATIONS`` is an ordered list of named functions
``mNNN_description(conn)``; :func:`migrate` applies the ones not yet recorded, each in the same
transaction as its record, so running it twice (or from two processes) is safe.

A brand-new database is created straight from ``schema.metadata`` and every migration is stamped as
applied; an existing database only runs what it lacks. To change the schema: edit ``schema.py``, bump
``SCHEMA_VERSION``, and append an ``m00N_...`` function that brings a database created by the previous
version to the new shape (``ALTER TABLE ... ADD COLUMN``, backfills).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, inspect, select, text
from sqlalchemy.exc import IntegrityError, OperationalError

from langchain_metaclaw.store import schema

Migration = Callable[[Connection], None]

MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_initial(conn: Connection) -> None:
    """Version 1: episodes, turns, scores, feedback, adapters, train_runs, judge_calls, schedule_events, leases."""
    schema.metadata.create_all(conn)


assert len(MIGRATIONS) == schema.SCHEMA_VERSION, "every schema version needs its migration"


def applied_migrations(conn: Connection) -> list[str]:
    if not inspect(conn).has_table(schema.migrations_table.name):
        return []
    return list(conn.execute(select(schema.migrations_table.c.name)).scalars())


def migrate(engine: Engine) -> list[str]:
    """Bring the database to ``SCHEMA_VERSION``; returns the names of the migrations it applied."""
    try:
        return _migrate_once(engine)
    except (IntegrityError, OperationalError):
        # Another process migrated at the same moment; its work is ours, check again.
        return _migrate_once(engine)


def _migrate_once(engine: Engine) -> list[str]:
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(72077265)"))
        done = set(applied_migrations(conn))
        pending = [m for m in MIGRATIONS if m.__name__ not in done]
        if not pending:
            return []
        fresh = not done and not inspect(conn).has_table(schema.turns.name)
        if fresh:
            schema.metadata.create_all(conn)
        else:
            schema.migrations_table.create(conn, checkfirst=True)
            for step in pending:
                step(conn)
        now = datetime.now(UTC)
        conn.execute(
            schema.migrations_table.insert(), [{"name": m.__name__, "applied_at": now} for m in pending]
        )
        return [m.__name__ for m in pending]
