"""Scores, feedback and judge calls: the rewards that training reads.

One upsert writes every score (feedback, reward rules, the PRM judge), keyed by ``(turn_id, source, key)``,
with ``attempts`` counting the writes. One rule decides which turn a piece of feedback is about, used both
when the feedback is given and when the scorer resolves feedback that arrived before its turn was captured:
the run itself when it is a captured turn, else the last llm turn of that root run that is not a call of
the judge (the judge's own turn is never what the user rated).

A PRM result (its score row and its ``judge_calls`` rows) is committed in one transaction as soon as it is
known, so a killed scorer loses at most the turns in flight.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

from sqlalchemy import Connection, Text, and_, cast, func, or_, select

from langchain_metaclaw.store import schema
from langchain_metaclaw.store.base import StoreBase, chunks
from langchain_metaclaw.store.records import Feedback, Score

PRM_SOURCE = "prm"
"""Score source of the PRM judge."""
REWARD_KEY = "reward"
"""Score key of a turn's reward."""
FEEDBACK_SOURCE = "feedback"
"""Score source of numeric user feedback."""
NO_NODE = "(none)"
"""Roll-up key of turns made outside any LangGraph node."""
JUDGE_TAG = "metaclaw:judge"
"""Tag on every judge call, so captured judge calls are never scored themselves nor taken for the user's turn."""


def not_judge_call():
    """SQL filter: the turn is not a captured call of the judge itself (its tags JSON does not name it)."""
    t = schema.turns
    return or_(t.c.tags.is_(None), ~func.coalesce(cast(t.c.tags, Text), "").contains(JUDGE_TAG))


def _judge_call_rows(turn_id: str | None, judge: str, votes: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    return [
        {"turn_id": turn_id, "judge": judge, "outcome": v["outcome"], "latency_ms": v.get("latency_ms"),
         "input_tokens": v.get("input_tokens"), "output_tokens": v.get("output_tokens"), "created_at": now}
        for v in votes
    ]


class ScoresMixin(StoreBase):
    """Feedback, scores and judge calls of :class:`~langchain_metaclaw.store.TraceStore`."""

    # ------------------------------------------------------------------ the one upsert, the one target rule

    @cached_property
    def _score_upsert(self):
        """The scores upsert for this store's dialect, built once (building it costs more than running it)."""
        insert = self._insert(schema.scores)
        ex = insert.excluded
        return insert.on_conflict_do_update(
            index_elements=["turn_id", "source", "key"],
            set_={
                "value": ex.value,
                "confidence": ex.confidence,
                "status": ex.status,
                "reason": ex.reason,
                "details": ex.details,
                "episode_id": func.coalesce(ex.episode_id, schema.scores.c.episode_id),
                "updated_at": ex.updated_at,
                "attempts": schema.scores.c.attempts + 1,
            },
        )

    def _upsert_scores(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        now = datetime.now(UTC)
        values = [{"status": "scored", "confidence": None, "reason": None, "details": None, "episode_id": None,
                   "key": REWARD_KEY, **row, "attempts": 1, "created_at": now, "updated_at": now} for row in rows]
        conn.execute(self._score_upsert, values)

    @staticmethod
    def _feedback_targets(conn: Connection, run_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        t = schema.turns
        targets: dict[str, tuple[str, str]] = {}
        for chunk in chunks(list(run_ids)):
            for turn_id, episode_id in conn.execute(select(t.c.id, t.c.episode_id).where(t.c.id.in_(chunk))):
                targets[turn_id] = (turn_id, episode_id)
        for chunk in chunks([r for r in run_ids if r not in targets]):
            stmt = (select(t.c.root_run_id, t.c.id, t.c.episode_id)
                    .where(t.c.root_run_id.in_(chunk), t.c.kind == "llm", not_judge_call())
                    .order_by(t.c.started_at, t.c.seq, t.c.id))
            for root, turn_id, episode_id in conn.execute(stmt):
                targets[root] = (turn_id, episode_id)  # ascending order: the last one wins
        return targets

    # ------------------------------------------------------------------ feedback

    def add_feedback(
        self,
        run_id: str | uuid.UUID,
        score: float | None = None,
        comment: str | None = None,
        *,
        key: str = "user_score",
        value: Any = None,
        correction: Any = None,
        source_info: dict[str, Any] | None = None,
    ) -> Feedback:
        """Record explicit feedback on a run, like LangSmith's ``create_feedback``.

        ``run_id`` may be an LLM turn or the root run of an agent invocation (then the feedback is about
        that invocation's last LLM turn that is not a judge call). Numeric feedback also becomes a score
        with ``source="feedback"`` so training sees it next to judge and rule rewards; feedback on a run that
        capture has not written yet is kept and picked up by the scorer later.
        """
        if score is not None and not isinstance(score, int | float):
            msg = f"feedback score must be a number or None, got {type(score).__name__}"
            raise TypeError(msg)
        row = {
            "id": str(uuid.uuid4()),
            "run_id": str(run_id),
            "key": key,
            "score": None if score is None else float(score),
            "value": value,
            "comment": comment,
            "correction": correction,
            "source_info": source_info or {},
            "created_at": datetime.now(UTC),
        }
        with self.engine.begin() as conn:
            conn.execute(schema.feedback.insert(), row)
            target = self._feedback_targets(conn, [row["run_id"]]).get(row["run_id"])
            if target is not None and score is not None:
                self._upsert_scores(conn, [{
                    "turn_id": target[0],
                    "episode_id": target[1],
                    "source": FEEDBACK_SOURCE,
                    "key": key,
                    "value": float(score),
                    "confidence": 1.0,
                    "reason": comment,
                    "details": {"feedback_id": row["id"], "run_id": row["run_id"]},
                }])
        return Feedback.model_validate(row)

    def thumbs(self, run_id: str | uuid.UUID, up: bool, comment: str | None = None) -> Feedback:
        """Thumbs up (+1) or down (-1) on a run: the usual chat UI button."""
        return self.add_feedback(run_id, 1.0 if up else -1.0, comment, key="thumbs")

    def feedback(self, run_id: str | uuid.UUID | None = None) -> list[Feedback]:
        stmt = select(schema.feedback).order_by(schema.feedback.c.created_at)
        if run_id is not None:
            stmt = stmt.where(schema.feedback.c.run_id == str(run_id))
        return self._select(Feedback, stmt)

    def feedback_targets(self, run_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """``run_id -> (turn_id, episode_id)`` by the rule :meth:`add_feedback` uses; unknown runs are absent."""
        with self.engine.connect() as conn:
            return self._feedback_targets(conn, run_ids)

    def numeric_feedback(self) -> list[dict[str, Any]]:
        """Feedback rows that carry a number (only those become scores), oldest first."""
        f = schema.feedback
        stmt = (select(f.c.id, f.c.run_id, f.c.key, f.c.score, f.c.comment, f.c.created_at)
                .where(f.c.score.is_not(None)).order_by(f.c.created_at, f.c.id))
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(stmt)]

    def feedback_scores(self) -> list[dict[str, Any]]:
        """``turn_id``, ``key`` and ``details`` of every feedback score (details name the feedback behind it)."""
        s = schema.scores
        stmt = select(s.c.turn_id, s.c.key, s.c.details).where(s.c.source == FEEDBACK_SOURCE)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(stmt)]

    # ------------------------------------------------------------------ scores

    def add_score(
        self,
        turn_id: str | uuid.UUID,
        value: float | None,
        *,
        source: str,
        key: str = "reward",
        confidence: float | None = None,
        reason: str | None = None,
        details: dict[str, Any] | None = None,
        status: str = "scored",
        episode_id: str | None = None,
    ) -> None:
        """Insert or replace the score of ``turn_id`` from ``source``/``key`` (``attempts`` counts writes)."""
        with self.engine.begin() as conn:
            if episode_id is None:
                episode_id = conn.execute(
                    select(schema.turns.c.episode_id).where(schema.turns.c.id == str(turn_id))
                ).scalar()
            self._upsert_scores(conn, [{
                "turn_id": str(turn_id), "episode_id": episode_id, "source": source, "key": key, "value": value,
                "confidence": confidence, "reason": reason, "details": details, "status": status,
            }])

    def upsert_scores(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Write several scores in one transaction (rows: ``turn_id``, ``source``, ``value``, ... as
        :meth:`add_score` takes them; ``key`` defaults to ``"reward"``, ``status`` to ``"scored"``)."""
        if rows:
            with self.engine.begin() as conn:
                self._upsert_scores(conn, rows)

    def record_prm_result(self, *, score: Mapping[str, Any] | None, turn_id: str | None, judge: str,
                          votes: Sequence[Mapping[str, Any]]) -> None:
        """Commit one turn's PRM score row (if any) and its judge votes (one ``judge_calls`` row each) together."""
        calls = _judge_call_rows(turn_id, judge, votes)
        with self.engine.begin() as conn:
            if score is not None:
                self._upsert_scores(conn, [score])
            if calls:
                conn.execute(schema.judge_calls.insert(), calls)

    def scores(
        self,
        turn_id: str | uuid.UUID | None = None,
        *,
        source: str | None = None,
        episode_id: str | None = None,
        status: str | None = None,
    ) -> list[Score]:
        t = schema.scores
        stmt = select(t).order_by(t.c.id)
        if turn_id is not None:
            stmt = stmt.where(t.c.turn_id == str(turn_id))
        if source is not None:
            stmt = stmt.where(t.c.source == source)
        if episode_id is not None:
            stmt = stmt.where(t.c.episode_id == episode_id)
        if status is not None:
            stmt = stmt.where(t.c.status == status)
        return self._select(Score, stmt)

    def pending_prm_turns(self, *, max_attempts: int, limit: int | None = None) -> list[tuple[str, str]]:
        """``(turn id, episode id)`` of successful llm turns with no ``prm`` score yet, or still ``unscored``
        with attempts left, oldest first (judge calls excluded)."""
        t, s = schema.turns, schema.scores
        joined = t.outerjoin(s, and_(s.c.turn_id == t.c.id, s.c.source == PRM_SOURCE, s.c.key == REWARD_KEY))
        stmt = (
            select(t.c.id, t.c.episode_id)
            .select_from(joined)
            .where(
                t.c.kind == "llm",
                t.c.status == "ok",
                not_judge_call(),
                or_(s.c.id.is_(None), and_(s.c.status == "unscored", s.c.attempts < max_attempts)),
            )
            .order_by(t.c.started_at, t.c.seq, t.c.id)
        )
        if limit is not None:
            stmt = stmt.limit(limit)
        with self.engine.connect() as conn:
            return [(row[0], row[1]) for row in conn.execute(stmt)]

    def turns_without_score(self, source: str, *, key: str = REWARD_KEY, kind: str = "llm") -> list[tuple[str, str]]:
        """``(turn id, episode id)`` of ``kind`` turns with no score row from ``source``/``key``, oldest first
        (judge calls excluded)."""
        t, s = schema.turns, schema.scores
        joined = t.outerjoin(s, and_(s.c.turn_id == t.c.id, s.c.source == source, s.c.key == key))
        stmt = (
            select(t.c.id, t.c.episode_id)
            .select_from(joined)
            .where(t.c.kind == kind, s.c.id.is_(None), not_judge_call())
            .order_by(t.c.started_at, t.c.seq, t.c.id)
        )
        with self.engine.connect() as conn:
            return [(row[0], row[1]) for row in conn.execute(stmt)]

    def score_attempts(self, turn_ids: Sequence[str], source: str = PRM_SOURCE) -> dict[str, int]:
        """``turn_id -> attempts`` of the ``source`` reward of those turns that have one."""
        s = schema.scores
        result: dict[str, int] = {}
        with self.engine.connect() as conn:
            for chunk in chunks(list(turn_ids)):
                stmt = select(s.c.turn_id, s.c.attempts).where(s.c.source == source, s.c.key == REWARD_KEY,
                                                                 s.c.turn_id.in_(chunk))
                result.update((row[0], int(row[1])) for row in conn.execute(stmt))
        return result

    def rollup(self, by: str, *, source: str, key: str) -> dict[str, float]:
        """Mean scored value of ``source``/``key`` per episode (``by="episode"``) or per LangGraph node."""
        s, t = schema.scores, schema.turns
        where = [s.c.source == source, s.c.key == key, s.c.status == "scored", s.c.value.is_not(None)]
        if by == "episode":
            stmt = select(s.c.episode_id, func.avg(s.c.value)).where(*where).group_by(s.c.episode_id)
        else:
            node = func.coalesce(t.c.node, NO_NODE)
            stmt = (select(node, func.avg(s.c.value)).select_from(s.join(t, t.c.id == s.c.turn_id))
                    .where(*where).group_by(node))
        with self.engine.connect() as conn:
            return {str(k): float(v) for k, v in conn.execute(stmt) if k is not None}

    # ------------------------------------------------------------------ judge calls

    def judge_health(self, *, failure_kinds: Sequence[str], since: datetime | None = None,
                     judge: str | None = None) -> dict[str, Any]:
        """Judge calls: counts by outcome (``failure_kinds`` are the outcomes that count as failures),
        latency (mean, nearest-rank p50 / p95, max), tokens, calls per judge and the last call's time."""
        j = schema.judge_calls
        where = []
        if since is not None:
            where.append(j.c.created_at >= since)
        if judge is not None:
            where.append(j.c.judge == judge)
        with self.engine.connect() as conn:
            by_outcome = {str(k): int(n) for k, n in conn.execute(
                select(j.c.outcome, func.count()).where(*where).group_by(j.c.outcome))}
            agg = conn.execute(select(
                func.count(j.c.latency_ms), func.avg(j.c.latency_ms), func.max(j.c.latency_ms),
                func.sum(j.c.input_tokens), func.sum(j.c.output_tokens),
            ).where(*where)).one()
            timed = int(agg[0] or 0)
            p50 = _percentile(conn, where, timed, 0.50)
            p95 = _percentile(conn, where, timed, 0.95)
            judges = {str(k): int(n) for k, n in conn.execute(
                select(j.c.judge, func.count()).where(*where).group_by(j.c.judge)) if k is not None}
            last = conn.execute(select(func.max(j.c.created_at)).where(*where)).scalar()
        calls = sum(by_outcome.values())
        failures = {kind: by_outcome.get(kind, 0) for kind in failure_kinds}
        failed = sum(failures.values())
        return {
            "calls": calls,
            "ok": by_outcome.get("ok", 0),
            "failures": failures,
            "failure_rate": failed / calls if calls else 0.0,
            "latency_ms": {
                "mean": float(agg[1]) if agg[1] is not None else None,
                "p50": p50,
                "p95": p95,
                "max": float(agg[2]) if agg[2] is not None else None,
            },
            "tokens": {"input": int(agg[3] or 0), "output": int(agg[4] or 0)},
            "judges": judges,
            "last_call_at": last,
        }


def _percentile(conn: Connection, where: list, n: int, q: float) -> float | None:
    """Nearest-rank percentile by ORDER BY ... OFFSET (portable: no percentile function in SQLite)."""
    if n == 0:
        return None
    j = schema.judge_calls
    offset = max(0, math.ceil(q * n) - 1)
    stmt = (select(j.c.latency_ms).where(*where, j.c.latency_ms.is_not(None))
            .order_by(j.c.latency_ms).offset(offset).limit(1))
    value = conn.execute(stmt).scalar()
    return float(value) if value is not None else None
