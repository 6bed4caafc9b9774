"""The PRM graph: standalone (sync and async), as a sub-graph of a user's graph, and each kind of bad vote."""

from __future__ import annotations

import operator
from typing import Annotated, Any, NotRequired, TypedDict

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

from langchain_metaclaw.errors import ConfigurationError
from langchain_metaclaw.scoring.graph import create_prm_graph
from langchain_metaclaw.scoring.types import JUDGE_TAG
from tests.unit_tests.scoring.conftest import ScriptedJudge, Trace

CONVERSATION = [HumanMessage("What is 2+2?"), AIMessage("4"), HumanMessage("Correct, thanks!")]


def test_standalone_invoke_scores_the_last_ai_message(judge: ScriptedJudge) -> None:
    result = create_prm_graph(judge).invoke({"messages": CONVERSATION})
    assert result["score"] == 1.0 and result["confidence"] == 1.0 and result["status"] == "scored"
    assert result["reason"] == "3/3 valid votes +1: The turn helped."
    assert [v["outcome"] for v in result["votes"]] == ["ok"] * 3
    assert result["details"]["next_user_message"] == "present"
    assert set(result) == {"turn_id", "score", "confidence", "status", "reason", "votes", "details"}
    assert len(judge.calls) == 3
    prompt = judge.prompts()[0]
    assert "next_user_message>>>\nCorrect, thanks!\n<<<END" in prompt  # the user's next message is evidence


async def test_async_votes_run_in_parallel() -> None:
    judge = ScriptedJudge(delay=0.3)
    import time

    started = time.perf_counter()
    result = await create_prm_graph(judge, votes=5).ainvoke({"messages": CONVERSATION})
    assert time.perf_counter() - started < 1.2  # 5 x 0.3 s serially would be 1.5 s
    assert result["details"]["valid_votes"] == 5


def _answers(*answers):
    it = iter(answers)
    return lambda messages: next(it)


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize(
    ("judge_kwargs", "status", "score", "reason", "outcomes"),
    [
        ({"answer": "I think it was fine"}, "unscored", None, "3/3 votes unparseable", ["unparseable"] * 3),
        ({"answer": "I'm sorry, I can't grade this."}, "unscored", None, "3/3 votes refused", ["refused"] * 3),
        ({"answer": RuntimeError("judge is down")}, "unscored", None, "3/3 votes error", ["error"] * 3),
        ({"answer": "Score: +1", "delay": 2.0}, "unscored", None, "3/3 votes timeout", ["timeout"] * 3),
        ({"answer": ("Score: -1", "no idea", "Score: -1")}, "scored", -1.0, "2/2 valid votes -1",
         ["ok", "unparseable", "ok"]),
    ],
    ids=["garbage", "refusing", "raising", "slow", "mixed"],
)
async def test_bad_votes_are_dropped_and_counted_never_read_as_zero(mode, judge_kwargs, status, score, reason,
                                                                    outcomes) -> None:
    if isinstance(judge_kwargs["answer"], tuple):  # one answer per call, in order
        judge_kwargs = {**judge_kwargs, "answer": _answers(*judge_kwargs["answer"])}
    judge = ScriptedJudge(**judge_kwargs)
    graph = create_prm_graph(judge, vote_timeout=0.2, votes=3)
    if mode == "sync":
        result = graph.invoke({"messages": CONVERSATION})
    else:
        result = await graph.ainvoke({"messages": CONVERSATION})
    assert result["status"] == status and result["score"] == score and result["reason"] == reason
    assert sorted(v["outcome"] for v in result["votes"]) == sorted(outcomes)
    assert result["details"]["valid_votes"] == outcomes.count("ok")
    for vote in result["votes"]:
        if vote["outcome"] == "timeout":
            assert 150 < vote["latency_ms"] < 1500 and vote["text"] == "no answer within 0.2s"
        if vote["outcome"] == "error":
            assert vote["text"] == "RuntimeError: judge is down"


def test_judge_calls_are_tagged_so_capture_never_scores_them(judge: ScriptedJudge) -> None:
    seen: list[list[str]] = []

    class Tags(BaseCallbackHandler):
        def on_chat_model_start(self, serialized, messages, *, tags=None, **kwargs):
            seen.append(list(tags or []))

    create_prm_graph(judge, votes=2).invoke({"messages": CONVERSATION}, config={"callbacks": [Tags()]})
    assert len(seen) == 2 and all(JUDGE_TAG in tags for tags in seen)


class UserState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]
    score: NotRequired[float | None]
    status: NotRequired[str]
    reason: NotRequired[str]
    steps: Annotated[list[str], operator.add]


def test_prm_graph_as_a_node_of_a_user_graph(judge: ScriptedJudge) -> None:
    def agent(state: UserState) -> dict[str, Any]:
        return {"messages": [AIMessage("Paris.")], "steps": ["agent"]}

    builder = StateGraph(UserState)
    builder.add_node("agent", agent)
    builder.add_node("prm", create_prm_graph(judge, rubric={"agent": "Capitals must be right."}))
    builder.add_edge(START, "agent")
    builder.add_edge("agent", "prm")
    builder.add_edge("prm", END)
    result = builder.compile().invoke({"messages": [HumanMessage("Capital of France?")], "steps": []})
    assert result["score"] == 1.0 and result["status"] == "scored"
    assert [m.content for m in result["messages"]] == ["Capital of France?", "Paris."]  # untouched
    assert result["steps"] == ["agent"]
    prompt = judge.prompts()[0]
    assert "[assistant] Paris." in prompt and "[user] Capital of France?" in prompt
    assert "None (the conversation ends with this turn)" in prompt


def test_graph_with_store_records_score_and_judge_calls_from_a_turn_id(mem_store, judge: ScriptedJudge) -> None:
    trace = Trace(mem_store).user("Hi")
    turn_id = trace.llm("Hello! How can I help?")
    trace.user("Tell me a joke")
    trace.llm("Why did the chicken cross the road?")
    trace.commit()
    result = create_prm_graph(judge, store=mem_store, votes=2).invoke({"turn_id": turn_id})
    assert result["turn_id"] == turn_id and result["score"] == 1.0
    [score] = mem_store.scores(turn_id, source="prm")
    assert (score.value, score.status, score.attempts, score.episode_id) == (1.0, "scored", 1, trace.episode_id)
    assert "Tell me a joke" in judge.prompts()[0]


def test_structure_snapshot(judge: ScriptedJudge, mem_store, snapshot) -> None:
    plain = create_prm_graph(judge).get_graph().draw_mermaid(with_styles=False)
    recording = create_prm_graph(judge, store=mem_store).get_graph().draw_mermaid(with_styles=False)
    assert plain == snapshot(name="without_store")
    assert recording == snapshot(name="with_store")


def test_invalid_input_and_options_explain_the_rule(judge: ScriptedJudge) -> None:
    graph = create_prm_graph(judge)
    with pytest.raises(ValueError, match="needs one of: 'evidence'"):
        graph.invoke({})
    with pytest.raises(ValueError, match="built without a store"):
        graph.invoke({"turn_id": "abc"})
    with pytest.raises(ValueError, match="'evidence' must be a mapping"):
        graph.invoke({"evidence": {"context": []}})
    with pytest.raises(ConfigurationError, match="votes must be"):
        create_prm_graph(judge, votes=0)
    with pytest.raises(ConfigurationError, match="vote_timeout"):
        create_prm_graph(judge, vote_timeout=0)
    with pytest.raises(ConfigurationError, match="aggregate must be"):
        create_prm_graph(judge, aggregate="median")
