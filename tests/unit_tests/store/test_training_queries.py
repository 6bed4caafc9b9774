"""The reads training needs, answered in SQL (SQLite and PostgreSQL)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from tests.unit_tests.store.test_store import _episode, _turn


def _scored_store(store, t0):
    store.write_records([
        _episode(t=t0),
        _turn("old", t=t0 - 100, seq=1, created_at=t0 - 100, adapter_version="v1"),
        _turn("a", t=t0, seq=2, adapter_version="v1"),
        _turn("b", t=t0 + 1, seq=3, adapter_version="v2"),
        _turn("failed", t=t0 + 2, seq=4, status="error"),
        _turn("unscored", t=t0 + 3, seq=5),
        _turn("tool", kind="tool", t=t0 + 4, seq=6),
    ])
    for turn_id, value in [("old", 1.0), ("a", 0.5), ("b", -1.0), ("failed", 1.0), ("tool", 1.0)]:
        store.add_score(turn_id, value, source="prm")
    store.add_score("a", 1.0, source="feedback", key="thumbs")
    store.add_score("unscored", None, source="prm", status="unscored")


def test_scored_turns_with_their_scores(store):
    t0 = time.time()
    _scored_store(store, t0)
    got = store.scored_turns()
    assert [(turn.id, [(s.source, s.value) for s in scores]) for turn, scores in got] == [
        ("old", [("prm", 1.0)]),
        ("a", [("prm", 0.5), ("feedback", 1.0)]),
        ("b", [("prm", -1.0)]),
    ]
    since = datetime.fromtimestamp(t0 - 10, UTC)
    assert [turn.id for turn, _ in store.scored_turns(since=since)] == ["a", "b"]


def test_trained_turns_are_excluded_in_sql(store):
    _scored_store(store, time.time())
    done = store.start_train_run(backend="local")
    store.finish_train_run(done.id, status="ok", samples=["a", "missing"])
    failed = store.start_train_run(backend="local")
    store.finish_train_run(failed.id, status="error", samples=["b"])  # an error trained nothing
    store.start_train_run(backend="local")  # still running, no samples yet
    assert store.trained_turn_ids() == {"a", "missing"}
    assert [turn.id for turn, _ in store.scored_turns(exclude_trained=True)] == ["old", "b"]
    assert store.train_run(done.id).samples == ["a", "missing"]
    assert store.train_run("nope") is None


def test_live_rewards_by_version(store):
    t0 = time.time()
    _scored_store(store, t0)
    store.write_records([_turn("base", t=t0 + 5, seq=7)])
    store.add_score("base", 0.25, source="rule:len")
    assert store.live_rewards("v1") == [1.0, 0.5, 1.0]
    assert store.live_rewards("v2") == [-1.0]
    assert store.live_rewards(None) == [1.0, 0.25]  # served by the base model ("failed" is an llm turn too)
    assert store.live_rewards("v3") == []
