"""How the store is doing: row counts, the aggregates ``metaclaw status`` shows, and integrity checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import func, inspect, select, text

from langchain_metaclaw.store import schema
from langchain_metaclaw.store.base import StoreBase
from langchain_metaclaw.store.migrations import MIGRATIONS, applied_migrations
from langchain_metaclaw.store.spool import orphan_segments


def _grouped(conn, column, *where) -> dict[str, int]:
    stmt = select(column, func.count()).where(*where).group_by(column)
    return {str(k): int(n) for k, n in conn.execute(stmt)}


class HealthMixin(StoreBase):
    """Counts, status aggregates and :meth:`verify` of :class:`~langchain_metaclaw.store.TraceStore`."""

    spool_dir: Path

    def counts(self) -> dict[str, int]:
        """Row counts per table, for ``metaclaw status``."""
        tables = [schema.episodes, schema.turns, schema.scores, schema.feedback, schema.adapters, schema.train_runs]
        with self.engine.connect() as conn:
            return {t.name: conn.execute(select(func.count()).select_from(t)).scalar_one() for t in tables}

    def status_counts(self, limit: int = 5) -> dict[str, Any]:
        """The aggregates of ``metaclaw status``, as plain data (cheap grouped counts only).

        Returns ``{"turns_by_source": {tokens_source: llm turns}, "scores_by_source": {source: {status: n}},
        "judge_calls": {outcome: n}, "judge_latency_ms": mean or None, "schedule_events": the newest
        ``limit`` events as dicts, newest first}``.
        """
        s, j, e = schema.scores, schema.judge_calls, schema.schedule_events
        with self.engine.connect() as conn:
            turns_by_source = _grouped(conn, schema.turns.c.tokens_source, schema.turns.c.kind == "llm")
            scores: dict[str, dict[str, int]] = {}
            for source, status, n in conn.execute(
                    select(s.c.source, s.c.status, func.count()).group_by(s.c.source, s.c.status)):
                scores.setdefault(source, {})[status] = int(n)
            judge = _grouped(conn, j.c.outcome)
            latency = conn.execute(select(func.avg(j.c.latency_ms))).scalar()
            events = [dict(r._mapping) for r in conn.execute(select(e).order_by(e.c.at.desc()).limit(limit))]
        return {
            "turns_by_source": turns_by_source,
            "scores_by_source": scores,
            "judge_calls": judge,
            "judge_latency_ms": float(latency) if latency is not None else None,
            "schedule_events": events,
        }

    def verify(self) -> list[str]:
        """Problems found in the store; an empty list means it is healthy."""
        problems: list[str] = []
        with self.engine.connect() as conn:
            done = applied_migrations(conn)
            missing = [m.__name__ for m in MIGRATIONS if m.__name__ not in done]
            if missing:
                problems.append(f"migrations not applied: {', '.join(missing)}")
            tables = set(inspect(conn).get_table_names())
            for table in schema.metadata.sorted_tables:
                if table.name not in tables:
                    problems.append(f"table missing: {table.name}")
            if self.dialect == "sqlite":
                result = conn.execute(text("PRAGMA quick_check")).scalar()
                if result != "ok":
                    problems.append(f"sqlite quick_check: {result}")
            if "turns" in tables and "episodes" in tables:
                orphans = conn.execute(
                    select(func.count())
                    .select_from(schema.turns)
                    .where(~schema.turns.c.episode_id.in_(select(schema.episodes.c.id)))
                ).scalar_one()
                if orphans:
                    problems.append(f"{orphans} turn(s) reference a missing episode")
        leftover = orphan_segments(self.spool_dir)
        if leftover:
            problems.append(f"{len(leftover)} spool segment(s) from dead processes not replayed yet")
        return problems
