"""Store queries the scorer needs and ``TraceStore`` does not offer (SQLAlchemy Core, SQLite and PostgreSQL).

All writes here are single transactions: a PRM result (its score row and its ``judge_calls`` rows) is
committed together as soon as it is known, so a killed scorer loses at most the turns in flight.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Text, and_, cast, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite

from langchain_metaclaw.scoring.judge import FAILURE_KINDS, JUDGE_TAG, Vote
from langchain_metaclaw.store import schema

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from langchain_metaclaw.store.trace_store import TraceStore

PRM_SOURCE = "prm"
REWARD_KEY = "reward"
NO_NODE = "(none)"
"""Roll-up key of turns made outside any LangGraph node."""

_CHUNK = 500


def _chunks(items: Sequence[str], size: int = _CHUNK) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _not_judge_call():
    """SQL filter: the turn is not a captured call of the judge itself (tags JSON does not name it)."""
    t = schema.turns
    return or_(t.c.tags.is_(None), ~func.coalesce(cast(t.c.tags, Text), "").contains(JUDGE_TAG))


# ---------------------------------------------------------------------------------------------- selections


def pending_prm_turns(store: TraceStore, *, max_attempts: int, limit: int | None = None) -> list[tuple[str, str]]:
    """``(turn id, episode id)`` of successful llm turns with no ``prm`` score yet, or still ``unscored`` with
    attempts left, oldest first."""
    t, s = schema.turns, schema.scores
    joined = t.outerjoin(s, and_(s.c.turn_id == t.c.id, s.c.source == PRM_SOURCE, s.c.key == REWARD_KEY))
    stmt = (
        select(t.c.id, t.c.episode_id)
        .select_from(joined)
        .where(
            t.c.kind == "llm",
            t.c.status == "ok",
            _not_judge_call(),
            or_(s.c.id.is_(None), and_(s.c.status == "unscored", s.c.attempts < max_attempts)),
        )
        .order_by(t.c.started_at, t.c.seq, t.c.id)
    )
    if limit is not None:
        stmt = stmt.limit(limit)
    with store.engine.connect() as conn:
        return [(row[0], row[1]) for row in conn.execute(stmt)]


def turns_without_score(store: TraceStore, source: str, *, key: str = REWARD_KEY,
                        kind: str = "llm") -> list[tuple[str, str]]:
    """``(turn id, episode id)`` of ``kind`` turns that have no score row from ``source``/``key``."""
    t, s = schema.turns, schema.scores
    joined = t.outerjoin(s, and_(s.c.turn_id == t.c.id, s.c.source == source, s.c.key == key))
    stmt = (
        select(t.c.id, t.c.episode_id)
        .select_from(joined)
        .where(t.c.kind == kind, s.c.id.is_(None), _not_judge_call())
        .order_by(t.c.started_at, t.c.seq, t.c.id)
    )
    with store.engine.connect() as conn:
        return [(row[0], row[1]) for row in conn.execute(stmt)]


def attempts_of(store: TraceStore, turn_ids: Sequence[str], source: str = PRM_SOURCE) -> dict[str, int]:
    s = schema.scores
    result: dict[str, int] = {}
    with store.engine.connect() as conn:
        for chunk in _chunks(list(turn_ids)):
            stmt = select(s.c.turn_id, s.c.attempts).where(s.c.source == source, s.c.key == REWARD_KEY,
                                                             s.c.turn_id.in_(chunk))
            result.update((row[0], int(row[1])) for row in conn.execute(stmt))
    return result


# ---------------------------------------------------------------------------------------------- writes


def _insert(store: TraceStore, table):
    return (postgresql.insert if store.dialect == "postgresql" else sqlite.insert)(table)


_UPSERTS: dict[str, Any] = {}


def _upsert_statement(store: TraceStore):
    """The scores upsert for this store's dialect, built once (building it costs more than running it)."""
    stmt = _UPSERTS.get(store.dialect)
    if stmt is None:
        insert = _insert(store, schema.scores)
        ex = insert.excluded
        stmt = insert.on_conflict_do_update(
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
        _UPSERTS[store.dialect] = stmt
    return stmt


def _upsert_scores(store: TraceStore, conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Insert or replace scores keyed by (turn_id, source, key); ``attempts`` counts writes (as the store does)."""
    now = datetime.now(UTC)
    values = [{"status": "scored", "confidence": None, "reason": None, "details": None, "episode_id": None,
               "key": REWARD_KEY, **row, "attempts": 1, "created_at": now, "updated_at": now} for row in rows]
    conn.execute(_upsert_statement(store), values)


def upsert_scores(store: TraceStore, rows: Sequence[dict[str, Any]]) -> None:
    """Write several scores in one transaction (rows: turn_id, source, value, ... as ``add_score`` takes)."""
    if rows:
        with store.engine.begin() as conn:
            _upsert_scores(store, conn, rows)


def judge_call_rows(turn_id: str | None, judge: str, votes: Sequence[Vote]) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    return [
        {"turn_id": turn_id, "judge": judge, "outcome": v["outcome"], "latency_ms": v["latency_ms"],
         "input_tokens": v.get("input_tokens"), "output_tokens": v.get("output_tokens"), "created_at": now}
        for v in votes
    ]


def record_prm_result(store: TraceStore, *, score: dict[str, Any] | None, calls: Sequence[dict[str, Any]]) -> None:
    """Commit one turn's PRM score row (if any) and its judge calls together."""
    with store.engine.begin() as conn:
        if score is not None:
            _upsert_scores(store, conn, [score])
        if calls:
            conn.execute(schema.judge_calls.insert(), list(calls))


# ---------------------------------------------------------------------------------------------- feedback


def numeric_feedback(store: TraceStore) -> list[dict[str, Any]]:
    """Feedback rows that carry a number (only those become scores), oldest first."""
    f = schema.feedback
    stmt = (select(f.c.id, f.c.run_id, f.c.key, f.c.score, f.c.comment, f.c.created_at)
            .where(f.c.score.is_not(None)).order_by(f.c.created_at, f.c.id))
    with store.engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(stmt)]


def feedback_scores(store: TraceStore) -> list[dict[str, Any]]:
    s = schema.scores
    stmt = select(s.c.turn_id, s.c.key, s.c.details).where(s.c.source == "feedback")
    with store.engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(stmt)]


def feedback_targets(store: TraceStore, run_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
    """``run_id -> (turn_id, episode_id)``: the turn itself, else the last llm turn of that root run.

    The same rule as ``TraceStore.add_feedback``.
    """
    t = schema.turns
    targets: dict[str, tuple[str, str]] = {}
    with store.engine.connect() as conn:
        for chunk in _chunks(list(run_ids)):
            for row in conn.execute(select(t.c.id, t.c.episode_id).where(t.c.id.in_(chunk))):
                targets[row[0]] = (row[0], row[1])
        rest = [r for r in run_ids if r not in targets]
        for chunk in _chunks(rest):
            stmt = (select(t.c.root_run_id, t.c.id, t.c.episode_id)
                    .where(t.c.root_run_id.in_(chunk), t.c.kind == "llm", _not_judge_call())
                    .order_by(t.c.started_at, t.c.seq))
            for root, turn_id, episode_id in conn.execute(stmt):
                targets[root] = (turn_id, episode_id)  # ascending order: the last one wins
    return targets


# ---------------------------------------------------------------------------------------------- read-outs


def rollup(store: TraceStore, by: str, *, source: str, key: str) -> dict[str, float]:
    s, t = schema.scores, schema.turns
    where = [s.c.source == source, s.c.key == key, s.c.status == "scored", s.c.value.is_not(None)]
    if by == "episode":
        stmt = select(s.c.episode_id, func.avg(s.c.value)).where(*where).group_by(s.c.episode_id)
    else:
        node = func.coalesce(t.c.node, NO_NODE)
        stmt = (select(node, func.avg(s.c.value)).select_from(s.join(t, t.c.id == s.c.turn_id))
                .where(*where).group_by(node))
    with store.engine.connect() as conn:
        return {str(k): float(v) for k, v in conn.execute(stmt) if k is not None}


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


def judge_health(store: TraceStore, *, since: datetime | None = None, judge: str | None = None) -> dict[str, Any]:
    j = schema.judge_calls
    where = []
    if since is not None:
        where.append(j.c.created_at >= since)
    if judge is not None:
        where.append(j.c.judge == judge)
    with store.engine.connect() as conn:
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
    failures = {kind: by_outcome.get(kind, 0) for kind in FAILURE_KINDS}
    failed = sum(failures.values())
    if isinstance(last, datetime) and last.tzinfo is None:
        last = last.replace(tzinfo=UTC)
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
