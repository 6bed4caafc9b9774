"""``metaclaw serve`` for real: uvicorn on a free loopback port, hit over HTTP with httpx.

Generations are greedy and at most 16 new tokens. Tool-call rendering is checked against a scripted backend
(a forced call on SmolLM2 needs ~18 tokens under the grammar); the real engine's constrained decoding through
the server is checked in ``chat_model/test_openai_backend.py``.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from langchain_metaclaw.chat_model.backends.base import Completion, CompletionRequest
from langchain_metaclaw.errors import ConfigurationError
from tests.fixtures import server as server_fixtures
from tests.fixtures.model import ADAPTER_PROMPT
from tests.fixtures.server import Served, running, uvicorn_server

served = server_fixtures.served  # the module's own `metaclaw serve` (a pytest fixture)

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

pytestmark = pytest.mark.model

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
NOW_TOOL = {"type": "function", "function": {"name": "now", "description": "The current time.",
                                             "parameters": {"type": "object", "properties": {},
                                                            "additionalProperties": False}}}


@pytest.fixture(scope="module")
def client(served: Served) -> Iterator[Any]:
    with httpx.Client(base_url=served.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def reference(served: Served) -> Any:
    """The engine's own greedy answer to FRANCE (6 tokens), to compare the server's with."""
    return served.backend.engine.generate(FRANCE, max_new_tokens=6, temperature=0.0)


def _chat(client: Any, **body: Any) -> Any:
    body.setdefault("messages", FRANCE)
    body.setdefault("temperature", 0)
    body.setdefault("max_tokens", 6)
    return client.post("/v1/chat/completions", json=body)


def _sse(client: Any, **body: Any) -> list[Any]:
    body.setdefault("messages", FRANCE)
    body.setdefault("temperature", 0)
    body.setdefault("max_tokens", 6)
    body["stream"] = True
    events = []
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                continue
            assert line.startswith("data: ")
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def _error(response: Any, status: int, err_type: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and set(error) == {"message", "type", "param", "code"}
    if err_type:
        assert error["type"] == err_type
    return error["message"]


# ------------------------------------------------------------------------------------------ chat completions


def test_chat_completion_openai_shape(client: Any, reference: Any) -> None:
    response = _chat(client)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "SmolLM2-135M-Instruct"
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": reference.text, "tool_calls": []}
    assert choice["finish_reason"] == reference.finish_reason
    assert choice["logprobs"] is None and choice["token_ids"] is None and body["prompt_token_ids"] is None
    assert body["usage"] == {"prompt_tokens": len(reference.prompt_token_ids),
                             "completion_tokens": len(reference.completion_token_ids),
                             "total_tokens": len(reference.prompt_token_ids) + len(reference.completion_token_ids)}


def test_token_ids_and_logprobs_are_the_engines(client: Any, reference: Any) -> None:
    body = _chat(client, logprobs=True, return_token_ids=True, return_tokens_as_token_ids=True).json()
    choice = body["choices"][0]
    assert body["prompt_token_ids"] == reference.prompt_token_ids
    assert choice["token_ids"] == reference.completion_token_ids
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content] == [f"token_id:{t}" for t in reference.completion_token_ids]
    assert [c["logprob"] for c in content] == pytest.approx(reference.logprobs, abs=1e-5)
    assert all(c["top_logprobs"] == [] and c["bytes"] == list(c["token"].encode()) for c in content)


def test_logprob_tokens_as_text(client: Any, served: Served, reference: Any) -> None:
    content = _chat(client, logprobs=True).json()["choices"][0]["logprobs"]["content"]
    tokenizer = served.backend.engine.tokenizer
    assert [c["token"] for c in content] == [tokenizer.decode([t]) for t in reference.completion_token_ids]


def test_streaming_sse(client: Any, reference: Any) -> None:
    events = _sse(client, logprobs=True, return_token_ids=True, return_tokens_as_token_ids=True,
                  stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    first, *middle, last, usage = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["prompt_token_ids"] == reference.prompt_token_ids  # vLLM: the prompt ids come first
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == reference.text and len(middle) >= 2  # streamed in pieces
    final = last["choices"][0]
    assert final["finish_reason"] == reference.finish_reason
    assert final["token_ids"] == reference.completion_token_ids
    assert [c["token"] for c in final["logprobs"]["content"]] == [f"token_id:{t}" for t in reference.completion_token_ids]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(reference.completion_token_ids)


def test_stop_and_seeded_sampling(client: Any) -> None:
    stopped = _chat(client, stop=" France", return_token_ids=True).json()["choices"][0]
    assert stopped["message"]["content"] == "The capital of" and stopped["finish_reason"] == "stop"
    a = _chat(client, temperature=1.0, seed=7, max_tokens=4, return_token_ids=True).json()["choices"][0]
    b = _chat(client, temperature=1.0, seed=7, max_tokens=4, return_token_ids=True).json()["choices"][0]
    assert a["token_ids"] == b["token_ids"]


def test_invalid_requests_get_vllm_errors(client: Any) -> None:
    assert "does not exist" in _error(_chat(client, model="no-such-model"), 404, "NotFoundError")
    _error(_chat(client, n=2), 400)
    _error(_chat(client, temperature=-1), 400, "InvalidUserInput")
    _error(_chat(client, messages=[]), 400, "InvalidUserInput")
    _error(_chat(client, top_logprobs=3, logprobs=True), 400)
    _error(_chat(client, prompt_logprobs=1), 400)
    _error(_chat(client, tool_choice="required"), 400)  # tool_choice without tools
    _error(_chat(client, tools=[NOW_TOOL], tool_choice={"type": "function", "function": {"name": "nope"}}), 400)
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    _error(_chat(client, messages=image), 400)
    _error(client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}),
           400)


# ------------------------------------------------------------------------------------------ models and adapters


def test_models_and_adapter_lifecycle(client: Any, served: Served, two_adapters: tuple[Path, Path],
                                      tmp_path: Path) -> None:
    engine = served.backend.engine
    name = f"srv-{uuid.uuid4().hex[:8]}"
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    base = models["data"][0]
    assert base["id"] == "SmolLM2-135M-Instruct" and base["parent"] is None and base["object"] == "model"
    assert name not in [m["id"] for m in models["data"]]

    response = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(two_adapters[0])})
    assert response.status_code == 200, response.text
    assert response.text == f"Success: LoRA adapter '{name}' added successfully."
    try:
        card = {m["id"]: m for m in client.get("/v1/models").json()["data"]}[name]
        assert card["parent"] == "SmolLM2-135M-Instruct" and card["root"] == str(two_adapters[0])
        assert "already been loaded" in _error(
            client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(two_adapters[1])}),
            400, "InvalidUserInput")

        # the request's model picks the adapter; its answer is the engine's with that adapter pinned
        body = _chat(client, messages=ADAPTER_PROMPT, model=name, max_tokens=8, return_token_ids=True).json()
        expected = engine.generate(ADAPTER_PROMPT, adapter=name, max_new_tokens=8)
        assert body["model"] == name
        assert body["choices"][0]["token_ids"] == expected.completion_token_ids
        base_answer = engine.generate(ADAPTER_PROMPT, max_new_tokens=8)
        assert expected.completion_token_ids != base_answer.completion_token_ids  # the adapter changed it
    finally:
        response = client.post("/v1/unload_lora_adapter", json={"lora_name": name})
    assert response.status_code == 200 and response.text == f"Success: LoRA adapter '{name}' removed successfully."
    assert name not in engine.adapters
    assert name not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert "cannot be found" in _error(client.post("/v1/unload_lora_adapter", json={"lora_name": name}), 404,
                                       "NotFoundError")
    _error(_chat(client, model=name), 404, "NotFoundError")


def test_refused_adapters(client: Any, served: Served, two_adapters: tuple[Path, Path], tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt"
    shutil.copytree(two_adapters[0], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00not a safetensors file")
    name = f"bad-{uuid.uuid4().hex[:8]}"
    message = _error(client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(corrupt)}),
                     400, "BadRequestError")
    assert "not a valid safetensors file" in message
    pickled = tmp_path / "pickled"
    shutil.copytree(two_adapters[0], pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    assert "safetensors" in _error(
        client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(pickled)}), 400)
    assert name not in served.backend.engine.adapters
    assert name not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    _error(client.post("/v1/load_lora_adapter", json={"lora_name": name}), 400, "InvalidUserInput")
    _error(client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(two_adapters[0]),
                                                      "load_inplace": True}), 400, "InvalidUserInput")
    _error(client.post("/v1/unload_lora_adapter", json={}), 400, "InvalidUserInput")


# ------------------------------------------------------------------------------------------ tool calls


class ScriptedBackend:
    """Answers every request with a fixed text (real tokenizer and prompt rendering, no generation)."""

    def __init__(self, real: Any, text: str) -> None:
        self.engine = real.engine
        self.model_name = real.model_name
        self.text = text
        self.requests: list[CompletionRequest] = []

    def complete(self, request: CompletionRequest, adapter: str | None) -> Completion:
        self.requests.append(request)
        ids = list(self.engine.tokenizer(self.text, add_special_tokens=False)["input_ids"])
        return Completion(text=self.text, finish_reason="stop",
                          prompt_token_ids=self.engine.encode_prompt(request.messages), completion_token_ids=ids,
                          logprobs=[-0.5] * len(ids), adapter_version=adapter, model_name=self.model_name)

    def stream(self, request: CompletionRequest, adapter: str | None) -> Iterator[tuple[str, Completion | None]]:
        completion = self.complete(request, adapter)
        half = len(self.text) // 2
        yield self.text[:half], None
        yield self.text[half:], None
        yield "", completion


@pytest.fixture
def scripted(served: Served) -> Iterator[Any]:
    """``set(text)`` starts a server whose backend always answers ``text``; returns (backend, client)."""
    from langchain_metaclaw.server import create_app

    stack: list[Any] = []

    def start(text: str) -> tuple[ScriptedBackend, Any]:
        backend = ScriptedBackend(served.backend, text)
        ctx = running(uvicorn_server(create_app(backend)))  # type: ignore[arg-type]
        url = ctx.__enter__()
        stack.append(ctx)
        c = httpx.Client(base_url=url, timeout=30)
        stack.append(c)
        return backend, c

    yield start
    for item in reversed(stack):
        if isinstance(item, httpx.Client):
            item.close()
        else:
            item.__exit__(None, None, None)


def test_tool_calls_in_openai_shape(scripted: Any) -> None:
    from langchain_core.messages import HumanMessage

    from langchain_metaclaw.messages import convert_messages, forced_tool_schema

    backend, client = scripted('{"name": "now", "arguments": {}}')
    forced = {"type": "function", "function": {"name": "now"}}
    body = _chat(client, messages=[{"role": "user", "content": "Time?"}], tools=[NOW_TOOL], tool_choice=forced).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "now", "arguments": "{}"}
    # tools rendered into the prompt exactly as the chat model does locally; the forced call is a grammar
    request = backend.requests[-1]
    assert request.messages == convert_messages([HumanMessage("Time?")], [NOW_TOOL])
    assert request.json_schema == forced_tool_schema([NOW_TOOL], "now")

    # auto: a <tool_call> block in the text; the rest of the text stays content
    backend.text = 'Let me check. <tool_call>{"name": "now", "arguments": {}}</tool_call>'
    message = _chat(client, tools=[NOW_TOOL]).json()["choices"][0]["message"]
    assert message["content"] == "Let me check." and message["tool_calls"][0]["function"]["name"] == "now"
    assert backend.requests[-1].json_schema is None

    # a call to a bound tool with unparseable arguments goes out with the raw arguments
    backend.text = '<tool_call>{"name": "now", "arguments": "{oops"}</tool_call>'
    message = _chat(client, tools=[NOW_TOOL]).json()["choices"][0]["message"]
    assert message["tool_calls"][0]["function"] == {"name": "now", "arguments": "{oops"}
    # a block nobody can read stays in the text
    backend.text = "<tool_call>{broken</tool_call>"
    body = _chat(client, tools=[NOW_TOOL]).json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": backend.text, "tool_calls": []}
    assert body["choices"][0]["finish_reason"] == "stop"
    # tool_choice="none": no tools in the prompt, no parsing
    backend.text = '<tool_call>{"name": "now", "arguments": {}}</tool_call>'
    message = _chat(client, tools=[NOW_TOOL], tool_choice="none").json()["choices"][0]["message"]
    assert message["tool_calls"] == [] and backend.requests[-1].messages == [{"role": "user", "content": FRANCE[0]["content"]}]


def test_tool_calls_streamed_and_history(scripted: Any) -> None:
    backend, client = scripted('{"name": "now", "arguments": {}}')
    history = [
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
        {"role": "user", "content": "Again?"},
    ]
    events = _sse(client, messages=history, tools=[NOW_TOOL], tool_choice="required")
    assert events[-1] == "[DONE]"
    last = events[-2]["choices"][0]
    assert last["finish_reason"] == "tool_calls"
    assert last["delta"]["tool_calls"][0]["index"] == 0
    assert last["delta"]["tool_calls"][0]["function"] == {"name": "now", "arguments": "{}"}
    assert not any(e["choices"][0]["delta"].get("content") for e in events[1:-2])  # tool markup is not streamed
    rendered = backend.requests[-1].messages
    assert rendered[2] == {"role": "assistant", "content": '<tool_call>{"name": "now", "arguments": {}}</tool_call>'}
    assert rendered[3] == {"role": "tool", "content": "12:00", "tool_call_id": "call_1"}


def test_response_format_json_schema(scripted: Any) -> None:
    backend, client = scripted('{"city": "Paris"}')
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    body = _chat(client, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert body.json()["choices"][0]["message"]["content"] == '{"city": "Paris"}'
    assert backend.requests[-1].json_schema == schema
    _chat(client, structured_outputs={"json": schema})
    assert backend.requests[-1].json_schema == schema
    _chat(client, response_format={"type": "json_object"})
    assert backend.requests[-1].json_schema == {"type": "object"}


# ------------------------------------------------------------------------------------------ security


def test_api_key_required_when_set(served: Served) -> None:
    from langchain_metaclaw.server import create_app

    key = "s3cret-" + uuid.uuid4().hex
    with running(uvicorn_server(create_app(served.backend, api_key=key))) as url, \
            httpx.Client(base_url=url, timeout=30) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key},
                        {"Authorization": f"Basic {key}"}, {"Authorization": f"Bearer {key}x"}):
            for response in (c.get("/v1/models", headers=headers), c.get("/health", headers=headers),
                             c.get("/openapi.json", headers=headers),
                             c.post("/v1/load_lora_adapter", headers=headers, json={"lora_name": "x", "lora_path": "/"}),
                             c.post("/v1/chat/completions", headers=headers, json={"messages": FRANCE})):
                assert response.status_code == 401
                assert response.headers["www-authenticate"] == "Bearer"
                assert response.json()["error"]["type"] == "AuthenticationError"
                assert key not in response.text
        ok = c.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "SmolLM2-135M-Instruct"
        assert c.get("/health", headers={"Authorization": f"bearer {key}"}).status_code == 200


def test_non_loopback_bind_needs_a_key(monkeypatch: pytest.MonkeyPatch, served: Served) -> None:
    from langchain_metaclaw.server import check_bind, is_loopback, make_server, serve

    monkeypatch.delenv("METACLAW_API_KEY", raising=False)
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.20", "example.com", ""))
    for host in ("0.0.0.0", "::", "10.0.0.1", "myhost"):
        with pytest.raises(ConfigurationError, match="API key"):
            serve(host=host, port=1)  # refused before any model is loaded or port bound
    check_bind("127.0.0.1", None)
    # with a key (argument or METACLAW_API_KEY) the server is built, and then enforces it
    built = make_server("0.0.0.0", 1, api_key="k", backend=served.backend)
    assert built.config.host == "0.0.0.0"
    assert any(m.cls.__name__ == "BearerAuth" for m in built.config.app.user_middleware)
    monkeypatch.setenv("METACLAW_API_KEY", "from-env")
    built = make_server("0.0.0.0", 1, backend=served.backend)
    assert any(m.cls.__name__ == "BearerAuth" for m in built.config.app.user_middleware)
    assert "from-env" not in repr(built.config.app.user_middleware)
