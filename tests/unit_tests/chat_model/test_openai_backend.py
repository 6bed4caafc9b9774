"""``MetaClawChatModel(backend="openai")`` against a real ``metaclaw serve`` (uvicorn on a free loopback port).

The server speaks vLLM's extensions, so the chat model gets the engine's own tokens and logprobs back over
HTTP; every test compares them with what the in-process engine produces for the same greedy request.
Generations are greedy and at most 16 new tokens.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessageChunk, HumanMessage

from langchain_metaclaw.chat_model.backends.base import Completion, CompletionRequest
from langchain_metaclaw.errors import AdapterError
from langchain_metaclaw.messages import convert_messages, forced_tool_schema
from tests.fixtures import server as server_fixtures
from tests.fixtures.model import ADAPTER_PROMPT
from tests.fixtures.server import Served, running, uvicorn_server

served = server_fixtures.served  # the module's own `metaclaw serve` (a pytest fixture)

pytest.importorskip("fastapi")

pytestmark = pytest.mark.model

QUESTION = "What is the capital of France?"
ATOL = 1e-5


def now() -> str:
    """The current time."""
    return "12:00"


@pytest.fixture(scope="module")
def engine(local_engine: Any) -> Any:
    """The session's own engine (not the server's): same weights, computed independently."""
    return local_engine


def _llm(served: Served, **kwargs: Any) -> Any:
    from langchain_metaclaw.chat_model import MetaClawChatModel

    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_tokens", 8)
    return MetaClawChatModel(backend="openai", base_url=served.base_url, **kwargs)


def _assert_engine_tokens(meta: dict[str, Any], expected: Any) -> None:
    assert meta["tokens_source"] == "engine"
    assert meta["prompt_token_ids"] == expected.prompt_token_ids
    assert meta["completion_token_ids"] == expected.completion_token_ids
    assert meta["logprobs"] == pytest.approx(expected.logprobs, abs=ATOL)


def test_invoke_returns_engine_tokens(served: Served, engine: Any) -> None:
    message = _llm(served).invoke(QUESTION)
    expected = engine.generate(convert_messages([HumanMessage(QUESTION)]), max_new_tokens=8, temperature=0.0)
    assert message.content == expected.text
    meta = message.response_metadata["metaclaw"]
    _assert_engine_tokens(meta, expected)
    assert meta["adapter_version"] is None
    assert meta["sampling"]["greedy"] is True and meta["sampling"]["constrained"] is False
    assert message.response_metadata["backend"] == "openai"
    assert message.response_metadata["model_name"] == "SmolLM2-135M-Instruct"  # asked from /v1/models
    assert message.usage_metadata["output_tokens"] == len(expected.completion_token_ids)


def test_stream_returns_engine_tokens(served: Served, engine: Any) -> None:
    chunks = list(_llm(served, max_tokens=6).stream(QUESTION))
    expected = engine.generate(convert_messages([HumanMessage(QUESTION)]), max_new_tokens=6, temperature=0.0)
    assert len(chunks) >= 3 and all(isinstance(c, AIMessageChunk) for c in chunks)
    assert "".join(c.content for c in chunks) == expected.text
    _assert_engine_tokens(chunks[-1].response_metadata["metaclaw"], expected)


def test_bind_tools_forced_goes_through_the_grammar(served: Served, engine: Any) -> None:
    """A forced tool: tools sent natively, rendered by the server exactly as in process, decoded under the same
    grammar (same tokens); the grammar ends the answer when the JSON call is complete (~18 tokens here)."""
    model = _llm(served, max_tokens=16)
    llm = model.bind_tools([now], tool_choice="now")
    message = llm.invoke("What time is it?")
    tools = llm.kwargs["tools"]
    budget = max(16, getattr(model, "constrained_min_tokens", 0))  # the chat model's floor for constrained answers
    expected = engine.generate(convert_messages([HumanMessage("What time is it?")], tools), max_new_tokens=budget,
                               temperature=0.0, json_schema=forced_tool_schema(tools, "now"))
    meta = message.response_metadata["metaclaw"]
    _assert_engine_tokens(meta, expected)
    assert meta["sampling"]["constrained"] is True
    if expected.finish_reason == "stop":  # the grammar completed the call
        assert [(c["name"], c["args"]) for c in message.tool_calls] == [("now", {})]
        assert message.response_metadata["finish_reason"] == "tool_calls"
    else:  # cut off by the budget: reported, not raised
        assert message.invalid_tool_calls


def test_adapter_loaded_through_the_backend_then_pinned(served: Served, engine: Any,
                                                        two_adapters: tuple[Path, Path]) -> None:
    from langchain_metaclaw.chat_model.backends.openai import OpenAIServingBackend

    backend = OpenAIServingBackend(base_url=served.base_url)
    version = f"oa-{uuid.uuid4().hex[:8]}"
    backend.load_adapter(version, str(two_adapters[1]))
    backend.load_adapter(version, str(two_adapters[1]))  # idempotent for the same uri
    local_name = f"ref-{version}"
    engine.load_adapter(local_name, two_adapters[1])
    try:
        assert version in served.backend.engine.adapters
        request = CompletionRequest(messages=ADAPTER_PROMPT, max_tokens=8, temperature=0.0)
        completion = backend.complete(request, version)
        expected = engine.generate(ADAPTER_PROMPT, adapter=local_name, max_new_tokens=8)
        assert completion.adapter_version == version
        assert completion.completion_token_ids == expected.completion_token_ids
        assert completion.logprobs == pytest.approx(expected.logprobs, abs=ATOL)
        assert completion.prompt_token_ids == expected.prompt_token_ids
        assert completion.model_name == "SmolLM2-135M-Instruct"
    finally:
        backend.unload_adapter(version)
        engine.unload_adapter(local_name)
    assert version not in served.backend.engine.adapters and backend.loaded_adapters == []
    backend.unload_adapter(version)  # unknown: nothing to do


def test_chat_model_follows_the_registry_over_http(served: Served, engine: Any, two_adapters: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    from langchain_metaclaw.adapters import AdapterRegistry
    from langchain_metaclaw.store import TraceStore

    store = TraceStore(f"sqlite:///{tmp_path / 'store.db'}")
    version = f"reg-{uuid.uuid4().hex[:8]}"
    AdapterRegistry(store).register(two_adapters[0], backend="openai", version=version)
    llm = _llm(served, store=store, adapter=version, max_tokens=8)
    local_name = f"ref-{version}"
    engine.load_adapter(local_name, two_adapters[0])
    try:
        message = llm.invoke(ADAPTER_PROMPT[0]["content"])
        expected = engine.generate(ADAPTER_PROMPT, adapter=local_name, max_new_tokens=8)
        assert message.response_metadata["adapter_version"] == version
        _assert_engine_tokens(message.response_metadata["metaclaw"], expected)
    finally:
        llm.close()
        engine.unload_adapter(local_name)
        llm._backend.unload_adapter(version)


def test_refused_adapter_raises_adapter_error(served: Served, two_adapters: tuple[Path, Path],
                                              tmp_path: Path) -> None:
    from langchain_metaclaw.chat_model.backends.openai import OpenAIServingBackend

    corrupt = tmp_path / "corrupt"
    shutil.copytree(two_adapters[0], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"garbage")
    backend = OpenAIServingBackend(base_url=served.base_url)
    with pytest.raises(AdapterError, match="not a valid safetensors file"):
        backend.load_adapter("oa-corrupt", str(corrupt))
    assert backend.loaded_adapters == [] and "oa-corrupt" not in served.backend.engine.adapters
    down = OpenAIServingBackend(base_url="http://127.0.0.1:9/v1", model="m", max_retries=0, timeout=2)
    with pytest.raises(AdapterError, match="Could not reach"):
        down.load_adapter("v1", "/x")


def test_plain_openai_server_gives_retokenized(served: Served) -> None:
    """Without vLLM's extensions the server returns token strings only: no ids, so nothing is trusted."""
    from langchain_metaclaw.chat_model.backends.openai import OpenAIServingBackend

    backend = OpenAIServingBackend(base_url=served.base_url, model="SmolLM2-135M-Instruct", vllm_extensions=False)
    completion = backend.complete(CompletionRequest(messages=[{"role": "user", "content": QUESTION}], max_tokens=3,
                                                    temperature=0.0), None)
    assert completion.text and completion.completion_token_ids is None and completion.logprobs is None
    assert completion.prompt_token_ids is None and completion.usage["output_tokens"] == 3


def test_api_key_is_sent(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    import openai

    from langchain_metaclaw.chat_model.backends.openai import OpenAIServingBackend
    from langchain_metaclaw.server import create_app

    key = "k-" + uuid.uuid4().hex
    with running(uvicorn_server(create_app(served.backend, api_key=key))) as url:
        assert OpenAIServingBackend(base_url=url + "/v1", api_key=key).model_name == "SmolLM2-135M-Instruct"
        monkeypatch.setenv("METACLAW_API_KEY", key)  # the fallback
        assert OpenAIServingBackend(base_url=url + "/v1").model_name == "SmolLM2-135M-Instruct"
        monkeypatch.delenv("METACLAW_API_KEY")
        with pytest.raises(openai.AuthenticationError):
            _ = OpenAIServingBackend(base_url=url + "/v1", max_retries=0).model_name


# ------------------------------------------------------------------------------------------ scripted server


class _Scripted:
    """A backend for ``create_app`` that answers a fixed text (no generation)."""

    def __init__(self, real: Any, text: str) -> None:
        self.engine, self.model_name, self.text = real.engine, real.model_name, text
        self.requests: list[CompletionRequest] = []

    def complete(self, request: CompletionRequest, adapter: str | None) -> Completion:
        self.requests.append(request)
        ids = list(self.engine.tokenizer(self.text, add_special_tokens=False)["input_ids"])
        return Completion(text=self.text, finish_reason="stop",
                          prompt_token_ids=self.engine.encode_prompt(request.messages),
                          completion_token_ids=ids, logprobs=[-0.25] * len(ids), adapter_version=adapter,
                          model_name=self.model_name)

    def stream(self, request: CompletionRequest, adapter: str | None) -> Iterator[tuple[str, Completion | None]]:
        completion = self.complete(request, adapter)
        yield self.text, None
        yield "", completion


@pytest.fixture
def scripted(served: Served) -> Iterator[tuple[_Scripted, str]]:
    from langchain_metaclaw.server import create_app

    backend = _Scripted(served.backend, '{"name": "now", "arguments": {}}')
    with running(uvicorn_server(create_app(backend))) as url:  # type: ignore[arg-type]
        yield backend, url + "/v1"


def test_tool_calls_from_the_server_become_tool_calls(scripted: tuple[_Scripted, str]) -> None:
    from langchain_metaclaw.chat_model import MetaClawChatModel

    backend, base_url = scripted
    llm = MetaClawChatModel(backend="openai", base_url=base_url, temperature=0, max_tokens=16)
    bound = llm.bind_tools([now], tool_choice="now")
    for message in (bound.invoke("What time is it?"), _merge(bound.stream("What time is it?"))):
        assert message.tool_calls == [{"name": "now", "args": {}, "id": message.tool_calls[0]["id"],
                                       "type": "tool_call"}]
        assert message.response_metadata["finish_reason"] == "tool_calls"
        meta = message.response_metadata["metaclaw"]
        assert meta["tokens_source"] == "engine"
        assert meta["prompt_token_ids"] == backend.engine.encode_prompt(backend.requests[-1].messages)
        assert meta["logprobs"] == [-0.25] * len(meta["completion_token_ids"])
    # the backend took the tools block out of the prompt, sent tools natively and the choice as tool_choice;
    # the server rendered and forced them as the chat model does in process
    tools = bound.kwargs["tools"]
    request = backend.requests[-1]
    assert request.messages == convert_messages([HumanMessage("What time is it?")], tools)
    assert request.json_schema == forced_tool_schema(tools, "now")


def _merge(chunks: Iterator[AIMessageChunk]) -> Any:
    total = None
    for chunk in chunks:
        total = chunk if total is None else total + chunk
    return total


def test_request_translation() -> None:
    """What the backend sends for tools, forced tools and structured output (no server needed)."""
    from langchain_metaclaw.chat_model.backends.openai import OpenAIServingBackend

    backend = OpenAIServingBackend(base_url="http://127.0.0.1:9/v1", model="base")
    tool = {"type": "function", "function": {"name": "now", "description": "t", "parameters": {"type": "object"}}}
    other = {"type": "function", "function": {"name": "later", "parameters": {"type": "object"}}}
    messages = convert_messages([HumanMessage("hi")], [tool, other])
    params = backend._params(CompletionRequest(messages=messages, tools=[tool, other]), "v3")
    assert params["model"] == "v3" and params["messages"] == [{"role": "user", "content": "hi"}]
    assert params["tools"] == [tool, other] and "tool_choice" not in params and params["logprobs"] is True
    assert params["extra_body"] == {"return_token_ids": True, "return_tokens_as_token_ids": True}
    with_system = convert_messages([HumanMessage("hi")], [tool])
    with_system[0]["content"] = "Be brief.\n\n" + with_system[0]["content"]
    stripped = backend._params(CompletionRequest(messages=with_system, tools=[tool]), None)["messages"]
    assert stripped[0] == {"role": "system", "content": "Be brief."}
    forced = CompletionRequest(messages=messages, tools=[tool, other], json_schema=forced_tool_schema([tool, other], "later"))
    assert backend._params(forced, None)["tool_choice"] == {"type": "function", "function": {"name": "later"}}
    anyone = CompletionRequest(messages=messages, tools=[tool, other],
                               json_schema=forced_tool_schema([tool, other], "required"))
    assert backend._params(anyone, None)["tool_choice"] == "required"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    structured = backend._params(CompletionRequest(messages=[{"role": "user", "content": "x"}], json_schema=schema,
                                                   stop=["\n"], seed=3), None)
    assert structured["response_format"] == {"type": "json_schema",
                                             "json_schema": {"name": "output", "schema": schema, "strict": True}}
    assert structured["stop"] == ["\n"] and structured["seed"] == 3 and structured["model"] == "base"


def test_tool_call_parsing() -> None:
    from langchain_metaclaw.chat_model.backends.openai import _convert_tool_calls, _tokens_from_logprobs

    calls = _convert_tool_calls([
        {"id": "a", "type": "function", "function": {"name": "now", "arguments": '{"tz": "UTC"}'}},
        {"id": "b", "type": "function", "function": {"name": "now", "arguments": "{oops"}},
        {"id": "c", "type": "function", "function": {"name": "now", "arguments": "[1]"}},
        {"id": "d", "type": "function", "function": {"name": "now", "arguments": ""}},
    ])
    assert calls[0] == {"name": "now", "args": {"tz": "UTC"}, "id": "a", "type": "tool_call"}
    assert calls[1]["type"] == "invalid_tool_call" and calls[1]["args"] == "{oops" and calls[1]["name"] == "now"
    assert "invalid JSON" in calls[1]["error"]
    assert calls[2]["type"] == "invalid_tool_call" and calls[2]["args"] == "[1]"
    assert calls[3] == {"name": "now", "args": {}, "id": "d", "type": "tool_call"}
    assert _convert_tool_calls([]) is None
    ids, lps = _tokens_from_logprobs([{"token": "token_id:5", "logprob": -0.5}, {"token": "token_id:7", "logprob": -1}])
    assert ids == [5, 7] and lps == [-0.5, -1.0]
    assert _tokens_from_logprobs([{"token": "Paris", "logprob": -0.5}])[0] is None
