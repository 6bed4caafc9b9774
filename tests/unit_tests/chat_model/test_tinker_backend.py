"""The ``tinker`` serving backend against a fake of the tinker SDK's own interface (no network, no key).

The fake mirrors what the backend touches in tinker 0.22 / 0.38: ``ServiceClient.create_sampling_client``
returning the client (0.22) or a future of it (0.38), ``SamplingClient.sample`` / ``get_tokenizer`` /
``get_base_model``, ``types.ModelInput.from_ints``, ``types.SamplingParams`` (strict keywords),
``SampleResponse.sequences[i]`` = ``SampledSequence(tokens, logprobs, stop_reason)``, futures with
``.result()``. Tests assert the exact prompt tokens and sampling parameters sent and the tokens / logprobs
that come back in ``response_metadata["metaclaw"]``.
"""

from __future__ import annotations

import sys
import types as pytypes
from dataclasses import dataclass
from typing import Any

import pytest
from langchain_core.messages import HumanMessage

from langchain_metaclaw.chat_model.backends.base import CompletionRequest
from langchain_metaclaw.errors import AdapterError, BackendUnavailableError, ConfigurationError
from langchain_metaclaw.messages import convert_messages

BASE = "Qwen/Qwen3-4B-Instruct-2507"
SAMPLER_PATH = "tinker://run-1:train:0/sampler_weights/step-10"

# --- the fake SDK --------------------------------------------------------------------------------------


class Future:
    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self, timeout: float | None = None) -> Any:
        return self.value


class ModelInput:
    def __init__(self, chunks: list[int]) -> None:
        self.chunks = chunks

    @classmethod
    def from_ints(cls, tokens: list[int]) -> ModelInput:
        assert all(type(t) is int for t in tokens)
        return cls(list(tokens))

    def to_ints(self) -> list[int]:
        return list(self.chunks)

    @property
    def length(self) -> int:
        return len(self.chunks)


class SamplingParams:
    """tinker's pydantic model: keyword-only, these fields only."""

    def __init__(self, *, max_tokens=None, seed=None, stop=None, temperature=1.0, top_k=-1, top_p=1.0) -> None:
        self.max_tokens, self.seed, self.stop = max_tokens, seed, stop
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class SampledSequence:
    stop_reason: str
    tokens: list[int]
    logprobs: list[float] | None = None


@dataclass
class SampleResponse:
    sequences: list[SampledSequence]
    type: str = "sample"
    prompt_logprobs: list[float | None] | None = None


class CharTokenizer:
    """A tiny HF-like tokenizer: one token per character (id = ord + 10); ids 1/2 are BOS/EOS."""

    eos_token = "<eos>"
    eos_token_id = 2

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True, **kwargs):
        assert tokenize is False and add_generation_prompt is True
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + "<assistant>"

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [ord(c) + 10 for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}

    def decode(self, ids, skip_special_tokens=False) -> str:
        return "".join(
            ("" if skip_special_tokens else "<eos>") if i == 2 else chr(i - 10) for i in ids if i != 1
        )


TOKENIZER = CharTokenizer()


def encode(text: str) -> list[int]:
    return TOKENIZER(text, add_special_tokens=False)["input_ids"]


class SamplingClient:
    def __init__(self, service: ServiceClient, *, base_model: str | None, model_path: str | None) -> None:
        self.service, self.base_model, self.model_path = service, base_model, model_path
        self.calls: list[dict[str, Any]] = []

    def sample(self, prompt, num_samples, sampling_params, include_prompt_logprobs=False, topk_prompt_logprobs=0):
        assert isinstance(prompt, ModelInput) and isinstance(sampling_params, SamplingParams)
        self.calls.append({"prompt": prompt.to_ints(), "num_samples": num_samples,
                           "params": sampling_params.as_dict()})
        text, stop_reason = self.service.script.get(self.model_path, ("Paris.", "stop"))
        tokens = encode(text) + ([2] if stop_reason == "stop" else [])
        logprobs = [-0.1 * (i + 1) for i in range(len(tokens))]
        return Future(SampleResponse(sequences=[SampledSequence(stop_reason, tokens, logprobs)]))

    def get_tokenizer(self) -> CharTokenizer:
        self.service.tokenizer_calls += 1
        return TOKENIZER

    def get_base_model(self) -> str:
        return self.service.adapter_bases.get(self.model_path, BASE)


class ServiceClient:
    instances: list[ServiceClient] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.futures = True  # tinker 0.38: factories return futures; 0.22: clients
        self.created: list[SamplingClient] = []
        self.script: dict[str | None, tuple[str, str]] = {}
        self.adapter_bases: dict[str, str] = {}
        self.refuse: set[str] = set()
        self.tokenizer_calls = 0
        ServiceClient.instances.append(self)

    def create_sampling_client(self, model_path=None, base_model=None, retry_config=None):
        if model_path is None and base_model is None:
            raise ValueError("model_path or base_model")
        if model_path in self.refuse:
            raise RuntimeError(f"checkpoint not found: {model_path}")
        client = SamplingClient(self, base_model=base_model, model_path=model_path)
        self.created.append(client)
        return Future(client) if self.futures else client


def make_fake_sdk(name: str = "tinker") -> pytypes.ModuleType:
    module = pytypes.ModuleType(name)
    module.ServiceClient = ServiceClient
    module.types = pytypes.SimpleNamespace(ModelInput=ModelInput, SamplingParams=SamplingParams,
                                           SampledSequence=SampledSequence, SampleResponse=SampleResponse)
    return module


@pytest.fixture
def fake_tinker(monkeypatch: pytest.MonkeyPatch) -> pytypes.ModuleType:
    module = make_fake_sdk()
    monkeypatch.setitem(sys.modules, "tinker", module)
    ServiceClient.instances.clear()
    return module


def _backend(**kwargs: Any) -> Any:
    from langchain_metaclaw.chat_model.backends.tinker import TinkerServingBackend

    return TinkerServingBackend(BASE, **kwargs)


# --- tests ---------------------------------------------------------------------------------------------


def test_chat_model_reports_tinker_tokens(fake_tinker: Any) -> None:
    from langchain_metaclaw.chat_model import MetaClawChatModel

    llm = MetaClawChatModel(backend="tinker", model=BASE, temperature=0.5, top_p=0.9, max_tokens=12, seed=3)
    message = llm.invoke("What is the capital of France?")
    (service,) = ServiceClient.instances
    assert service.kwargs == {}  # key and URL from the environment, as the SDK does
    (base_client,) = service.created
    assert base_client.base_model == BASE and base_client.model_path is None
    (call,) = base_client.calls
    prompt = encode("<user>What is the capital of France?\n<assistant>")
    assert call["prompt"] == prompt and call["num_samples"] == 1
    assert call["params"] == {"max_tokens": 12, "seed": 3, "stop": None, "temperature": 0.5, "top_k": -1,
                              "top_p": 0.9}
    assert message.content == "Paris."
    meta = message.response_metadata["metaclaw"]
    assert meta["tokens_source"] == "engine"
    assert meta["prompt_token_ids"] == prompt
    assert meta["completion_token_ids"] == encode("Paris.") + [2]  # the EOS id is kept, not the text
    assert meta["logprobs"] == pytest.approx([-0.1 * (i + 1) for i in range(7)])
    assert meta["adapter_version"] is None
    assert meta["sampling"]["temperature"] == 0.5 and meta["sampling"]["constrained"] is False
    assert message.response_metadata["backend"] == "tinker" and message.response_metadata["finish_reason"] == "stop"
    assert message.usage_metadata == {"input_tokens": len(prompt), "output_tokens": 7, "total_tokens": len(prompt) + 7}
    # streaming: Tinker samples whole sequences, so the text comes as one delta, then the metadata
    chunks = list(llm.stream("Hi"))
    assert "".join(c.content for c in chunks) == "Paris."
    assert chunks[-1].response_metadata["metaclaw"]["completion_token_ids"] == encode("Paris.") + [2]
    assert service.tokenizer_calls == 1  # the tokenizer is asked once


@pytest.mark.parametrize("futures", [True, False], ids=["tinker-0.38-futures", "tinker-0.22-clients"])
def test_adapters_get_their_own_sampling_client(fake_tinker: Any, futures: bool) -> None:
    service = ServiceClient()
    service.futures = futures
    backend = _backend(service_client=service)
    service.script[SAMPLER_PATH] = ("Lyon.", "stop")
    backend.load_adapter("v1", SAMPLER_PATH)
    backend.load_adapter("v1", SAMPLER_PATH)  # same version, same path: nothing to do
    request = CompletionRequest(messages=[{"role": "user", "content": "Capital?"}], max_tokens=8, temperature=1.0)
    pinned = backend.complete(request, "v1")
    base = backend.complete(request, None)
    adapter_client = next(c for c in service.created if c.model_path == SAMPLER_PATH)
    assert len(adapter_client.calls) == 1 and pinned.text == "Lyon." and pinned.adapter_version == "v1"
    assert base.text == "Paris." and base.adapter_version is None
    assert pinned.prompt_token_ids == base.prompt_token_ids == encode("<user>Capital?\n<assistant>")
    assert pinned.model_name == BASE and backend.adapters == ["v1"]

    # a second version is a new SamplingClient; v1 keeps serving until it is unloaded
    path2 = SAMPLER_PATH.replace("step-10", "step-20")
    backend.load_adapter("v2", path2)
    assert backend.complete(request, "v2").text == "Paris." and backend.complete(request, "v1").text == "Lyon."
    with pytest.raises(AdapterError, match="already loaded"):
        backend.load_adapter("v2", SAMPLER_PATH)
    backend.unload_adapter("v1")
    with pytest.raises(AdapterError, match="No adapter named 'v1'"):
        backend.complete(request, "v1")
    assert backend.adapters == ["v2"]


def test_refused_adapters_change_nothing(fake_tinker: Any) -> None:
    service = ServiceClient()
    backend = _backend(service_client=service)
    with pytest.raises(AdapterError, match="tinker://"):
        backend.load_adapter("v1", "/local/adapter/dir")
    service.refuse.add(SAMPLER_PATH)
    with pytest.raises(AdapterError, match="checkpoint not found"):
        backend.load_adapter("v1", SAMPLER_PATH)
    other = "tinker://run-2:train:0/sampler_weights/x"
    service.adapter_bases[other] = "meta-llama/Llama-3.1-8B"
    with pytest.raises(AdapterError, match="Llama-3.1-8B"):
        backend.load_adapter("v1", other)
    assert backend.adapters == []


def test_stop_strings_json_schema_and_length(fake_tinker: Any) -> None:
    service = ServiceClient()
    backend = _backend(service_client=service)
    service.script[None] = ("Paris.\n\nMore text", "stop")
    messages = [{"role": "user", "content": "Capital?"}]
    completion = backend.complete(CompletionRequest(messages=messages, stop=["\n\n"], max_tokens=16), None)
    call = service.created[0].calls[-1]
    assert call["params"]["stop"] == ["\n\n", "<eos>"]  # the stop strings plus the EOS text
    assert completion.text == "Paris." and completion.finish_reason == "stop"
    assert completion.completion_token_ids == encode("Paris.\n\nMore text") + [2]  # ids are not trimmed

    service.script[None] = ("{", "length")
    schema = {"type": "object"}
    completion = backend.complete(CompletionRequest(messages=messages, json_schema=schema, max_tokens=1), None)
    assert completion.finish_reason == "length"
    assert completion.sampling["constrained"] is False and completion.sampling["json_schema_ignored"] is True

    explicit = _backend(service_client=service, stop_token_ids=[2, 7])
    explicit.complete(CompletionRequest(messages=messages, max_tokens=4), None)
    assert service.created[-1].calls[-1]["params"]["stop"] == [2, 7]


def test_tools_are_rendered_in_the_prompt(fake_tinker: Any) -> None:
    """The chat model puts the tools in the system prompt; a Hermes block in the answer is a tool call."""
    from langchain_metaclaw.chat_model import MetaClawChatModel

    def now() -> str:
        """The current time."""
        return "12:00"

    llm = MetaClawChatModel(backend="tinker", model=BASE, temperature=0, max_tokens=16).bind_tools([now])
    llm.invoke("Time?")  # builds the backend (and the fake service client), answers "Paris."
    service = ServiceClient.instances[-1]
    service.script[None] = ('<tool_call>{"name": "now", "arguments": {}}</tool_call>', "stop")
    message = llm.invoke("Time?")
    sent = service.created[0].calls[-1]["prompt"]
    rendered = convert_messages([HumanMessage("Time?")], llm.kwargs["tools"])
    assert sent == encode(TOKENIZER.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False))
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("now", {})]
    assert message.response_metadata["metaclaw"]["tokens_source"] == "engine"


@pytest.mark.model
def test_prompt_matches_the_local_engine(fake_tinker: Any, local_engine: Any) -> None:
    """With the real SmolLM2 tokenizer the backend renders exactly the tokens LocalEngine would."""
    backend = _backend(service_client=ServiceClient(), tokenizer=local_engine.tokenizer)
    messages = convert_messages([HumanMessage("What is the capital of France?")])
    assert backend.encode_prompt(messages) == local_engine.encode_prompt(messages)


def test_mint_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    module = make_fake_sdk("mint")
    synced = []
    module.mint = pytypes.SimpleNamespace(sync_env=lambda: synced.append(True))
    monkeypatch.setitem(sys.modules, "mint", module)
    backend = _backend(sdk="mint", api_key="sk-test")
    assert synced and backend.service_client.kwargs == {"api_key": "sk-test"}
    backend.load_adapter("v1", "mint://run/sampler_weights/x")
    assert backend.adapters == ["v1"]


def test_missing_sdk_and_base_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tinker", None)  # import tinker -> ImportError
    with pytest.raises(BackendUnavailableError) as info:
        _backend()
    assert info.value.extra == "tinker" and "langchain-metaclaw[tinker]" in str(info.value)
    monkeypatch.setitem(sys.modules, "mint", None)
    with pytest.raises(BackendUnavailableError, match=r"\[mint\]"):
        _backend(sdk="mint")
    from langchain_metaclaw.chat_model.backends.tinker import TinkerServingBackend

    with pytest.raises(ConfigurationError, match="base model"):
        TinkerServingBackend(None)
