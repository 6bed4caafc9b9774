"""The built-in tool-call task: its graded reward and scoring captured turns (plain text and parsed calls)."""

from __future__ import annotations

import json
import time

from langchain_core.messages import HumanMessage, SystemMessage, messages_to_dict

from langchain_metaclaw.store import TraceStore
from langchain_metaclaw.tasks import ToolCallFormatTask, score_tool_call


def test_graded_reward():
    assert score_tool_call('{"name": "get_time", "arguments": {"city": "Oslo"}}', "get_time", "city", "Oslo") == 1.0
    assert score_tool_call('{"name": "get_time", "arguments": {"city": "Oslo"}} ok', "get_time", "city", "Oslo") == 0.75
    assert score_tool_call('{"name": "get_weather", "arguments": {"city": "Lima"}}', "get_time", "city", "Oslo") == 0.5
    # the request's example, copied: a JSON call and nothing else, whatever follows it
    for copy in ('{"name": "get_time", "arguments": {"city": "Berlin"}}', '{"name": "get_time", "arguments": {"city": "Berlin"}} ok'):
        assert score_tool_call(copy, "get_time", "city", "Oslo") == 0.25
    assert score_tool_call("<tool_call>{\"name\": \"x\", \"arguments\": {}}</tool_call>", "get_time", "city", "Oslo") == 0.5
    assert score_tool_call("It is noon in Oslo.", "get_time", "city", "Oslo") == 0.0


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
