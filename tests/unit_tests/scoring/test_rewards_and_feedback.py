"""Programmatic rewards (rules) and explicit feedback become scores through score_pending."""

from __future__ import annotations

import uuid

import pytest

from langchain_metaclaw.errors import ConfigurationError
from langchain_metaclaw.scoring.rewards import (
    evaluate_reward,
    get_reward,
    json_valid_reward,
    list_rewards,
    register_reward,
    unregister_reward,
)
from langchain_metaclaw.scoring.scorer import score_pending
from tests.unit_tests.scoring.conftest import Trace, call


@pytest.fixture
def rules():
    """Register rules for one test and remove them afterwards."""
    added: list[str] = []

    def add(name, fn):
        register_reward(name, fn)
        added.append(name)
        return fn

    yield add
    for name in added:
        unregister_reward(name)


def _rule_values(store, name: str) -> dict[str, float]:
    return {s.turn_id: s.value for s in store.scores(source=f"rule:{name}")}


def test_builtin_rules(mem_store) -> None:
    trace = Trace(mem_store).user("Weather in Paris and London?")
    ok_calls = trace.llm(tool_calls=[call("weather", {"city": "Paris"}, "c1")])
    trace.tool("c1", "weather", "sunny")
    failed_calls = trace.llm(tool_calls=[call("weather", {"city": "London"}, "c2"), call("time", {}, "c3")])
    trace.tool("c2", "weather", "cloudy")
    trace.tool("c3", "time", "ToolException: clock broken", status="error")
    uncaptured = trace.llm(tool_calls=[call("weather", {"city": "Rome"}, "c4")])  # its tool never ran (yet)
    json_answer = trace.llm('```json\n{"paris": "sunny", "london": "cloudy"}\n```')
    prose = trace.llm("Paris is sunny.")
    malformed = trace.llm(invalid_tool_calls=[{"name": "weather", "args": "{city: Rome", "id": "c5",
                                               "error": "bad json", "type": "invalid_tool_call"}])
    errored = trace.llm(status="error")
    trace.commit()

    report = score_pending(mem_store, rules=["tool_call_succeeded", "json_valid", "no_error"])
    assert _rule_values(mem_store, "tool_call_succeeded") == {ok_calls: 1.0, failed_calls: -1.0, malformed: -1.0}
    assert _rule_values(mem_store, "json_valid") == {json_answer: 1.0, prose: -1.0}
    assert _rule_values(mem_store, "no_error") == {
        ok_calls: 1.0, failed_calls: 1.0, uncaptured: 1.0, json_answer: 1.0, prose: 1.0, malformed: -1.0,
        errored: -1.0}
    assert report.rule_scores == {"tool_call_succeeded": 3, "json_valid": 2, "no_error": 7}
    assert report.rule_errors == {}
    [row] = mem_store.scores(ok_calls, source="rule:tool_call_succeeded")
    assert (row.status, row.attempts, row.episode_id, row.details) == ("scored", 1, trace.episode_id, {"rule": "tool_call_succeeded"})

    # idempotent; and the tool call that had not run gets its score once its tool turn arrives
    again = score_pending(mem_store, rules=["tool_call_succeeded", "json_valid", "no_error"])
    assert again.rule_scores == {"tool_call_succeeded": 0, "json_valid": 0, "no_error": 0}
    trace.tool("c4", "weather", "rainy")
    trace.commit()
    late = score_pending(mem_store, rules=["tool_call_succeeded"])
    assert late.rule_scores == {"tool_call_succeeded": 1}
    assert _rule_values(mem_store, "tool_call_succeeded")[uncaptured] == 1.0
    assert all(s.attempts == 1 for s in mem_store.scores() if s.source.startswith("rule:"))


def test_json_schema_rule_registered_with_a_schema(mem_store, rules) -> None:
    schema = {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}
    rules("city_json", json_valid_reward(schema))
    trace = Trace(mem_store).user("Which city?")
    good = trace.llm('{"city": "Paris"}')
    wrong_shape = trace.llm('{"town": "Paris"}')
    trace.commit()
    score_pending(mem_store, rules=["city_json"])
    assert _rule_values(mem_store, "city_json") == {good: 1.0, wrong_shape: -1.0}
    with pytest.raises(ConfigurationError, match="invalid JSON schema"):
        json_valid_reward({"type": "no-such-type"})


def test_a_raising_or_bad_rule_is_counted_and_never_stops_the_scorer(mem_store, rules, caplog) -> None:
    @register_reward("explodes")
    def explodes(turn, episode):
        raise KeyError("missing field")

    rules("explodes", explodes)
    rules("says_yes", lambda turn, episode: "yes")
    rules("length", lambda turn, episode: None if turn.status != "ok" else 0.5)
    trace = Trace(mem_store).user("Hi")
    first = trace.llm("Hello")
    second = trace.llm("Hello again")
    trace.llm(status="error")
    trace.commit()
    report = score_pending(mem_store, rules=["explodes", "says_yes", "length"])
    assert report.rule_errors == {"explodes": 3, "says_yes": 3}
    assert report.rule_scores == {"explodes": 0, "says_yes": 0, "length": 2}
    assert _rule_values(mem_store, "length") == {first: 0.5, second: 0.5}  # None: no row for the failed call
    assert "reward rule 'explodes' failed on 3 turn(s) (first: KeyError: 'missing field')" in caplog.text


def test_registry(rules) -> None:
    assert {"tool_call_succeeded", "json_valid", "no_error"} <= set(list_rewards())
    fn = rules("custom_rule", lambda turn, episode: 1.0)
    assert get_reward("custom_rule") is fn
    register_reward("custom_rule", fn)  # the same function again is fine
    with pytest.raises(ConfigurationError, match="already registered"):
        register_reward("custom_rule", lambda turn, episode: 0.0)
    with pytest.raises(ConfigurationError, match="unknown reward rule 'nope'"):
        get_reward("nope")
    with pytest.raises(ConfigurationError, match="unknown reward rule 'nope'"):
        score_pending(None, rules=["nope"])  # fails before touching the store
    with pytest.raises(ConfigurationError, match="names are"):
        register_reward("has space", fn)
    with pytest.raises(ValueError, match="expected a finite number"):
        rules("nan_rule", lambda turn, episode: float("nan"))
        evaluate_reward("nan_rule", None, None)


def test_feedback_given_before_its_turn_was_captured_is_resolved_once(mem_store) -> None:
    trace = Trace(mem_store).user("Hi")
    turn = trace.llm("Hello")
    early = mem_store.thumbs(turn, up=False, comment="rude")  # capture has not written the turn yet
    assert mem_store.scores(turn) == [] and mem_store.feedback(turn) == [early]
    pending = score_pending(mem_store)
    assert (pending.feedback_resolved, pending.feedback_pending) == (0, 1)
    trace.commit()
    report = score_pending(mem_store)
    assert (report.feedback_resolved, report.feedback_pending) == (1, 0)
    [score] = mem_store.scores(turn, source="feedback")
    assert (score.key, score.value, score.confidence, score.reason, score.attempts) == ("thumbs", -1.0, 1.0, "rude", 1)
    assert score.details["feedback_id"] == early.id and score.episode_id == trace.episode_id
    assert score_pending(mem_store).feedback_resolved == 0
    assert mem_store.scores(turn, source="feedback")[0].attempts == 1


def test_feedback_on_a_root_run_and_newest_feedback_wins(mem_store) -> None:
    trace = Trace(mem_store).user("Plan my trip")
    trace.llm(tool_calls=[call("search", {"q": "flights"}, "s1")])
    trace.tool("s1", "search", "3 flights")
    last = trace.llm("Here are 3 flights.")
    first = mem_store.add_feedback(trace.root_run_id, 0.2)
    second = mem_store.add_feedback(trace.root_run_id, 0.9, "better after all")
    trace.commit()
    report = score_pending(mem_store)
    assert report.feedback_resolved == 1
    [score] = mem_store.scores(source="feedback")
    assert (score.turn_id, score.value, score.details["feedback_id"]) == (last, 0.9, second.id)
    assert score_pending(mem_store).feedback_resolved == 0
    assert first.id != second.id


def test_feedback_already_scored_by_the_store_is_left_alone(mem_store) -> None:
    trace = Trace(mem_store).user("Hi")
    turn = trace.llm("Hello")
    trace.commit()
    mem_store.thumbs(turn, up=True)  # the store writes the score directly
    assert score_pending(mem_store).feedback_resolved == 0
    assert mem_store.scores(turn, source="feedback")[0].attempts == 1
    mem_store.add_feedback(str(uuid.uuid4()), 1.0)  # about a run that never shows up
    assert score_pending(mem_store).feedback_pending == 1
