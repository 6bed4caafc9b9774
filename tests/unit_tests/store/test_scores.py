"""Scores, feedback and judge calls in the store (SQLite and PostgreSQL)."""

from __future__ import annotations

import time

from langchain_metaclaw.store.scores import FEEDBACK_SOURCE, JUDGE_TAG, PRM_SOURCE
from tests.unit_tests.store.test_store import _episode, _turn


def _root_whose_last_llm_turn_is_a_judge_call(store, t0):
    store.write_records([
        _episode(t=t0),
        _turn("answer", t=t0, seq=1),
        _turn("tool", kind="tool", t=t0 + 1, seq=2),
        _turn("judge", t=t0 + 2, seq=3, tags=["seq:step:1", JUDGE_TAG]),
    ])


def test_feedback_on_a_root_run_skips_the_judges_own_turn(store):
    """A judge's call captured under the same root is never what the user rated (the old add_feedback rule
    took the last llm turn, the judge's)."""
    _root_whose_last_llm_turn_is_a_judge_call(store, time.time())
    store.thumbs("r1", up=True)
    (score,) = store.scores(source=FEEDBACK_SOURCE)
    assert (score.turn_id, score.episode_id, score.value) == ("answer", "e1", 1.0)


def test_feedback_given_before_capture_resolves_to_the_same_turn(store):
    store.add_feedback("r1", 1.0)  # the run is not captured yet: kept, no score
    assert store.scores() == []
    _root_whose_last_llm_turn_is_a_judge_call(store, time.time())
    assert store.feedback_targets(["r1", "tool", "unknown"]) == {"r1": ("answer", "e1"), "tool": ("tool", "e1")}


def test_one_upsert_for_single_and_batch_writes(store):
    store.write_records([_episode(), _turn("a"), _turn("b", seq=2)])
    store.add_score("a", None, source=PRM_SOURCE, status="unscored", reason="all votes failed")
    store.upsert_scores([
        {"turn_id": "a", "source": PRM_SOURCE, "value": 1.0},  # no episode id: the stored one stays
        {"turn_id": "b", "episode_id": "e1", "source": "rule:len", "value": 0.5, "details": {"rule": "len"}},
    ])
    a, b = store.scores()
    assert (a.turn_id, a.value, a.status, a.attempts, a.episode_id, a.reason) == ("a", 1.0, "scored", 2, "e1", None)
    assert (b.source, b.key, b.value, b.attempts, b.details) == ("rule:len", "reward", 0.5, 1, {"rule": "len"})
    assert store.score_attempts(["a", "b", "c"]) == {"a": 2}


def test_judge_turns_are_never_pending(store):
    t0 = time.time()
    _root_whose_last_llm_turn_is_a_judge_call(store, t0)
    assert store.pending_prm_turns(max_attempts=3) == [("answer", "e1")]
    assert store.turns_without_score("rule:len") == [("answer", "e1")]
    store.record_prm_result(
        score={"turn_id": "answer", "episode_id": "e1", "source": PRM_SOURCE, "status": "unscored"},
        turn_id="answer", judge="fake", votes=[{"outcome": "timeout", "latency_ms": 10.0}],
    )
    assert store.pending_prm_turns(max_attempts=1) == []
    health = store.judge_health(failure_kinds=("timeout", "error"))
    assert (health["calls"], health["failures"], health["judges"]) == (1, {"timeout": 1, "error": 0}, {"fake": 1})
    assert health["last_call_at"].utcoffset() is not None
