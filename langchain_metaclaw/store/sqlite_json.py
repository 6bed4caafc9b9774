"""Capture batches that SQLite inserts itself, straight from their JSON text.

The capture writer thread shares the agent's interpreter. Turning a batch into SQLAlchemy parameters
costs ~25 us of Python per record, and in a CPU-bound agent every one of them is taken from the agent's
thread (the GIL). SQLite (3.38+) reads the batch's JSON text with its own JSON functions instead: one
``INSERT ... SELECT FROM json_each(?)`` per table per batch, run with the GIL released, writing the same
rows as :meth:`TraceStore.write_records`. The statements are generated from ``schema`` so that a new column
cannot be forgotten here.
"""

from __future__ import annotations

import sqlite3

from sqlalchemy import JSON, Column, Table

from langchain_metaclaw.store import schema

AVAILABLE = sqlite3.sqlite_version_info >= (3, 38, 0)
"""``->`` / ``->>`` and built-in JSON functions; older SQLite libraries take the SQLAlchemy path."""


def _time(name: str) -> str:
    """Epoch seconds -> the text SQLAlchemy stores for a SQLite ``DATETIME`` (UTC, microseconds)."""
    seconds = f"CAST({name} AS INTEGER)"  # rounded like datetime.fromtimestamp: the fraction alone
    micros = f"({seconds} * 1000000 + CAST(round(({name} - {seconds}) * 1000000) AS INTEGER))"
    return (f"CASE WHEN typeof({name}) IN ('integer', 'real') THEN strftime('%Y-%m-%d %H:%M:%S', "
            f"{micros} / 1000000, 'unixepoch') || printf('.%06d', {micros} % 1000000) END")


def _insert(table: Table, record_types: tuple[str, ...], values: dict[str, str], on_conflict: str) -> str:
    """Each record's text is taken out of the batch once (``json_each``'s ``value`` renders it anew at
    every use), then each field is read from that text once, into materialised CTEs (a flattened subquery
    would read it again for every use). SQLite keeps the record's parse between the reads: the writer
    thread's CPU per agent call fell from 59 to 33 us when the second CTE came in. Fields are then
    converted the way SQLAlchemy's bind processors would."""
    columns = [c.name for c in table.columns]
    read = ", ".join(
        f"record {'->' if isinstance(table.c[name].type, JSON) else '->>'} '$.{name}' AS {name}" for name in columns
    )
    selected = ", ".join(values.get(name) or _convert(table.c[name]) for name in columns)
    kinds = ", ".join(f"'{kind}'" for kind in record_types)
    return (f"WITH batch AS MATERIALIZED (SELECT value AS record FROM json_each(?)), "
            f"r AS MATERIALIZED (SELECT {read} FROM batch WHERE record ->> '$.type' IN ({kinds})) "
            f"INSERT INTO {table.name} ({', '.join(columns)}) SELECT {selected} FROM r WHERE true "
            f"ON CONFLICT (id) {on_conflict}")


def _convert(column: Column) -> str:
    if isinstance(column.type, JSON):
        return f"coalesce({column.name}, 'null')"  # SQLAlchemy stores None as JSON null
    if isinstance(column.type, schema.UTCDateTime):
        return _time(column.name)
    return column.name


def _update_if_ended(column: str) -> str:
    return f"{column} = CASE WHEN excluded.ended_at IS NULL THEN {column} ELSE excluded.{column} END"


STATEMENTS = (
    # Records apply in order: a start inserts the episode (a thread invoked again keeps its first start);
    # an end, or a start that carries its end (an episode that ended in the event it started), ends it.
    _insert(
        schema.episodes,
        ("episode_start", "episode_end"),
        {
            "started_at": f"coalesce({_time('started_at')}, {_time('ended_at')})",
            "status": "coalesce(status, 'running')",
            "metadata": "CASE WHEN metadata IS NULL OR metadata = 'null' THEN '{}' ELSE metadata END",
        },
        "DO UPDATE SET " + ", ".join(_update_if_ended(c) for c in ("ended_at", "status", "error")),
    ),
    _insert(
        schema.turns,
        ("turn",),
        {"created_at": f"coalesce({_time('created_at')}, {_time('ended_at')}, {_time('started_at')})"},
        "DO UPDATE SET " + ", ".join(f"{c.name} = excluded.{c.name}" for c in schema.turns.columns if c.name != "id"),
    ),
)
"""Run in this order, in one transaction, each with the batch's JSON text (an array of records)."""
