"""Scoring what capture really wrote from a LangGraph agent, with capture left on while the judge runs."""

from __future__ import annotations

from langchain.agents import create_agent
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver

from langchain_metaclaw import MetaClawCallbackHandler, disable_global_capture, enable_global_capture
from langchain_metaclaw.scoring.scorer import rollup, score_pending
from langchain_metaclaw.scoring.types import JUDGE_TAG
from tests.fixtures.fakes import ScriptedChatModel, tool_call
from tests.unit_tests.scoring.conftest import ScriptedJudge


@tool
def get_weather(city: str) -> str:
    """Weather in a city."""
    return f"sunny in {city}"


def test_captured_agent_thread_is_scored_with_the_users_next_message(mem_store) -> None:
    model = ScriptedChatModel(script=[
        AIMessage("", tool_calls=[tool_call("get_weather", {"city": "Paris"}, "c1")]),
        AIMessage("It is sunny in Paris."),
        AIMessage("You're welcome!"),
    ])
    agent = create_agent(model, [get_weather], checkpointer=InMemorySaver())
    handler = MetaClawCallbackHandler(mem_store)
    config = {"callbacks": [handler], "configurable": {"thread_id": "th-1"}}
    agent.invoke({"messages": [HumanMessage("Weather in Paris?")]}, config=config)
    agent.invoke({"messages": [HumanMessage("Perfect, thanks!")]}, config=config)
    handler.close()
    tool_turn, answer, goodbye = [t for t in mem_store.turns(kind="llm")]

    judge = ScriptedJudge()
    capture = enable_global_capture(mem_store)  # the judge's own calls get captured too ...
    try:
        report = score_pending(mem_store, judge=judge, votes=2, rules=["tool_call_succeeded"])
    finally:
        disable_global_capture()
    assert capture.stats.written > 0
    judge_turns = [t for t in mem_store.turns(kind="llm") if JUDGE_TAG in t.tags]
    assert len(judge_turns) == 4  # 2 turns x 2 votes, tagged, so they are never judged themselves
    assert report.scored == 2 and report.skipped_waiting == 1  # the goodbye waits for a reply
    assert report.rule_scores == {"tool_call_succeeded": 1}
    prompts = {p.split("## The assistant turn")[1].split("## ")[0]: p for p in judge.prompts()}
    answer_prompt = next(p for key, p in prompts.items() if "It is sunny in Paris." in key)
    assert "next_user_message>>>\nPerfect, thanks!\n<<<END" in answer_prompt
    tool_prompt = next(p for key, p in prompts.items() if "tool call get_weather" in key)
    assert "[tool get_weather (ok)] sunny in Paris" in tool_prompt
    assert "next_user_message>>>\nPerfect, thanks!\n<<<END" in tool_prompt

    again = score_pending(mem_store, judge=judge, votes=2)
    assert again.judge_calls == 0 and again.skipped_waiting == 1
    assert {s.turn_id for s in mem_store.scores(source="prm")} == {tool_turn.id, answer.id}
    assert goodbye.id not in {s.turn_id for s in mem_store.scores()}
    assert rollup(mem_store, by="node") == {"model": 1.0}
