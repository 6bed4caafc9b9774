"""Request handling of ``metaclaw serve``, independent of FastAPI's routing: models, dynamic LoRA, completions.

Adapters are loaded and unloaded through the process's :class:`~langchain_metaclaw.adapters.follower.AdapterFollower`
(the one place adapter holds are counted), never by reaching into the engine.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from langchain_metaclaw.adapters.follower import AdapterFollower
from langchain_metaclaw.chat_model.backends.base import Completion, CompletionRequest
from langchain_metaclaw.errors import AdapterError
from langchain_metaclaw.messages import (
    convert_messages,
    forced_tool_schema,
    normalize_tool_choice,
    parse_tool_call_json,
    parse_tool_calls,
)
from langchain_metaclaw.server.protocol import (
    APIError,
    ChatCompletionRequest,
    LoadLoRAAdapterRequest,
    UnloadLoRAAdapterRequest,
    as_api_error,
    check_tools,
    json_schema_of,
    openai_call,
    raw_arguments,
    to_langchain,
    usage_of,
)

if TYPE_CHECKING:
    from langchain_metaclaw.chat_model.backends.local import LocalServingBackend

logger = logging.getLogger(__name__)


class ChatServer:
    """Request handling, independent of FastAPI's routing (one per app)."""

    def __init__(self, backend: LocalServingBackend, served_model_name: str, default_max_tokens: int) -> None:
        self.backend = backend
        self.engine = backend.engine
        self.served_model_name = served_model_name
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        self.adapters = AdapterFollower.for_backend(backend)
        """The process's adapter holds: the server's loads count beside the chat models' of this process."""
        self._paths: dict[str, str] = {}
        self._admin = threading.Lock()

    # -- models

    def resolve_model(self, name: str | None) -> str | None:
        """The adapter a request's ``model`` names (``None``: the base); 404 for anything else."""
        if name in (None, "", self.served_model_name, self.backend.model_name):
            return None
        if name in self.engine.adapters:
            return name
        raise APIError(404, f"The model `{name}` does not exist.", "NotFoundError", "model")

    def models(self) -> dict[str, Any]:
        def card(model_id: str, root: str | None, parent: str | None, max_len: int | None) -> dict[str, Any]:
            return {
                "id": model_id, "object": "model", "created": self.created, "owned_by": "metaclaw",
                "root": root, "parent": parent, "max_model_len": max_len,
                "permission": [{
                    "id": f"modelperm-{uuid.uuid5(uuid.NAMESPACE_URL, model_id).hex}", "object": "model_permission",
                    "created": self.created, "allow_create_engine": False, "allow_sampling": True,
                    "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                    "allow_fine_tuning": False, "organization": "*", "group": None, "is_blocking": False,
                }],
            }

        max_len = int(getattr(self.engine, "max_positions", 0) or 0) or None
        data = [card(self.served_model_name, self.backend.model_name, None, max_len)]
        for name in self.engine.adapters:
            path = self._paths.get(name) or str(self.engine.adapter_path(name) or "") or None
            data.append(card(name, path, self.served_model_name, None))
        return {"object": "list", "data": data}

    def load_adapter(self, req: LoadLoRAAdapterRequest) -> str:
        if not req.lora_name or not req.lora_path:
            raise APIError(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        if req.load_inplace:
            raise APIError(400, "load_inplace is not supported: load each adapter version under its own "
                                "name and switch requests to it (in-place swaps mix adapters mid-request).",
                           "InvalidUserInput", "load_inplace")
        name = req.lora_name
        with self._admin:
            if name in self.engine.adapters or name in (self.served_model_name, self.backend.model_name):
                raise APIError(400, f"The lora adapter '{name}' has already been loaded. If you want to load "
                                    "the adapter in place, set 'load_inplace' to True.", "InvalidUserInput")
            try:
                self.adapters.hold(name, req.lora_path)
            except AdapterError as exc:
                raise APIError(400, str(exc), "BadRequestError") from exc
            self._paths[name] = req.lora_path
        logger.info("loaded LoRA adapter %r from %s", name, req.lora_path)
        return f"Success: LoRA adapter '{name}' added successfully."

    def unload_adapter(self, req: UnloadLoRAAdapterRequest) -> str:
        name = req.lora_name
        if not name:
            raise APIError(400, "'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput")
        with self._admin:
            if name not in self._paths or name not in self.engine.adapters:
                raise APIError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
            try:  # the last holder unloads it, once no request uses it
                self.adapters.release(name, strict=True)
            except AdapterError as exc:  # still in use past the engine's wait: loaded, and can be unloaded later
                raise APIError(400, str(exc), "BadRequestError") from exc
            self._paths.pop(name, None)
        logger.info("unloaded LoRA adapter %r", name)
        return f"Success: LoRA adapter '{name}' removed successfully."

    # -- chat completions

    def prepare(self, req: ChatCompletionRequest) -> tuple[CompletionRequest, str | None, dict[str, Any]]:
        """Validate and translate a request: ``(CompletionRequest, adapter, options)``."""
        if req.n not in (None, 1):
            raise APIError(400, "n > 1 is not supported; send several requests.", "InvalidUserInput", "n")
        if req.prompt_logprobs is not None:
            raise APIError(400, "prompt_logprobs is not supported by this server.", "InvalidUserInput",
                           "prompt_logprobs")
        if req.top_logprobs:
            raise APIError(400, "top_logprobs > 0 is not supported: the engine records the sampled token's "
                                "logprob only.", "InvalidUserInput", "top_logprobs")
        adapter = self.resolve_model(req.model)
        tools = check_tools(req.tools) if req.tools else None
        try:
            choice = normalize_tool_choice(req.tool_choice, tools)
        except ValueError as exc:
            raise APIError(400, str(exc), "InvalidUserInput", "tool_choice") from exc
        forced = choice if choice not in (None, "none") else None
        if choice == "none":
            tools = None
        json_schema = json_schema_of(req)
        if forced:
            if json_schema is not None:
                raise APIError(400, "A forced tool_choice and response_format cannot be combined.",
                               "InvalidUserInput")
            json_schema = forced_tool_schema(tools, forced)
        stop = [req.stop] if isinstance(req.stop, str) else (list(req.stop) if req.stop else None)
        messages = convert_messages(to_langchain(req.messages), tools)
        request = CompletionRequest(
            messages=messages,
            tools=tools,
            max_tokens=req.max_completion_tokens or req.max_tokens or self.default_max_tokens,
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p),
            stop=stop,
            seed=req.seed,
            json_schema=json_schema,
        )
        options = {
            "tool_names": {t["function"]["name"] for t in tools} if tools else None,
            "forced": forced is not None,
            "logprobs": bool(req.logprobs),
            "as_token_ids": bool(req.return_tokens_as_token_ids),
            "token_ids": bool(req.return_token_ids),
            "model": req.model or self.served_model_name,
        }
        return request, adapter, options

    def _tool_output(self, text: str, options: dict[str, Any]) -> tuple[str | None, list[dict[str, Any]]]:
        """``(content, OpenAI tool_calls)`` for a completion of a request with tools."""
        if options["forced"]:
            parsed = parse_tool_call_json(text)
            if parsed.get("type") == "tool_call":
                return None, [openai_call(parsed["id"], parsed["name"], json.dumps(parsed["args"]))]
            return text, []
        content, calls, invalid = parse_tool_calls(text, options["tool_names"])
        out = [openai_call(c["id"], c["name"], json.dumps(c["args"])) for c in calls]
        # a call to a bound tool whose arguments do not parse goes out with the raw arguments (the client
        # reports it as an invalid tool call); a block with no readable or known name stays in the text
        named_invalid = [c for c in invalid if c.get("name") in options["tool_names"]]
        out += [openai_call(c["id"], c["name"], raw_arguments(c.get("args"))) for c in named_invalid]
        if len(named_invalid) < len(invalid):
            content = text
        return (content or None) if out else content, out

    def _logprobs(self, completion: Completion, as_ids: bool) -> dict[str, Any]:
        ids = completion.completion_token_ids or []
        lps = completion.logprobs or []
        if as_ids:
            tokens = [f"token_id:{t}" for t in ids]
        else:
            tokens = self.engine.token_texts(ids)
        return {"content": [
            {"token": tok, "logprob": max(float(lp), -9999.0), "bytes": list(tok.encode("utf-8", "replace")),
             "top_logprobs": []}
            for tok, lp in zip(tokens, lps, strict=False)
        ]}

    def _choice_extras(self, completion: Completion, options: dict[str, Any]) -> tuple[dict[str, Any], str, str | None,
                                                                                       list[dict[str, Any]]]:
        content: str | None = completion.text
        tool_calls: list[dict[str, Any]] = []
        if options["tool_names"]:
            content, tool_calls = self._tool_output(completion.text, options)
        finish = "tool_calls" if tool_calls else completion.finish_reason
        extras = {"logprobs": self._logprobs(completion, options["as_token_ids"]) if options["logprobs"] else None}
        return extras, finish, content, tool_calls

    def response(self, completion: Completion, options: dict[str, Any]) -> dict[str, Any]:
        extras, finish, content, tool_calls = self._choice_extras(completion, options)
        message: dict[str, Any] = {"role": "assistant", "content": content, "tool_calls": tool_calls}
        choice = {"index": 0, "message": message, "logprobs": extras["logprobs"], "finish_reason": finish,
                  "stop_reason": None,
                  "token_ids": list(completion.completion_token_ids or []) if options["token_ids"] else None}
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": options["model"], "choices": [choice], "usage": usage_of(completion),
            "prompt_logprobs": None,
            "prompt_token_ids": list(completion.prompt_token_ids or []) if options["token_ids"] else None,
        }

    def stream(self, request: CompletionRequest, adapter: str | None, options: dict[str, Any],
               include_usage: bool) -> Iterator[str]:
        """SSE lines for a streaming request (runs the generation in one dedicated thread)."""
        sse = _ChunkWriter(options["model"])
        first: dict[str, Any] = {}
        if options["token_ids"]:
            # what the engine renders for this request; vLLM sends it in the first chunk
            first["prompt_token_ids"] = self.engine.encode_prompt(request.messages)
        items, cancelled = self._produce(request, adapter)
        buffer = options["tool_names"] is not None  # tool-call markup is parsed at the end
        try:
            yield sse.chunk({"role": "assistant", "content": ""}, **first)
            final: Completion | None = None
            while (item := items.get()) is not None:
                if isinstance(item, BaseException):
                    yield sse.data(as_api_error(item).body())
                    yield "data: [DONE]\n\n"
                    return
                delta, completion = item
                if completion is not None:
                    final = completion
                elif delta and not buffer:
                    yield sse.chunk({"content": delta})
            if final is None:  # pragma: no cover - the engine always ends with a result
                return
            yield self._last_chunk(sse, final, options, buffer)
            if include_usage:
                yield sse.data({**sse.base, "choices": [], "usage": usage_of(final)})
            yield "data: [DONE]\n\n"
        finally:
            cancelled.set()  # a client that went away stops the generation at the next token

    def _produce(self, request: CompletionRequest, adapter: str | None) -> tuple[queue.Queue, threading.Event]:
        """Run the backend's stream in a thread: its items, then ``None``, go to the queue (errors as items)."""
        items: queue.Queue = queue.Queue()  # unbounded: a producer never blocks, so it always ends
        cancelled = threading.Event()

        def produce() -> None:
            try:
                for item in self.backend.stream(request, adapter):
                    if cancelled.is_set():
                        break
                    items.put(item)
            except BaseException as exc:  # reported to the client as an error event
                items.put(exc)
            finally:
                items.put(None)

        threading.Thread(target=produce, name="metaclaw-serve-stream", daemon=True).start()
        return items, cancelled

    def _last_chunk(self, sse: _ChunkWriter, final: Completion, options: dict[str, Any], buffer: bool) -> str:
        """The chunk with ``finish_reason``: buffered content and tool calls, logprobs and token ids."""
        extras, finish, content, tool_calls = self._choice_extras(final, options)
        delta: dict[str, Any] = {}
        if buffer and content:
            delta["content"] = content
        if tool_calls:
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(tool_calls)]
        fields: dict[str, Any] = {"logprobs": extras["logprobs"], "finish_reason": finish, "stop_reason": None}
        if options["token_ids"]:
            fields["token_ids"] = list(final.completion_token_ids or [])
        return sse.chunk(delta, **fields)


class _ChunkWriter:
    """``chat.completion.chunk`` SSE lines of one streamed response (one id, one creation time)."""

    def __init__(self, model: str) -> None:
        self.base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                     "created": int(time.time()), "model": model}

    @staticmethod
    def data(body: dict[str, Any]) -> str:
        return "data: " + json.dumps(body) + "\n\n"

    def chunk(self, delta: dict[str, Any], **fields: Any) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        top = {k: fields.pop(k) for k in ("prompt_token_ids", "usage") if k in fields}
        choice.update(fields)
        return self.data({**self.base, "choices": [choice], **top})
