"""Training runs and the reads training needs, answered by the database rather than by Python over whole tables.

The trainer asks three questions on every run: which llm turns have rewards (with those rewards), which
turns earlier runs already trained on, and how the serving adapter's live reward compares with its
parent's. Each is one query here, so their cost follows what matches, not how long the store has run.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Text, and_, case, cast, exists, func, literal, select, true, update
from sqlalchemy.dialects.postgresql import JSONB

from langchain_metaclaw.store import schema
from langchain_metaclaw.store.base import StoreBase, to_record
from langchain_metaclaw.store.records import Score, TrainRun, Turn

TRAINED_STATUSES: tuple[str, ...] = ("ok", "stopped", "interrupted")
"""Train runs whose ``samples`` count as trained: finished, stopped after a step, or resumed by a later run."""


class TrainingQueriesMixin(StoreBase):
    """Train runs, scored samples and live rewards of :class:`~langchain_metaclaw.store.TraceStore`."""

    # ------------------------------------------------------------------ train runs

    def start_train_run(self, *, backend: str | None = None, config: dict[str, Any] | None = None,
                        base_adapter: str | None = None, metrics: dict[str, Any] | None = None) -> TrainRun:
        row = {
            "base_adapter": base_adapter,
            "id": str(uuid.uuid4()),
            "started_at": datetime.now(UTC),
            "status": "running",
            "backend": backend,
            "steps": 0,
            "samples": [],
            "metrics": metrics or {},
            "config": config or {},
        }
        with self.engine.begin() as conn:
            conn.execute(schema.train_runs.insert(), row)
        return TrainRun.model_validate(row)

    def update_train_run(self, run_id: str, **fields: Any) -> None:
        """Record a running train run's progress (steps, samples, metrics with its latest checkpoint), so that
        a run whose process dies can be resumed from where it got to."""
        with self.engine.begin() as conn:
            conn.execute(update(schema.train_runs).where(schema.train_runs.c.id == run_id).values(**fields))

    def finish_train_run(self, run_id: str, *, status: str, reason: str | None = None, **fields: Any) -> None:
        values = {"status": status, "reason": reason, "ended_at": datetime.now(UTC), **fields}
        with self.engine.begin() as conn:
            conn.execute(update(schema.train_runs).where(schema.train_runs.c.id == run_id).values(**values))

    def train_runs(self, limit: int | None = None) -> list[TrainRun]:
        """Train runs, newest first."""
        t = schema.train_runs
        stmt = select(t).order_by(t.c.started_at.desc())
        if limit is not None:
            stmt = stmt.limit(limit)
        return self._select(TrainRun, stmt)

    def train_run(self, run_id: str) -> TrainRun | None:
        return self._select_one(TrainRun, select(schema.train_runs).where(schema.train_runs.c.id == run_id))

    def _trained_ids(self, statuses: Sequence[str]):
        """SQL: the turn ids in the ``samples`` arrays of train runs with one of ``statuses``."""
        tr = schema.train_runs
        if self.dialect == "postgresql":
            array = case((func.jsonb_typeof(tr.c.samples) == "array", tr.c.samples), else_=cast(literal("[]"), JSONB))
            ids = func.jsonb_array_elements_text(array).table_valued("value")
        else:
            array = case((func.json_type(tr.c.samples) == "array", cast(tr.c.samples, Text)), else_=literal("[]"))
            ids = func.json_each(array).table_valued("value")
        return (select(cast(ids.c.value, Text).label("turn_id"))
                .select_from(tr.join(ids, true()))
                .where(tr.c.status.in_(list(statuses)), ids.c.value.is_not(None)))

    def trained_turn_ids(self, statuses: Sequence[str] = TRAINED_STATUSES) -> set[str]:
        """Turn ids that train runs with one of ``statuses`` trained on."""
        with self.engine.connect() as conn:
            return set(conn.execute(self._trained_ids(statuses)).scalars())

    # ------------------------------------------------------------------ training data

    def scored_turns(
        self,
        *,
        since: datetime | None = None,
        exclude_trained: bool = False,
    ) -> list[tuple[Turn, list[Score]]]:
        """Successful llm turns with at least one scored reward, oldest first, each with those scores.

        Args:
            since: only turns created at or after this time.
            exclude_trained: leave out turns that a finished, stopped or interrupted train run trained on.
        """
        t, s = schema.turns, schema.scores
        scored = and_(s.c.status == "scored", s.c.value.is_not(None))
        where = [t.c.kind == "llm", t.c.status == "ok", exists().where(s.c.turn_id == t.c.id, scored)]
        if since is not None:
            where.append(t.c.created_at >= since)
        if exclude_trained:
            where.append(t.c.id.not_in(self._trained_ids(TRAINED_STATUSES)))
        wanted = select(t.c.id).where(*where)
        with self.engine.connect() as conn:
            turns = [to_record(Turn, row) for row in conn.execute(
                select(t).where(*where).order_by(t.c.started_at, t.c.seq, t.c.id))]
            by_turn: dict[str, list[Score]] = {turn.id: [] for turn in turns}
            for row in conn.execute(select(s).where(scored, s.c.turn_id.in_(wanted)).order_by(s.c.id)):
                if row.turn_id in by_turn:  # a turn written between the two reads waits for the next call
                    by_turn[row.turn_id].append(to_record(Score, row))
        return [(turn, by_turn[turn.id]) for turn in turns]

    def live_rewards(self, version: str | None) -> list[float]:
        """Scored reward values of the llm turns that adapter ``version`` served (``None``: the base model),
        in the order they were written."""
        t, s = schema.turns, schema.scores
        served = t.c.adapter_version.is_(None) if version is None else t.c.adapter_version == version
        stmt = (select(s.c.value).select_from(s.join(t, t.c.id == s.c.turn_id))
                .where(t.c.kind == "llm", served, s.c.status == "scored", s.c.value.is_not(None))
                .order_by(s.c.id))
        with self.engine.connect() as conn:
            return [float(v) for v in conn.execute(stmt).scalars()]
