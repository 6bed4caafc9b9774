"""Capture on real LangGraph agents: what is recorded (in memory, through ``TurnCollector``), and what
``MetaClawCallbackHandler`` makes of it in SQLite and PostgreSQL, field by field."""

from __future__ import annotations

import asyncio

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import ToolException, tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from pydantic import BaseModel

from langchain_metaclaw import MetaClawCallbackHandler, disable_global_capture, enable_global_capture
from langchain_metaclaw.capture import TurnCollector
from tests.fixtures.fakes import ScriptedChatModel, tool_call


@tool
def get_weather(city: str) -> str:
    """Weather in a city."""
    return f"sunny in {city}"


@tool
def get_time(city: str) -> str:
    """Local time in a city."""
    return f"12:00 in {city}"


@tool
def broken(query: str) -> str:
    """Always fails."""
    raise RuntimeError("database is down")


ENGINE_META = {
    "metaclaw": {
        "adapter_version": "v7",
        "prompt_token_ids": [1, 2, 3],
        "completion_token_ids": [9, 8],
        "logprobs": [-0.1, -0.2],
        "tokens_source": "engine",
        "sampling": {"temperature": 1.0},
    }
}


def parallel_script():
    return [
        AIMessage(
            "",
            tool_calls=[
                tool_call("get_weather", {"city": "Paris"}, "c1"),
                tool_call("get_time", {"city": "Paris"}, "c2"),
            ],
            response_metadata=ENGINE_META,
            usage_metadata={"input_tokens": 10, "output_tokens": 5, "total_tokens": 15},
        ),
        AIMessage("It is sunny and noon in Paris."),
    ]


def _config(handler, thread="t1"):
    return {"callbacks": [handler], "configurable": {"thread_id": thread}}


@pytest.fixture
def handler(store):
    h = MetaClawCallbackHandler(store)
    yield h
    h.close()


@pytest.fixture
def collector():
    return TurnCollector()


def test_agent_with_parallel_tool_calls(store, handler):
    agent = create_agent(
        ScriptedChatModel(script=parallel_script()), [get_weather, get_time], checkpointer=InMemorySaver()
    )
    result = agent.invoke({"messages": [HumanMessage("Weather and time in Paris?")]}, config=_config(handler))
    assert result["messages"][-1].content == "It is sunny and noon in Paris."
    assert handler.flush(10)

    (episode,) = store.episodes()
    assert (episode.id, episode.thread_id, episode.status) == ("t1", "t1", "ok")
    assert episode.ended_at >= episode.started_at
    turns = store.turns(episode_id="t1")
    assert [t.kind for t in turns] == ["llm", "tool", "tool", "llm"]
    first, tool_a, tool_b, last = turns
    assert first.node == "model" and first.step == 1 and first.status == "ok"
    assert [m["type"] for m in first.input_messages] == ["human"]
    assert first.input_messages[0]["data"]["content"] == "Weather and time in Paris?"
    assert [tc["name"] for tc in first.output_message["data"]["tool_calls"]] == ["get_weather", "get_time"]
    assert first.usage == {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15}
    assert (first.tokens_source, first.adapter_version) == ("engine", "v7")
    assert (first.prompt_token_ids, first.completion_token_ids, first.logprobs) == (
        [1, 2, 3],
        [9, 8],
        [-0.1, -0.2],
    )
    assert first.sampling == {"temperature": 1.0}
    tools = {t.tool_name: t for t in (tool_a, tool_b)}
    assert (
        tools["get_weather"].tool_args == {"city": "Paris"}
        and tools["get_weather"].tool_result == "sunny in Paris"
    )
    assert tools["get_weather"].tool_call_id == "c1" and tools["get_time"].tool_call_id == "c2"
    assert all(
        t.node == "tools" and t.status == "ok" and t.root_run_id == first.root_run_id
        for t in (tool_a, tool_b)
    )
    assert (last.tokens_source, last.adapter_version, last.prompt_token_ids) == ("retokenized", None, None)
    assert [m["type"] for m in last.input_messages] == ["human", "ai", "tool", "tool"]
    assert last.output_message["data"]["content"] == "It is sunny and noon in Paris."
    assert all(t.latency_ms is not None and t.latency_ms >= 0 for t in turns)
    assert handler.stats.write_errors == 0 and handler.stats.pending == 0


def test_second_invocation_of_a_thread_is_the_same_episode(collector):
    agent = create_agent(
        ScriptedChatModel(script=[AIMessage("hello"), AIMessage("again")]), [], checkpointer=InMemorySaver()
    )
    agent.invoke({"messages": [HumanMessage("hi")]}, config=_config(collector))
    agent.invoke({"messages": [HumanMessage("and now?")]}, config=_config(collector))
    assert list(collector.episodes()) == ["t1"]
    second = collector.turns(episode_id="t1")[-1]
    assert [m["data"]["content"] for m in second["input_messages"]] == ["hi", "hello", "and now?"]
    assert len({t["root_run_id"] for t in collector.turns()}) == 2


def test_failing_tool_and_failing_model(collector):
    model = ScriptedChatModel(
        script=[
            AIMessage("", tool_calls=[tool_call("broken", {"query": "x"}, "c9")]),
            AIMessage("Sorry, the tool failed."),
        ]
    )
    agent = create_agent(model, [broken])
    try:
        agent.invoke({"messages": [HumanMessage("go")]}, config={"callbacks": [collector]})
    except RuntimeError:
        pass  # whether the tool error reaches the caller depends on the ToolNode's error policy
    (tool_turn,) = collector.turns(kind="tool")
    assert tool_turn["status"] == "error" and "database is down" in tool_turn["error"]
    assert tool_turn["tool_name"] == "broken" and tool_turn["tool_args"] == {"query": "x"}

    failing = create_agent(ScriptedChatModel(script=[ValueError("model exploded")]), [])
    with pytest.raises(ValueError, match="model exploded"):
        failing.invoke({"messages": [HumanMessage("go")]}, config={"callbacks": [collector]})
    errored = [t for t in collector.turns(kind="llm") if t["status"] == "error"]
    assert len(errored) == 1 and errored[0]["error"] == "ValueError: model exploded"
    assert errored[0]["input_messages"][0]["data"]["content"] == "go"
    episode = collector.episodes()[errored[0]["episode_id"]]
    assert episode["status"] == "error" and "model exploded" in episode["error"]


def test_retries_are_separate_turns(collector):
    model = ScriptedChatModel(script=[ConnectionError("flaky"), AIMessage("ok")])
    retrying = model.with_retry(stop_after_attempt=2, wait_exponential_jitter=False)
    assert retrying.invoke("hi", config={"callbacks": [collector]}).content == "ok"
    assert [t["status"] for t in collector.turns(kind="llm")] == ["error", "ok"]
    assert len({t["episode_id"] for t in collector.turns()}) == 1


def test_subgraph_turns_carry_namespace(collector):
    inner = create_agent(ScriptedChatModel(script=parallel_script()), [get_weather, get_time])
    outer = StateGraph(MessagesState)
    outer.add_node("research", inner)
    outer.add_edge(START, "research")
    outer.add_edge("research", END)
    graph = outer.compile(checkpointer=InMemorySaver())
    graph.invoke({"messages": [HumanMessage("Paris?")]}, config=_config(collector, "outer-thread"))
    turns = collector.turns(episode_id="outer-thread")
    assert len(turns) == 4
    assert all(t["checkpoint_ns"] and t["checkpoint_ns"].startswith("research:") for t in turns)
    assert {t["node"] for t in turns} == {"model", "tools"}
    assert collector.episodes()["outer-thread"]["graph_name"] == "LangGraph"


def test_stream_and_async_paths(collector):
    agent = create_agent(
        ScriptedChatModel(script=parallel_script()), [get_weather, get_time], checkpointer=InMemorySaver()
    )
    chunks = list(
        agent.stream(
            {"messages": [HumanMessage("stream it")]}, config=_config(collector, "s1"), stream_mode="messages"
        )
    )
    assert chunks

    async def run_async():
        await agent.ainvoke({"messages": [HumanMessage("async")]}, config=_config(collector, "a1"))
        async for _ in agent.astream({"messages": [HumanMessage("astream")]}, config=_config(collector, "a2")):
            pass

    asyncio.run(run_async())
    for thread in ("s1", "a1", "a2"):
        turns = collector.turns(episode_id=thread)
        assert [t["kind"] for t in turns] == ["llm", "tool", "tool", "llm"], thread
        assert turns[0]["output_message"]["data"]["tool_calls"][0]["args"] == {"city": "Paris"}
        assert turns[0]["tokens_source"] == "engine"
        assert collector.episodes()[thread]["status"] == "ok"


class Answer(BaseModel):
    city: str
    sunny: bool


def test_structured_output(collector):
    model = ScriptedChatModel(
        script=[AIMessage("", tool_calls=[tool_call("Answer", {"city": "Paris", "sunny": True}, "s1")])]
    )
    structured = model.with_structured_output(Answer)
    assert structured.invoke("Is Paris sunny?", config={"callbacks": [collector]}) == Answer(
        city="Paris", sunny=True
    )
    (turn,) = collector.turns(kind="llm")
    assert turn["output_message"]["data"]["tool_calls"][0]["args"] == {"city": "Paris", "sunny": True}
    assert collector.episodes()[turn["episode_id"]]["status"] == "ok"


def test_handler_attached_to_the_model_only(collector):
    model = ScriptedChatModel(script=[AIMessage("attached")], callbacks=[collector])
    agent = create_agent(model, [], checkpointer=InMemorySaver())
    agent.invoke({"messages": [HumanMessage("hi")]}, config={"configurable": {"thread_id": "m1"}})
    (turn,) = collector.turns()
    assert turn["episode_id"] == "m1" and turn["node"] == "model"
    assert collector.episodes()["m1"]["status"] == "ok"


def test_global_capture_one_liner(store):
    handler = enable_global_capture(store)
    try:
        ScriptedChatModel(script=[AIMessage("global")]).invoke("hi")
    finally:
        disable_global_capture()
    assert handler.stats.written == 2  # the episode (started and ended with the call), the turn
    (turn,) = store.turns()
    assert turn.output_message["data"]["content"] == "global"
    ScriptedChatModel(script=[AIMessage("not captured")]).invoke("hi")
    assert len(store.turns()) == 1


def test_coexists_with_langsmith_tracer(collector):
    from langchain_core.tracers.langchain import LangChainTracer
    from langsmith import Client

    tracer = LangChainTracer(client=Client(api_url="http://127.0.0.1:9", api_key="lsv2-test-unreachable"))
    agent = create_agent(ScriptedChatModel(script=parallel_script()), [get_weather, get_time])
    agent.invoke({"messages": [HumanMessage("both")]}, config={"callbacks": [collector, tracer]})
    assert len(collector.turns()) == 4
    assert tracer.latest_run is not None and tracer.latest_run.name == "LangGraph"


def test_secrets_are_redacted_everywhere(store, tmp_path):
    def drop_emails(record):
        if record.get("type") == "turn" and record.get("input_messages"):
            for m in record["input_messages"]:
                m["data"]["content"] = m["data"]["content"].replace("alice@example.com", "[EMAIL]")
        return record

    handler = MetaClawCallbackHandler(store, redact=drop_emails)
    secret = "sk-proj-" + "A1b2C3d4" * 5
    model = ScriptedChatModel(
        script=[AIMessage(f"Use Authorization: Bearer {secret} and api_key=hunter2hunter2")]
    )
    model.invoke(f"my key is {secret}, mail alice@example.com", config={"callbacks": [handler]})
    handler.close()
    (turn,) = store.turns()
    stored = str(turn.model_dump())
    assert secret not in stored and "hunter2hunter2" not in stored and "alice@example.com" not in stored
    assert turn.input_messages[0]["data"]["content"] == "my key is [REDACTED], mail [EMAIL]"
    assert "api_key=[REDACTED]" in turn.output_message["data"]["content"]


def test_secrets_never_reach_the_spool_or_the_store_from_any_field(store, monkeypatch):
    """Redaction covers every free-text field (tool args and results, errors, metadata, thread ids, the
    history resent on the next call), and runs before the spool write: no secret ever touches disk."""
    from langchain_metaclaw.store.spool import Spool

    key = "sk-" + "Zx9Yw8Vu7" * 4
    jwt = "eyJ" + "a" * 12 + ".eyJ" + "b" * 12 + "." + "c" * 12
    spooled: list[bytes] = []
    append = Spool.append
    monkeypatch.setattr(Spool, "append", lambda self, line: (spooled.append(line), append(self, line))[1])

    @tool
    def login(token: str) -> str:
        """Log in."""
        return f"logged in with {token}, session {jwt}"

    @tool
    def leak(query: str) -> str:
        """Fails loudly."""
        raise ToolException(f"connection refused with password={key}")

    leak.handle_tool_error = True

    script = [
        AIMessage("", tool_calls=[tool_call("login", {"token": key}, "c1"), tool_call("leak", {"query": key}, "c2")]),
        AIMessage(f"done, your key {key} works"),
    ]
    agent = create_agent(ScriptedChatModel(script=script), [login, leak], checkpointer=InMemorySaver())
    handler = MetaClawCallbackHandler(store)
    config = {"callbacks": [handler], "configurable": {"thread_id": f"session-{jwt}"},
              "metadata": {"api_key": key, "user": "alice"}}
    agent.invoke({"messages": [HumanMessage(f"log me in with {key}")]}, config=config)
    handler.close()

    assert spooled and not any(key.encode() in line or jwt.encode() in line for line in spooled)
    stored = repr([t.model_dump() for t in store.turns()]) + repr([e.model_dump() for e in store.episodes()])
    assert key not in stored and jwt not in stored
    tools = {t.tool_name: t for t in store.turns(kind="tool")}
    assert tools["login"].tool_args == {"token": "[REDACTED]"}
    assert tools["login"].tool_result == "logged in with [REDACTED], session [REDACTED]"
    assert "password=[REDACTED]" in tools["leak"].error
    second = store.turns(kind="llm")[1]  # the history resent on the second call is redacted too
    assert [m["data"]["content"] for m in second.input_messages][:1] == ["log me in with [REDACTED]"]
    assert second.metadata["api_key"] == "[REDACTED]" and second.metadata["user"] == "alice"
    assert store.episodes()[0].thread_id == "session-[REDACTED]"


def test_history_is_captured_as_it_was_at_each_call(store, handler):
    """The writer remembers the text of each input message for as long as the object lives (an agent
    resends its history as the same objects). A field set anew between two calls, a new object at a freed
    object's address, and list content must all still be captured as the model saw them."""
    import copy
    import gc

    import orjson

    from langchain_metaclaw.capture._core import message_to_record

    model = ScriptedChatModel(script=[AIMessage(f"answer {i}") for i in range(12)])
    history = [HumanMessage("what is the weather?"),
               AIMessage("", tool_calls=[tool_call("get_weather", {"city": "Paris"}, "c1")])]
    seen = []

    def call(messages):
        seen.append(copy.deepcopy(messages))
        model.invoke(messages, config={"callbacks": [handler]})

    call(history)
    call(history)
    history[0].content = "what is the weather in Lyon?"
    history[1].tool_calls = [tool_call("get_weather", {"city": "Lyon"}, "c2")]
    call(history)
    history.append(HumanMessage(content=[{"type": "text", "text": "and a picture"}]))
    call(history)
    history[2].content.append({"type": "text", "text": "in colour"})  # list content changed in place
    call(history)
    for i in range(7):  # short-lived messages: CPython reuses a freed object's address
        call([HumanMessage(f"question {i}")])
        gc.collect()
    assert handler.flush(10)

    turns = store.turns(kind="llm")  # in call order (started_at, then seq)
    assert len(turns) == len(seen) == 12
    for turn, messages in zip(turns, seen, strict=True):
        assert turn.input_messages == orjson.loads(orjson.dumps([message_to_record(m) for m in messages]))
    assert turns[2].input_messages[0]["data"]["content"] == "what is the weather in Lyon?"
    assert turns[2].input_messages[1]["data"]["tool_calls"][0]["args"] == {"city": "Lyon"}
    assert len(turns[4].input_messages[2]["data"]["content"]) == 2


def test_a_broken_redact_hook_never_breaks_the_agent(store):
    def explode(record):
        raise KeyError("oops")

    handler = MetaClawCallbackHandler(store, redact=explode)
    assert (
        ScriptedChatModel(script=[AIMessage("fine")]).invoke("hi", config={"callbacks": [handler]}).content
        == "fine"
    )
    handler.close()
    assert handler.stats.serialize_errors == 2 and store.turns() == []  # the episode, the turn


def test_sqlite_reads_capture_batches_into_the_same_rows(tmp_path, monkeypatch):
    """The capture writer hands SQLite the batch's JSON text (no Python per record); the rows must be the
    ones the SQLAlchemy path writes from the same records, times to the microsecond included."""
    import orjson
    from sqlalchemy import text

    from langchain_metaclaw.store import TraceStore, sqlite_json
    from langchain_metaclaw.store.spool import Spool

    assert sqlite_json.AVAILABLE
    spooled: list[bytes] = []
    append = Spool.append
    monkeypatch.setattr(Spool, "append", lambda self, line: (spooled.append(line), append(self, line))[1])
    by_json = TraceStore(f"sqlite:///{tmp_path}/json.db")
    with MetaClawCallbackHandler(by_json) as handler:
        agent = create_agent(ScriptedChatModel(script=parallel_script()), [get_weather, get_time, broken],
                             checkpointer=InMemorySaver())
        agent.invoke({"messages": [HumanMessage("both, in Zürich")]}, config=_config(handler))
        agent.invoke({"messages": [HumanMessage("again")]}, config=_config(handler))  # same episode
        failing = [AIMessage("", tool_calls=[tool_call("broken", {"query": "x"}, "b1")]), AIMessage("sorry")]
        with pytest.raises(RuntimeError, match="database is down"):  # a failed tool, then a failed episode
            create_agent(ScriptedChatModel(script=failing), [broken]).invoke(
                {"messages": [HumanMessage("break")]}, config=_config(handler, "t2"))
        ScriptedChatModel(script=[AIMessage("bare")]).invoke("a call outside any graph", config={
            "callbacks": [handler], "metadata": {"user": "alice", "n": 3}})
        twice = ScriptedChatModel(script=[AIMessage("first"), ValueError("second fails")])
        in_t3 = {"callbacks": [handler], "metadata": {"thread_id": "t3"}}
        twice.invoke("one", config=in_t3)  # an episode that starts and ends in one event,
        with pytest.raises(ValueError):  # then again in the same batch: the last end wins
            twice.invoke("two", config=in_t3)
    by_python = TraceStore(f"sqlite:///{tmp_path}/python.db")
    by_python.write_records([record for line in spooled for record in orjson.loads(line)])

    def rows(store):
        with store.engine.connect() as conn:  # the stored text itself, not just what reads make of it
            return [conn.execute(text(f"SELECT * FROM {t} ORDER BY id")).all() for t in ("episodes", "turns")]

    assert len(by_json.turns()) == 13 and len(by_json.episodes()) == 4
    assert rows(by_json) == rows(by_python)
    assert [t.model_dump() for t in by_json.turns()] == [t.model_dump() for t in by_python.turns()]
    bare = by_json.turns(kind="llm")[-3].episode_id
    assert {e.id: e.status for e in by_json.episodes()} == {"t1": "ok", "t2": "error", bare: "ok", "t3": "error"}
