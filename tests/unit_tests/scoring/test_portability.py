"""The scorer's own queries on SQLite and on a real PostgreSQL server (the ``store`` fixture runs both)."""

from __future__ import annotations

import pytest

from langchain_metaclaw.scoring.scorer import judge_health, rollup, score_pending
from langchain_metaclaw.scoring.types import JUDGE_TAG
from tests.unit_tests.scoring.conftest import ScriptedJudge, Trace, call


def test_full_pass_on_each_backend(store) -> None:
    trace = Trace(store).user("Weather in Paris?")
    t1 = trace.llm(tool_calls=[call("weather", {"city": "Paris"}, "c1")])
    trace.tool("c1", "weather", "sunny")
    t2 = trace.llm("Sunny.", node="answer")
    trace.llm("Score: +1", tags=[JUDGE_TAG])  # a captured judge call: never judged
    early = store.thumbs(t2, up=True)  # before capture wrote the turn
    trace.user("thanks")
    trace.commit()
    garbage = Trace(store).user("Hi")
    stubborn = garbage.llm("Hello")
    garbage.commit()

    def grade(messages):
        return "no score here" if "[assistant] Hello" in str(messages[-1].content) else "ok\nScore: +1"

    report = score_pending(store, judge=ScriptedJudge(answer=grade), votes=2, max_attempts=2,
                           rules=["tool_call_succeeded"])
    assert (report.scored, report.unscored, report.feedback_resolved) == (2, 1, 1)
    assert report.rule_scores == {"tool_call_succeeded": 1} and report.judge_failures == {"unparseable": 2}
    assert {s.turn_id for s in store.scores(source="prm", status="scored")} == {t1, t2}
    assert store.scores(t2, source="feedback")[0].details["feedback_id"] == early.id
    assert rollup(store, by="node") == {"agent": 1.0, "answer": 1.0}
    assert rollup(store, by="episode") == {trace.episode_id: 1.0}

    second = score_pending(store, judge=ScriptedJudge(answer=grade), votes=2, max_attempts=2,
                           rules=["tool_call_succeeded"])
    assert (second.scored, second.unscored, second.exhausted, second.judge_calls) == (0, 1, 1, 2)
    third = score_pending(store, judge=ScriptedJudge(), votes=2, max_attempts=2)
    assert third.judge_calls == 0
    [left] = store.scores(stubborn, source="prm")
    assert (left.status, left.attempts, left.reason) == ("unscored", 2, "2/2 votes unparseable")

    health = judge_health(store)
    assert health["calls"] == 8 and health["ok"] == 4 and health["failures"]["unparseable"] == 4
    assert health["latency_ms"]["p95"] is not None and health["tokens"]["output"] > 0
    assert judge_health(store, since=health["last_call_at"])["calls"] >= 2


@pytest.mark.parametrize("max_attempts", [1])
def test_max_attempts_one_means_a_single_try(store, max_attempts) -> None:
    trace = Trace(store).user("Hi")
    turn = trace.llm("Hello")
    trace.commit()
    report = score_pending(store, judge=ScriptedJudge(answer="?"), votes=1, max_attempts=max_attempts)
    assert report.exhausted == 1
    assert score_pending(store, judge=ScriptedJudge(), votes=1, max_attempts=max_attempts).judge_calls == 0
    assert store.scores(turn, source="prm")[0].attempts == 1
