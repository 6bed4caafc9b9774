"""MetaClawChatModel on the local backend (the real embedded SmolLM2): what a caller and the trainer rely on.

- ``response_metadata["metaclaw"]`` carries the engine's own token ids and behaviour logprobs, equal to a
  teacher-forced recompute (``LocalEngine.logprobs_of``) on the same engine, greedy, sampled, constrained and
  under an adapter; capture stores them with ``tokens_source="engine"`` and the adapter version;
- tools (forced, any, auto, none), structured output, stop strings, ``max_tokens``, ``timeout``, usage;
- streaming (sync and async) agrees with ``invoke``.

Generations are greedy and at most 16 new tokens except forced calls (a floor of ``constrained_min_tokens``; the
grammar ends them as soon as the JSON closes, ~20 tokens here).
"""

from __future__ import annotations

import math
import time

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from langchain_metaclaw.adapters import AdapterRegistry
from langchain_metaclaw.capture.handler import MetaClawCallbackHandler
from langchain_metaclaw.chat_model.base import MetaClawChatModel
from langchain_metaclaw.errors import ConfigurationError
from langchain_metaclaw.messages import convert_messages
from langchain_metaclaw.store.trace_store import TraceStore
from tests.fixtures.chat import ADAPTER_PROMPT, serving_engine  # noqa: F401 (fixture)

pytestmark = pytest.mark.model

FRANCE = "What is the capital of France?"
ATOL = 1e-4


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"sunny in {city}"


@tool
def get_time(city: str) -> str:
    """Get the local time in a city."""
    return f"12:00 in {city}"


class Capital(BaseModel):
    """The capital city of a country."""

    city: str = Field(description="name of the city")


@pytest.fixture(scope="module")
def engine(serving_engine):  # noqa: F811
    return serving_engine


@pytest.fixture
def llm(engine) -> MetaClawChatModel:
    return MetaClawChatModel(temperature=0, max_tokens=12)


@pytest.fixture
def adapted(engine, two_adapters):
    """A chat model following an in-memory store whose serving adapter is ``v1`` (the first test adapter)."""
    store = TraceStore("sqlite://")
    AdapterRegistry(store).register(two_adapters[0])
    model = MetaClawChatModel(store=store, temperature=0, max_tokens=12)
    model.promote("v1")
    yield model
    model.close()


def _meta(message: AIMessage) -> dict:
    return message.response_metadata["metaclaw"]


def _assert_close(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b) > 0
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < ATOL, (a, b)


def _recompute(engine, message: AIMessage, adapter: str | None = None) -> list[float]:
    meta = _meta(message)
    sampling = meta["sampling"]
    return engine.logprobs_of(
        meta["prompt_token_ids"], meta["completion_token_ids"], adapter=adapter,
        temperature=sampling["temperature"], top_p=sampling["top_p"], top_k=sampling["top_k"],
        json_schema=sampling.get("json_schema"),
    )


# ---------------------------------------------------------------------------------------------- engine tokens


def test_invoke_reports_engine_tokens_whose_logprobs_equal_a_recompute(llm, engine) -> None:
    message = llm.invoke(FRANCE)
    assert "Paris" in message.content
    meta = _meta(message)
    assert meta["tokens_source"] == "engine"
    assert meta["adapter_version"] is None
    assert meta["prompt_token_ids"] == engine.encode_prompt(convert_messages([HumanMessage(FRANCE)]))
    assert meta["completion_token_ids"][-1] in engine.eos_token_ids
    assert meta["sampling"]["greedy"] is True and meta["sampling"]["constrained"] is False
    _assert_close(meta["logprobs"], _recompute(engine, message))
    assert message.response_metadata | {"metaclaw": None} == {
        "model_name": engine.base_model_name, "model_provider": "metaclaw", "finish_reason": "stop",
        "backend": "local", "adapter_version": None, "metaclaw": None,
    }
    assert message.usage_metadata == {
        "input_tokens": len(meta["prompt_token_ids"]),
        "output_tokens": len(meta["completion_token_ids"]),
        "total_tokens": len(meta["prompt_token_ids"]) + len(meta["completion_token_ids"]),
    }


def test_sampled_logprobs_equal_a_recompute_and_a_seed_reproduces(llm, engine) -> None:
    first = llm.invoke(FRANCE, temperature=1.0, seed=11, max_tokens=8)
    again = llm.invoke(FRANCE, temperature=1.0, seed=11, max_tokens=8)
    assert _meta(first)["completion_token_ids"] == _meta(again)["completion_token_ids"]
    assert _meta(first)["sampling"]["temperature"] == 1.0 and _meta(first)["sampling"]["seed"] == 11
    _assert_close(_meta(first)["logprobs"], _recompute(engine, first))


def test_adapter_answer_reports_its_version_and_recomputes_under_it(adapted, llm, engine) -> None:
    message = adapted.invoke(ADAPTER_PROMPT)
    assert message.response_metadata["adapter_version"] == _meta(message)["adapter_version"] == "v1"
    name = adapted._watch.serving[1]
    _assert_close(_meta(message)["logprobs"], _recompute(engine, message, adapter=name))
    base = llm.invoke(ADAPTER_PROMPT)
    assert _meta(base)["completion_token_ids"] != _meta(message)["completion_token_ids"]  # the adapter matters


def test_capture_stores_engine_tokens_and_the_adapter_version(adapted) -> None:
    handler = MetaClawCallbackHandler(adapted.store)
    try:
        message = adapted.invoke(ADAPTER_PROMPT, config={"callbacks": [handler]})
        assert handler.flush()
    finally:
        handler.close()
    turns = adapted.store.turns(kind="llm")
    assert len(turns) == 1
    turn = turns[0]
    meta = _meta(message)
    assert turn.tokens_source == "engine"
    assert turn.adapter_version == "v1"
    assert turn.prompt_token_ids == meta["prompt_token_ids"]
    assert turn.completion_token_ids == meta["completion_token_ids"]
    _assert_close(turn.logprobs, meta["logprobs"])
    assert turn.sampling["greedy"] is True
    assert turn.usage == message.usage_metadata


# ---------------------------------------------------------------------------------------------- tools


def test_forced_tool_call_by_name_is_constrained_and_recomputes(llm, engine) -> None:
    message = llm.bind_tools([get_weather, get_time], tool_choice="get_weather").invoke(
        "What is the weather in Paris?", max_tokens=4)  # the floor lifts 4 to constrained_min_tokens
    assert message.content == "" and message.invalid_tool_calls == []
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert message.tool_calls[0]["id"].startswith("call_")
    assert message.response_metadata["finish_reason"] == "tool_calls"
    sampling = _meta(message)["sampling"]
    assert sampling["constrained"] is True and sampling["max_new_tokens"] == llm.constrained_min_tokens
    assert sampling["json_schema"]["properties"]["name"] == {"const": "get_weather"}
    _assert_close(_meta(message)["logprobs"], _recompute(engine, message))


def test_forced_tool_call_to_any_bound_tool(llm) -> None:
    message = llm.bind_tools([get_weather, get_time], tool_choice="any").invoke("What time is it in Tokyo?")
    assert len(message.tool_calls) == 1
    assert message.tool_calls[0]["name"] in {"get_weather", "get_time"}
    assert set(message.tool_calls[0]["args"]) == {"city"}
    assert "anyOf" in _meta(message)["sampling"]["json_schema"]


@pytest.mark.parametrize(
    ("choice", "bound"),
    [("required", "required"), ({"type": "function", "function": {"name": "get_time"}}, "get_time"),
     ({"name": "get_time"}, "get_time"), ("auto", None), (None, None)],
)
def test_tool_choice_forms(llm, choice, bound) -> None:
    binding = llm.bind_tools([get_weather, get_time], tool_choice=choice)
    assert binding.kwargs["tool_choice"] == bound
    assert [t["function"]["name"] for t in binding.kwargs["tools"]] == ["get_weather", "get_time"]


def test_auto_and_none_tool_choice(llm, engine) -> None:
    auto = llm.bind_tools([get_weather]).invoke("Hi!", max_tokens=6)
    prompt = engine._decode(_meta(auto)["prompt_token_ids"])
    assert "You can call these tools" in prompt and "get_weather" in prompt
    assert _meta(auto)["sampling"]["constrained"] is False
    none = llm.bind_tools([get_weather], tool_choice="none").invoke("Hi!", max_tokens=6)
    assert "get_weather" not in engine._decode(_meta(none)["prompt_token_ids"])
    assert none.tool_calls == []


def test_binding_an_unknown_tool_choice_fails_at_bind_time(llm) -> None:
    with pytest.raises(ValueError, match="tool_choice 'launch' names no bound tool"):
        llm.bind_tools([get_weather], tool_choice="launch")


def test_a_truncated_forced_call_is_an_invalid_tool_call(engine) -> None:
    tight = MetaClawChatModel(temperature=0, max_tokens=5, constrained_min_tokens=0)
    message = tight.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Paris?")
    assert message.tool_calls == []
    assert len(message.invalid_tool_calls) == 1 and "invalid JSON" in message.invalid_tool_calls[0]["error"]
    assert _meta(message)["sampling"]["max_new_tokens"] == 5
    assert message.response_metadata["finish_reason"] == "length"


def test_tool_results_go_back_to_the_model(llm, engine) -> None:
    call = {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1", "type": "tool_call"}
    history = [HumanMessage("Weather in Paris?"), AIMessage("", tool_calls=[call]), get_weather.invoke(call)]
    answer = llm.bind_tools([get_weather]).invoke(history, max_tokens=4)
    assert isinstance(answer, AIMessage)
    prompt = engine._decode(_meta(answer)["prompt_token_ids"])
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in prompt
    assert "sunny in Paris" in prompt


def test_structured_output(llm) -> None:
    out = llm.with_structured_output(Capital, include_raw=True).invoke(FRANCE)
    assert out["parsing_error"] is None
    assert out["parsed"] == Capital(city="Paris")
    assert _meta(out["raw"])["sampling"]["constrained"] is True


# ---------------------------------------------------------------------------------------------- parameters


def test_stop_trims_the_text_and_keeps_the_ids(llm) -> None:
    full = llm.invoke(FRANCE)
    stopped = llm.invoke(FRANCE, stop=["Paris"])
    assert "Paris" in full.content
    assert stopped.content == full.content[: full.content.index("Paris")]
    assert stopped.response_metadata["finish_reason"] == "stop"
    ids = _meta(stopped)["completion_token_ids"]
    assert _meta(full)["completion_token_ids"][: len(ids)] == ids  # the tokens that completed "Paris" stay
    configured = MetaClawChatModel(temperature=0, max_tokens=12, stop=["Paris"])
    assert configured.invoke(FRANCE).content == stopped.content


def test_max_tokens_at_init_and_per_call(engine) -> None:
    short = MetaClawChatModel(temperature=0, max_tokens=3)
    message = short.invoke(FRANCE)
    assert len(_meta(message)["completion_token_ids"]) == 3
    assert message.response_metadata["finish_reason"] == "length"
    assert message.usage_metadata["output_tokens"] == 3
    assert short.invoke(FRANCE, max_tokens=2).usage_metadata["output_tokens"] == 2
    assert short.bind(max_tokens=1).invoke(FRANCE).usage_metadata["output_tokens"] == 1


def test_timeout_raises_and_stops_decoding(adapted) -> None:
    slow = MetaClawChatModel(store=adapted.store, temperature=0, max_tokens=200, timeout=0.05)
    slow.refresh()  # serving v1 (already in the engine: no load inside the timed call)
    assert slow.serving_version == "v1"
    held = slow._watch.follower.holders(slow._watch.serving[1])  # the two models' own holds, no request
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="no answer within timeout=0.05s"):
        slow.invoke(FRANCE)
    assert time.monotonic() - started < 2.0
    name = slow._watch.serving[1]
    deadline = time.monotonic() + 3.0  # decoding stops at the next token: the pin is released soon after
    while slow._watch.follower.holders(name) > held and time.monotonic() < deadline:
        time.sleep(0.02)
    assert slow._watch.follower.holders(name) == held
    with pytest.raises(TimeoutError):
        list(slow.stream(FRANCE))
    slow.close()


def test_invalid_settings_are_configuration_errors() -> None:
    # pydantic wraps the ConfigurationError (a ValueError) raised by the validator, message intact
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        MetaClawChatModel(temperature=-1)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        MetaClawChatModel(max_tokens=0)
    with pytest.raises(ValueError, match="constrained_min_tokens must be >= 0"):
        MetaClawChatModel(constrained_min_tokens=-1)
    with pytest.raises(ValueError, match="needs base_url"):
        MetaClawChatModel(backend="openai")
    with pytest.raises(ValueError, match="adapter= needs store="):
        MetaClawChatModel(adapter="v1")
    with pytest.raises(ConfigurationError, match="promote\\(\\) needs store="):
        MetaClawChatModel().promote("v1")


def test_identity() -> None:
    llm = MetaClawChatModel(temperature=0.2, max_tokens=7, stop=["x"])
    assert llm._llm_type == "metaclaw-chat"
    params = llm._get_ls_params()
    assert params == {"ls_provider": "metaclaw", "ls_model_name": "SmolLM2-135M-Instruct", "ls_model_type": "chat",
                      "ls_temperature": 0.2, "ls_max_tokens": 7, "ls_stop": ["x"]}
    assert llm._get_ls_params(model="other")["ls_model_name"] == "other"
    assert MetaClawChatModel(model="my-model").model_name == "my-model"


# ---------------------------------------------------------------------------------------------- streaming


def _check_stream(chunks: list[AIMessageChunk], invoked: AIMessage) -> None:
    assert len(chunks) > 1
    assert all(c.response_metadata.get("model_provider") == "metaclaw" for c in chunks)
    assert [c.chunk_position for c in chunks][-1] == "last"
    assert [bool(c.response_metadata.get("finish_reason")) for c in chunks] == [False] * (len(chunks) - 1) + [True]
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert full.content == invoked.content
    assert full.usage_metadata == invoked.usage_metadata
    assert _meta(full)["completion_token_ids"] == _meta(invoked)["completion_token_ids"]
    _assert_close(_meta(full)["logprobs"], _meta(invoked)["logprobs"])


def test_stream_agrees_with_invoke(llm) -> None:
    _check_stream(list(llm.stream(FRANCE)), llm.invoke(FRANCE))


async def test_astream_and_ainvoke_agree_with_invoke(adapted) -> None:
    invoked = await adapted.ainvoke(ADAPTER_PROMPT)
    assert invoked.response_metadata["adapter_version"] == "v1"
    chunks = [c async for c in adapted.astream(ADAPTER_PROMPT)]
    _check_stream(chunks, invoked)


def test_streamed_forced_tool_call(llm) -> None:
    bound = llm.bind_tools([get_weather], tool_choice="get_weather")
    chunks = list(bound.stream("What is the weather in Paris?"))
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert full.response_metadata["finish_reason"] == "tool_calls"


def test_system_prompt_is_used(llm, engine) -> None:
    message = llm.invoke([SystemMessage("Answer in one word."), HumanMessage(FRANCE)], max_tokens=4)
    assert "Answer in one word." in engine._decode(_meta(message)["prompt_token_ids"])
    assert not math.isnan(sum(_meta(message)["logprobs"]))
