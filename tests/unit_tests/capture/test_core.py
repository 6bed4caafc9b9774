"""The capture core and its one persist hook: what each callback event hands to ``_persist``, the core on
its own (no handler, no I/O), and ``TurnCollector`` recording what ``MetaClawCallbackHandler`` stores."""

from __future__ import annotations

from uuid import uuid4

import orjson
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver

from langchain_metaclaw import MetaClawCallbackHandler
from langchain_metaclaw.capture import TurnCollector
from langchain_metaclaw.capture._core import CaptureCore
from langchain_metaclaw.capture.base import BaseCaptureHandler
from tests.fixtures.fakes import ScriptedChatModel, tool_call


@tool
def get_weather(city: str) -> str:
    """Weather in a city."""
    return f"sunny in {city}"


class _Events(BaseCaptureHandler):
    """Records what each callback event persists, one list per call of the hook."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[list[tuple[str, str | None]]] = []

    def _persist(self, records):
        self.events.append([(r["type"], r.get("status")) for r in records])


def test_each_event_is_one_persist_and_an_episode_start_rides_along():
    events = _Events()
    ScriptedChatModel(script=[AIMessage("bare")]).invoke("outside any graph", config={"callbacks": [events]})
    # an episode that starts and ends in one event: a single start record carrying the end, then the turn
    assert events.events == [[("episode_start", "ok"), ("turn", "ok")]]

    events.events.clear()
    script = [AIMessage("", tool_calls=[tool_call("get_weather", {"city": "Paris"}, "c1")]), AIMessage("sunny")]
    agent = create_agent(ScriptedChatModel(script=script), [get_weather], checkpointer=InMemorySaver())
    agent.invoke({"messages": [HumanMessage("weather?")]},
                 config={"callbacks": [events], "configurable": {"thread_id": "t1"}})
    assert events.events == [
        [("episode_start", None), ("turn", "ok")],  # the start waits for the episode's first finished turn
        [("turn", "ok")],
        [("turn", "ok")],
        [("episode_end", "ok")],  # the root chain's end
    ]


def test_a_failing_persist_hook_never_reaches_the_agent():
    class Broken(BaseCaptureHandler):
        def _persist(self, records):
            raise OSError("sink is gone")

    broken = Broken()
    model = ScriptedChatModel(script=[AIMessage("fine"), AIMessage("still fine")])
    assert model.invoke("hi", config={"callbacks": [broken]}).content == "fine"
    assert model.invoke("again", config={"callbacks": [broken]}).content == "still fine"
    assert broken._hook_errors == 2


def test_the_core_alone_turns_events_into_records():
    core = CaptureCore()
    run_id, unknown = uuid4(), uuid4()
    core._start_llm_run(run_id, None, "fake", {"thread_id": "t9", "user": "alice", "langgraph_node": "model"},
                        ["tag"], [HumanMessage("hi")], {"model": "m-1", "temperature": 0.5, "client": object()})
    response = LLMResult(generations=[[ChatGeneration(message=AIMessage("hello"))]])
    assert core._end_llm_run(unknown, response) is None  # a run this core never saw start
    start, turn = core._end_llm_run(run_id, response)
    assert (start["type"], start["id"], start["thread_id"], start["status"]) == ("episode_start", "t9", "t9", "ok")
    assert start["metadata"] == {"user": "alice"}
    assert (turn["type"], turn["id"], turn["episode_id"], turn["node"]) == ("turn", str(run_id), "t9", "model")
    assert turn["invocation_params"] == {"model": "m-1", "temperature": 0.5}  # JSON-ready values only
    assert turn["model_name"] == "m-1" and turn["tags"] == ["tag"]
    assert turn["input_messages"][0].content == "hi"  # message objects: the writer encodes each once
    assert turn["output_message"] == {"type": "ai", "data": {"content": "hello"}}
    assert core._runs == {} and core._unwritten_starts == {}


def test_collector_records_what_the_handler_stores(store):
    script = [
        AIMessage("", tool_calls=[tool_call("get_weather", {"city": "Paris"}, "c1")],
                  usage_metadata={"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}),
        AIMessage("sunny in Paris"),
    ]
    agent = create_agent(ScriptedChatModel(script=script), [get_weather], checkpointer=InMemorySaver())
    collector = TurnCollector()
    with MetaClawCallbackHandler(store) as handler:
        agent.invoke({"messages": [HumanMessage("weather in Paris?")]},
                     config={"callbacks": [handler, collector], "configurable": {"thread_id": "t1"},
                             "metadata": {"user": "alice"}})
    stored = [t.model_dump(exclude={"started_at", "ended_at", "created_at", "latency_ms", "seq"})
              for t in store.turns()]
    collected = [{k: turn.get(k) for k in stored[0]} for turn in collector.turns()]
    assert len(stored) == 3
    assert orjson.loads(orjson.dumps(collected)) == stored  # the store keeps JSON; so does this comparison
    (episode,) = store.episodes()
    fields = {"id", "thread_id", "root_run_id", "graph_name", "status", "error", "metadata"}
    collected_episode = {k: v for k, v in collector.episodes()["t1"].items() if k in fields}
    assert collected_episode == episode.model_dump(include=fields)
    assert episode.status == "ok" and episode.metadata["user"] == "alice"


def test_a_failure_ends_the_run_of_its_own_kind():
    from langgraph.errors import GraphInterrupt

    core = CaptureCore()
    chain, tool_run = uuid4(), uuid4()
    core._start_chain_run(chain, None, {"thread_id": "t2"}, None, {"id": ["langgraph", "Pregel"]})
    core._start_tool_run(tool_run, chain, "lookup", None, None, {"q": "x"}, "c1")
    start, turn = core._error_run(tool_run, RuntimeError("no route"))  # the episode's first finished record
    assert (start["type"], start["graph_name"], "status" in start) == ("episode_start", "Pregel", False)
    assert (turn["kind"], turn["status"], turn["error"]) == ("tool", "error", "RuntimeError: no route")
    assert (turn["tool_args"], turn["tool_call_id"], turn["tool_result"]) == ({"q": "x"}, "c1", None)
    (end,) = core._error_run(chain, GraphInterrupt())  # human-in-the-loop: interrupted, not failed
    assert (end["type"], end["id"], end["status"]) == ("episode_end", "t2", "interrupted")
