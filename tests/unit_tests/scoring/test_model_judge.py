"""The embedded SmolLM2-135M as a real (weak) judge: whatever it writes, every vote ends as a parsed score or
a counted failure, never an exception, and the bookkeeping adds up."""

from __future__ import annotations

from collections import Counter

import pytest
from sqlalchemy import select

from langchain_metaclaw.scoring.judge import SCORE_VALUES
from langchain_metaclaw.scoring.scorer import judge_health, score_pending
from langchain_metaclaw.store import schema
from tests.unit_tests.scoring.conftest import Trace, call

pytestmark = pytest.mark.model


def test_weak_model_judge_output_is_parsed_or_counted(base_model_and_tokenizer, mem_store) -> None:
    from langchain_metaclaw.chat_model.base import MetaClawChatModel

    tools = Trace(mem_store).user("What's the weather in Rome?")
    tools.llm(tool_calls=[call("weather", {"city": "Rome"}, "w1")])
    tools.tool("w1", "weather", "ERROR: unknown city", status="error")
    tools.llm("The weather in Rome is snowy.")
    tools.user("That's wrong, the tool failed.")
    tools.commit()
    turns = tools.turn_ids

    judge = MetaClawChatModel(temperature=0.0, max_tokens=24)
    votes = 2
    report = score_pending(mem_store, judge=judge, votes=votes, vote_timeout=300, concurrency=2)

    assert report.scored + report.unscored == len(turns)
    assert report.judge_calls == votes * len(turns)
    with mem_store.engine.connect() as conn:
        outcomes = Counter(r[0] for r in conn.execute(select(schema.judge_calls.c.outcome)))
    assert sum(outcomes.values()) == report.judge_calls
    assert set(outcomes) <= {"ok", "unparseable", "refused", "timeout", "error"}
    assert outcomes["error"] == 0  # the model ran; bad output is unparseable/refused, not an exception
    failed = {k: n for k, n in outcomes.items() if k != "ok"}
    assert report.judge_failures == failed
    health = judge_health(mem_store)
    assert health["calls"] == report.judge_calls and health["ok"] == outcomes["ok"]

    for score in mem_store.scores(source="prm"):
        valid = [v for v, o in zip(score.details["votes"], score.details["outcomes"], strict=True) if o == "ok"]
        assert score.details["valid_votes"] == len(valid)
        assert all(v in SCORE_VALUES for v in valid)
        if valid:
            assert score.status == "scored" and score.value in SCORE_VALUES and 0 <= score.confidence <= 1
        else:
            assert score.status == "unscored" and score.value is None
            assert score.reason.startswith((f"{votes}/{votes} votes ", f"no valid vote of {votes}: "))
    # what the weak judge said, for the record (pytest -s)
    for score in mem_store.scores(source="prm"):
        print(score.status, score.value, score.details["outcomes"], score.details["answers"])
