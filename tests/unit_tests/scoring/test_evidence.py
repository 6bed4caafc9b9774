"""Evidence gathering: the turn, its tool results, its context and the user's next message."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

from langchain_metaclaw.scoring.evidence import evidence_from_messages, gather_evidence
from langchain_metaclaw.scoring.types import JUDGE_TAG
from tests.unit_tests.scoring.conftest import Trace, call


def _weather_conversation(store, *, ids: bool = True, capture_tools: bool = True) -> tuple[Trace, list[str]]:
    trace = Trace(store, ids=ids).system("You are a weather bot.").user("Weather in Paris?")
    t1 = trace.llm(tool_calls=[call("weather", {"city": "Paris"}, "c1")])
    trace.tool("c1", "weather", "sunny, 21C", capture=capture_tools)
    t2 = trace.llm("It is sunny and 21C in Paris.")
    trace.user("Thanks! And in London?")
    t3 = trace.llm(tool_calls=[call("weather", {"city": "London"}, "c2")])
    trace.tool("c2", "weather", "ERROR: service unavailable", status="error", capture=capture_tools)
    t4 = trace.llm("Sorry, I could not get London's weather.")
    trace.user("That's useless.")
    t5 = trace.llm("I apologise.")
    trace.commit()
    return trace, [t1, t2, t3, t4, t5]


@pytest.mark.parametrize("ids", [True, False], ids=["message-ids", "no-message-ids"])
def test_next_user_message_skips_the_agents_own_tool_loop(mem_store, ids: bool) -> None:
    _, (t1, t2, t3, t4, t5) = _weather_conversation(mem_store, ids=ids)
    nexts = [gather_evidence(mem_store, t)["next_user_message"] for t in (t1, t2, t3, t4, t5)]
    assert nexts == ["Thanks! And in London?", "Thanks! And in London?", "That's useless.", "That's useless.", None]


def test_context_output_and_tool_results(mem_store) -> None:
    _, (t1, _, t3, _, _) = _weather_conversation(mem_store)
    first = gather_evidence(mem_store, t1)
    assert [m["role"] for m in first["context"]] == ["system", "user"]
    assert first["output"]["tool_calls"] == [{"name": "weather", "args": {"city": "Paris"}, "id": "c1"}]
    assert first["tool_results"] == [{"tool_call_id": "c1", "name": "weather", "args": {}, "status": "ok",
                                      "result": "sunny, 21C"}]
    assert first["node"] == "agent" and first["turn_id"] == t1 and first["ended_at"] is not None
    third = gather_evidence(mem_store, t3)
    assert third["tool_results"][0]["status"] == "error"
    assert third["tool_results"][0]["result"] == "ERROR: service unavailable"


def test_tool_results_fall_back_to_tool_messages_when_tool_turns_were_not_captured(mem_store) -> None:
    _, (t1, _, t3, _, _) = _weather_conversation(mem_store, capture_tools=False)
    assert gather_evidence(mem_store, t1)["tool_results"] == [
        {"tool_call_id": "c1", "name": "weather", "args": {"city": "Paris"}, "status": "ok", "result": "sunny, 21C"}]
    assert gather_evidence(mem_store, t3)["tool_results"][0]["status"] == "error"


def test_a_repeated_user_message_is_still_the_next_message(mem_store) -> None:
    trace = Trace(mem_store, ids=False).user("try again")
    t1 = trace.llm("Here is attempt one.")
    trace.user("try again")
    trace.llm("Here is attempt two.")
    trace.commit()
    assert gather_evidence(mem_store, t1)["next_user_message"] == "try again"


def test_judge_calls_captured_in_the_episode_are_not_user_messages(mem_store) -> None:
    trace = Trace(mem_store).user("Hi")
    t1 = trace.llm("Hello!")
    judge_trace_input = trace.history + [HumanMessage("Grade the assistant turn.")]
    trace.history = judge_trace_input
    trace.llm("Score: +1", tags=[JUDGE_TAG])
    trace.commit()
    assert gather_evidence(mem_store, t1)["next_user_message"] is None


def test_gather_evidence_rejects_unknown_and_tool_turns(mem_store) -> None:
    trace = Trace(mem_store).user("Hi")
    trace.llm(tool_calls=[call("lookup", {}, "c9")])
    tool_turn = trace.tool("c9", "lookup", "nothing")
    trace.commit()
    with pytest.raises(ValueError, match="no turn with id 'nope'"):
        gather_evidence(mem_store, "nope")
    with pytest.raises(ValueError, match="only llm"):
        gather_evidence(mem_store, tool_turn)


def test_evidence_from_messages() -> None:
    messages = [
        HumanMessage("Weather in Paris?"),
        AIMessage("", tool_calls=[call("weather", {"city": "Paris"}, "c1")]),
        ToolMessage("sunny", tool_call_id="c1"),
        HumanMessage("great, thanks"),
    ]
    evidence = evidence_from_messages(messages)
    assert evidence["context"] == [{"role": "user", "content": "Weather in Paris?"}]
    assert evidence["output"]["tool_calls"][0]["name"] == "weather"
    assert evidence["tool_results"][0]["result"] == "sunny"
    assert evidence["next_user_message"] == "great, thanks"
    last = evidence_from_messages(messages[:2])
    assert last["next_user_message"] is None and last["tool_results"] == []
    with pytest.raises(ValueError, match="at least one assistant"):
        evidence_from_messages([HumanMessage("hi")])


def test_the_judge_sees_text_blocks_and_a_marker_for_other_content() -> None:
    question = HumanMessage([{"type": "text", "text": "What is in "}, "this picture?",
                             {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}])
    evidence = evidence_from_messages([question, AIMessage([{"type": "text", "text": "A cat."}])])
    assert evidence["context"] == [{"role": "user", "content": "What is in this picture?[image_url]"}]
    assert evidence["output"]["content"] == "A cat."
