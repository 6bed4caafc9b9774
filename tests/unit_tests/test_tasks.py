"""The built-in tool-call task: its graded reward and scoring captured turns (plain text and parsed calls)."""

from __future__ import annotations

import json
import time

from langchain_core.messages import HumanMessage, SystemMessage, messages_to_dict

from langchain_metaclaw.store import TraceStore
from langchain_metaclaw.tasks import ToolCallFormatTask, score_tool_call


def test_graded_reward():
    def score(text):
        return score_tool_call(text, "get_time", "city", "Oslo")

    assert score('{"name": "get_time", "arguments": {"city": "Oslo"}}') == 1.0
    assert score('{"name": "get_time", "arguments": {"city": "Oslo"}} ok') == 0.75
    assert score('```json\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n```') == 0.75
    # the request's example copied: the right tool here, so it is paid for the tool, not for the city
    assert score('{"name": "get_time", "arguments": {"city": "Berlin"}}') == 0.75
    # a call that answers nothing of the request is a call, and no more, however cleanly it ends
    assert score('{"name": "get_weather", "arguments": {"city": "Lima"}}') == 0.25
    assert score('{"name": "get_stock", "arguments": {"city": "Berl"}} ok') == 0.25
    assert score("<tool_call>{\"name\": \"x\", \"arguments\": {}}</tool_call>") == 0.25
    assert score("It is noon in Oslo.") == 0.0


def test_score_turns_scores_text_and_parsed_tool_calls():
    task = ToolCallFormatTask()
    prompt = task.train[0]
    messages = messages_to_dict([SystemMessage(prompt.messages[0]["content"]), HumanMessage(prompt.messages[1]["content"])])
    exact = {"name": prompt.tool, "arguments": {prompt.argument: prompt.value}}
    store = TraceStore("sqlite://")
    t = time.time()
    base = {"type": "turn", "episode_id": "e", "kind": "llm", "started_at": t, "status": "ok", "input_messages": messages}
    store.write_records([
        {"type": "episode_start", "id": "e", "started_at": t},
        {**base, "id": "text", "seq": 1, "output_message": {"type": "ai", "data": {"content": json.dumps(exact)}}},
        {**base, "id": "call", "seq": 2, "output_message": {"type": "ai", "data": {
            "content": "", "tool_calls": [{"name": prompt.tool, "args": {prompt.argument: "nowhere"}, "id": "c"}]}}},
        {**base, "id": "other", "seq": 3, "input_messages": messages_to_dict([HumanMessage("hello")]),
         "output_message": {"type": "ai", "data": {"content": "hi"}}},
    ])
    assert task.score_turns(store) == 2  # the unrelated prompt is not applicable: no score, not 0
    assert {s.turn_id: s.value for s in store.scores(source="rule:tool_call_format")} == {"text": 1.0, "call": 0.75}


def test_after_the_tool_answered_a_text_reply_is_paid_and_another_call_is_not():
    task = ToolCallFormatTask()
    prompt = task.train[0]
    call = {"name": prompt.tool, "arguments": {prompt.argument: prompt.value}}
    after_tool = [*prompt.messages,
                  {"role": "assistant", "content": f"<tool_call>{json.dumps(call)}</tool_call>"},
                  {"role": "tool", "content": "It is sunny.", "tool_call_id": "c"}]
    assert task.reward(prompt.messages, json.dumps(call)) == 1.0
    assert task.reward(after_tool, json.dumps(call)) == 0.0  # the same call again would loop the agent
    assert task.reward(after_tool, f"<tool_call>{json.dumps(call)}</tool_call>") == 0.0
    assert task.reward(after_tool, "<tool_call>{not json") == 0.0
    assert task.reward(after_tool, "   ") == 0.0
    assert task.reward(after_tool, "It is sunny there.") == 1.0
    # a new request after the tool answered an earlier one is a first turn again
    assert task.reward([*after_tool, *prompt.messages[1:]], json.dumps(call)) == 1.0


def test_score_turns_scores_the_turn_after_the_tool_result():
    from langchain_core.messages import AIMessage, ToolMessage

    task = ToolCallFormatTask()
    prompt = task.train[0]
    args = {prompt.argument: prompt.value}
    messages = messages_to_dict([
        SystemMessage(prompt.messages[0]["content"]), HumanMessage(prompt.messages[1]["content"]),
        AIMessage("", tool_calls=[{"name": prompt.tool, "args": args, "id": "c"}]),
        ToolMessage("It is sunny.", tool_call_id="c"),
    ])
    store = TraceStore("sqlite://")
    t = time.time()
    base = {"type": "turn", "episode_id": "e", "kind": "llm", "started_at": t, "status": "ok", "input_messages": messages}
    store.write_records([
        {"type": "episode_start", "id": "e", "started_at": t},
        {**base, "id": "again", "seq": 1, "output_message": {"type": "ai", "data": {
            "content": "", "tool_calls": [{"name": prompt.tool, "args": args, "id": "d"}]}}},
        {**base, "id": "broken", "seq": 2, "output_message": {"type": "ai", "data": {
            "content": "Here it is", "invalid_tool_calls": [{"name": None, "args": "{oops", "id": "e",
                                                             "error": "invalid JSON"}]}}},
        {**base, "id": "answer", "seq": 3, "output_message": {"type": "ai", "data": {"content": "It is sunny."}}},
    ])
    assert task.score_turns(store) == 3
    assert {s.turn_id: s.value for s in store.scores(source="rule:tool_call_format")} == {
        "again": 0.0, "broken": 0.0, "answer": 1.0}
