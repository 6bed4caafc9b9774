"""``metaclaw serve``: an OpenAI-compatible server over the local backend, with vLLM's request/response shapes.

Any OpenAI client (``ChatOpenAI``, the ``openai`` SDK, ``MetaClawChatModel(backend="openai")``) can talk to it,
and so can tools written for vLLM: the same extension fields and the same dynamic-LoRA endpoints.

Endpoints
---------
``POST /v1/chat/completions``
    OpenAI chat completions, non-streaming or SSE streaming (``data: {...}`` chunks, then ``data: [DONE]``).
    ``model`` picks what answers: the served base name (or the base model id) for the base, or the name of a
    loaded adapter. Supported fields: ``messages``, ``model``, ``max_tokens`` / ``max_completion_tokens``,
    ``temperature`` (0 = greedy), ``top_p``, ``stop``, ``seed``, ``n`` (1 only), ``stream``,
    ``stream_options.include_usage``, ``tools``, ``tool_choice`` (``"auto"``, ``"none"``, ``"required"``
    or a named function: forced calls are decoded under a JSON-schema grammar), ``response_format``
    (``json_object`` / ``json_schema``), ``logprobs`` (``top_logprobs`` must be 0: the engine records the
    sampled token's logprob only). vLLM extensions, with vLLM's current names:

    - ``return_tokens_as_token_ids: true``: logprob tokens are rendered ``"token_id:<id>"``.
    - ``return_token_ids: true``: the response carries ``prompt_token_ids`` at the top level and
      ``choices[0].token_ids`` (every generated id, including a final EOS). When streaming,
      ``prompt_token_ids`` comes in the first chunk, as in vLLM; ``token_ids`` (and ``logprobs``) come
      all together in the chunk that carries ``finish_reason`` (the engine releases text later than tokens,
      so per-delta token alignment is not available; the concatenation over chunks is what vLLM gives).
    - ``structured_outputs: {"json": schema}`` (and the older ``guided_json``) constrain like
      ``response_format`` json_schema.

    The logprobs are the engine's *behaviour* logprobs: of ``softmax(logits / T)`` after top-p truncation
    and any grammar mask (vLLM's ``--logprobs-mode processed_logprobs``); for ``temperature=0`` of the raw
    logits. ``prompt_logprobs`` and ``n > 1`` are refused with 400.

    Tools are rendered into the system prompt exactly as :class:`MetaClawChatModel` does locally
    (:func:`~langchain_metaclaw.chat_model._convert.convert_messages`), so a request through this server
    gives the same tokens as the same request in process. ``tool_choice="none"`` leaves the tools out of the
    prompt. A tool-call block whose arguments do not parse is returned as a tool call with the raw
    ``arguments`` string (clients such as langchain-openai turn it into an ``invalid_tool_call``); a block
    with no readable name stays in ``content``.
``GET /v1/models``
    ``{"object": "list", "data": [ModelCard, ...]}``: the base (``parent: null``) and every loaded adapter
    (``root``: its path, ``parent``: the base name).
``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}``
    Validates and loads a peft LoRA adapter (safetensors only) under its own name. 200 with the text
    ``Success: LoRA adapter '<name>' added successfully.``; 400 (``InvalidUserInput``) when a field is missing,
    the name is taken or ``load_inplace`` is asked (load each version under a new name instead, DESIGN
    decision 6); 400 (``BadRequestError``) with the ``AdapterError`` message when the adapter is refused.
``POST /v1/unload_lora_adapter`` ``{"lora_name"}``
    200 ``Success: LoRA adapter '<name>' removed successfully.`` once no request holds it; 404
    (``NotFoundError``) for an unknown name.
``GET /health``
    200, empty body.

Errors use vLLM's shape: ``{"error": {"message", "type", "param", "code"}}``; an unknown ``model`` is 404,
invalid fields are 400 (not FastAPI's 422).

Security: :func:`serve` binds ``127.0.0.1`` by default and refuses any other address unless an API key is
set (``api_key=`` or ``METACLAW_API_KEY``). With a key, every request (the OpenAPI docs included) needs
``Authorization: Bearer <key>``; anything else gets 401. The comparison is constant-time and the key is
never logged or echoed.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from langchain_metaclaw._compat import require
from langchain_metaclaw.adapters.follower import AdapterFollower
from langchain_metaclaw.chat_model._convert import (
    convert_messages,
    forced_tool_schema,
    parse_tool_call_json,
    parse_tool_calls,
)
from langchain_metaclaw.chat_model.backends.base import Completion, CompletionRequest
from langchain_metaclaw.errors import AdapterError, ConfigurationError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from langchain_metaclaw.chat_model.backends.local import LocalServingBackend

__all__ = ["check_bind", "create_app", "is_loopback", "make_server", "serve"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
"""New tokens when a request gives neither ``max_tokens`` nor ``max_completion_tokens``."""


# ------------------------------------------------------------------------------------------------ binding


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``127.0.0.0/8``, ``::1``) or ``localhost``."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def _secret(api_key: str | SecretStr | None) -> str | None:
    if isinstance(api_key, SecretStr):
        api_key = api_key.get_secret_value()
    return api_key or None


def check_bind(host: str, api_key: str | SecretStr | None) -> None:
    """Refuse to serve on a non-loopback address without an API key (raises ``ConfigurationError``)."""
    if not is_loopback(host) and _secret(api_key) is None:
        msg = (
            f"Refusing to bind {host!r} without an API key: anyone who can reach it could use the model and "
            "load adapters. Set METACLAW_API_KEY (or pass api_key=/--api-key), or bind 127.0.0.1."
        )
        raise ConfigurationError(msg)


# ------------------------------------------------------------------------------------------------ errors


class APIError(Exception):
    """An error returned to the client in vLLM's / OpenAI's shape."""

    def __init__(self, status: int, message: str, err_type: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.err_type, self.param = status, message, err_type, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.status}}


class _BearerAuth:
    """Pure ASGI middleware: every HTTP request needs ``Authorization: Bearer <key>`` (constant-time compare)."""

    def __init__(self, app: Any, key: SecretStr) -> None:  # a SecretStr, so no repr shows it
        self.app = app
        self._key = key.get_secret_value().encode()

    def __repr__(self) -> str:  # never show the key
        return "_BearerAuth(key=***)"

    def _ok(self, scope: dict[str, Any]) -> bool:
        value = b""
        for name, raw in scope.get("headers", ()):
            if name == b"authorization":
                value = raw
                break
        scheme, _, token = value.strip().partition(b" ")
        # compare even when the scheme is wrong, so timing does not tell which part failed
        good_token = hmac.compare_digest(token.strip(), self._key)
        return good_token and scheme.lower() == b"bearer"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket") and not self._ok(scope):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            body = json.dumps(
                APIError(401, "Unauthorized: send 'Authorization: Bearer <api key>'.", "AuthenticationError").body()
            ).encode()
            await send({
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"www-authenticate", b"Bearer")],
            })
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


# ------------------------------------------------------------------------------------------------ requests


class ChatCompletionRequest(BaseModel):
    """The subset of vLLM's ``ChatCompletionRequest`` this server serves (unknown fields are ignored)."""

    model_config = ConfigDict(extra="ignore")

    messages: list[dict[str, Any]] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = 0
    # vLLM extensions
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    prompt_logprobs: int | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str | None = None
    lora_path: str | None = None
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str | None = None
    lora_int_id: int | None = None


def _text_content(content: Any, role: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise APIError(400, f"Content part of type {kind!r} in a {role} message is not supported "
                                    "(text only).", "InvalidUserInput", "messages")
        return "".join(parts)
    raise APIError(400, f"Invalid content in a {role} message.", "InvalidUserInput", "messages")


def _to_langchain(messages: list[dict[str, Any]]) -> list[Any]:
    """OpenAI chat messages as LangChain messages (then rendered by ``convert_messages``, like the chat model)."""
    from langchain_core.messages import AIMessage, ChatMessage, HumanMessage, SystemMessage, ToolMessage
    from langchain_core.messages.tool import invalid_tool_call, tool_call

    out: list[Any] = []
    for message in messages:
        role = message.get("role")
        content = _text_content(message.get("content"), str(role))
        if role in ("system", "developer"):
            out.append(SystemMessage(content=content))
        elif role == "user":
            out.append(HumanMessage(content=content))
        elif role == "assistant":
            calls, invalid = [], []
            for raw in message.get("tool_calls") or []:
                function = raw.get("function") or {}
                arguments = function.get("arguments")
                try:
                    args = json.loads(arguments) if isinstance(arguments, str) else (arguments or {})
                except json.JSONDecodeError:
                    args = None
                if isinstance(args, dict) and function.get("name"):
                    calls.append(tool_call(name=function["name"], args=args, id=raw.get("id")))
                else:
                    invalid.append(invalid_tool_call(name=function.get("name"), args=str(arguments),
                                                     id=raw.get("id"), error="unparseable arguments"))
            out.append(AIMessage(content=content, tool_calls=calls, invalid_tool_calls=invalid))
        elif role == "tool":
            out.append(ToolMessage(content=content, tool_call_id=str(message.get("tool_call_id") or "")))
        elif isinstance(role, str) and role:
            out.append(ChatMessage(role=role, content=content))
        else:
            raise APIError(400, "Every message needs a 'role'.", "InvalidUserInput", "messages")
    return out


def _check_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    checked = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(function, dict) or not function.get("name"):
            raise APIError(400, "Each tool must be {'type': 'function', 'function': {'name': ..., "
                                "'parameters': {...}}}.", "InvalidUserInput", "tools")
        checked.append({"type": "function", "function": function})
    return checked


def _json_schema(req: ChatCompletionRequest) -> dict[str, Any] | None:
    """The output constraint from ``response_format`` / ``structured_outputs`` / ``guided_json``."""
    schemas = []
    fmt = req.response_format
    if fmt:
        kind = fmt.get("type")
        if kind == "json_object":
            schemas.append({"type": "object"})
        elif kind == "json_schema":
            spec = fmt.get("json_schema") or {}
            schema = spec.get("schema", spec.get("json_schema"))
            if not isinstance(schema, dict):
                raise APIError(400, "response_format json_schema needs json_schema.schema (an object).",
                               "InvalidUserInput", "response_format")
            schemas.append(schema)
        elif kind not in (None, "text"):
            raise APIError(400, f"response_format type {kind!r} is not supported.", "InvalidUserInput",
                           "response_format")
    if req.structured_outputs and req.structured_outputs.get("json") is not None:
        schemas.append(req.structured_outputs["json"])
    if req.guided_json is not None:
        schemas.append(req.guided_json)
    if len(schemas) > 1:
        raise APIError(400, "Give one of response_format, structured_outputs.json and guided_json.",
                       "InvalidUserInput")
    if not schemas:
        return None
    schema = schemas[0]
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise APIError(400, f"The JSON schema does not parse: {exc}", "InvalidUserInput") from exc
    if not isinstance(schema, dict):
        raise APIError(400, "The JSON schema must be an object.", "InvalidUserInput")
    return schema


# ------------------------------------------------------------------------------------------------ the app


class _Server:
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
            self.adapters.release(name)  # the last holder unloads it, once no request uses it
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
        tools = _check_tools(req.tools) if req.tools else None
        choice = req.tool_choice
        forced: str | None = None
        if isinstance(choice, dict):
            forced = (choice.get("function") or {}).get("name") or choice.get("name")
            if not forced:
                raise APIError(400, "tool_choice must name a function.", "InvalidUserInput", "tool_choice")
        elif choice == "required":
            forced = "required"
        elif choice not in (None, "auto", "none"):
            raise APIError(400, f"Invalid tool_choice {choice!r}.", "InvalidUserInput", "tool_choice")
        if forced and not tools:
            raise APIError(400, "When using `tool_choice`, `tools` must be set.", "InvalidUserInput", "tool_choice")
        if choice == "none":
            tools = None
        json_schema = _json_schema(req)
        if forced:
            if json_schema is not None:
                raise APIError(400, "A forced tool_choice and response_format cannot be combined.",
                               "InvalidUserInput")
            try:
                json_schema = forced_tool_schema(tools, forced)
            except ValueError as exc:
                raise APIError(400, str(exc), "InvalidUserInput", "tool_choice") from exc
        stop = [req.stop] if isinstance(req.stop, str) else (list(req.stop) if req.stop else None)
        messages = convert_messages(_to_langchain(req.messages), tools)
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
                return None, [_openai_call(parsed["id"], parsed["name"], json.dumps(parsed["args"]))]
            return text, []
        content, calls, invalid = parse_tool_calls(text, options["tool_names"])
        out = [_openai_call(c["id"], c["name"], json.dumps(c["args"])) for c in calls]
        # a call to a bound tool whose arguments do not parse goes out with the raw arguments (the client
        # reports it as an invalid tool call); a block with no readable or known name stays in the text
        named_invalid = [c for c in invalid if c.get("name") in options["tool_names"]]
        out += [_openai_call(c["id"], c["name"], _raw_arguments(c.get("args"))) for c in named_invalid]
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
            "model": options["model"], "choices": [choice], "usage": _usage(completion),
            "prompt_logprobs": None,
            "prompt_token_ids": list(completion.prompt_token_ids or []) if options["token_ids"] else None,
        }

    def stream(self, request: CompletionRequest, adapter: str | None, options: dict[str, Any],
               include_usage: bool) -> Iterator[str]:
        """SSE lines for a streaming request (runs the generation in one dedicated thread)."""
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": options["model"]}

        def chunk(delta: dict[str, Any], **fields: Any) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
            top = {k: fields.pop(k) for k in ("prompt_token_ids", "usage") if k in fields}
            choice.update(fields)
            return "data: " + json.dumps({**base, "choices": [choice], **top}) + "\n\n"

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

        first: dict[str, Any] = {}
        if options["token_ids"]:
            # what the engine renders for this request; vLLM sends it in the first chunk
            first["prompt_token_ids"] = self.engine.encode_prompt(request.messages)
        worker = threading.Thread(target=produce, name="metaclaw-serve-stream", daemon=True)
        worker.start()
        buffer = options["tool_names"] is not None  # tool-call markup is parsed at the end
        try:
            yield chunk({"role": "assistant", "content": ""}, **first)
            final: Completion | None = None
            while True:
                item = items.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    error = _as_api_error(item)
                    yield "data: " + json.dumps(error.body()) + "\n\n"
                    yield "data: [DONE]\n\n"
                    return
                delta, completion = item
                if completion is not None:
                    final = completion
                elif delta and not buffer:
                    yield chunk({"content": delta})
            if final is None:  # pragma: no cover - the engine always ends with a result
                return
            extras, finish, content, tool_calls = self._choice_extras(final, options)
            delta: dict[str, Any] = {}
            if buffer and content:
                delta["content"] = content
            if tool_calls:
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(tool_calls)]
            fields: dict[str, Any] = {"logprobs": extras["logprobs"], "finish_reason": finish, "stop_reason": None}
            if options["token_ids"]:
                fields["token_ids"] = list(final.completion_token_ids or [])
            yield chunk(delta, **fields)
            if include_usage:
                yield "data: " + json.dumps({**base, "choices": [], "usage": _usage(final)}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            cancelled.set()  # a client that went away stops the generation at the next token


def _openai_call(call_id: str | None, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _raw_arguments(args: Any) -> str:
    """The arguments of an invalid call, as the raw string the model wrote when it can be recovered."""
    if isinstance(args, str):
        try:
            data = json.loads(args)
        except json.JSONDecodeError:
            return args
        if isinstance(data, dict) and "arguments" in data:
            inner = data["arguments"]
            return inner if isinstance(inner, str) else json.dumps(inner)
        return args
    return json.dumps(args)


def _usage(completion: Completion) -> dict[str, int]:
    prompt = len(completion.prompt_token_ids or [])
    generated = len(completion.completion_token_ids or [])
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def _as_api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, AdapterError):
        return APIError(400, str(exc), "BadRequestError")
    if isinstance(exc, ConfigurationError | ValueError):
        return APIError(400, str(exc), "BadRequestError")
    logger.error("chat completion failed", exc_info=(type(exc), exc, exc.__traceback__))
    return APIError(500, f"Internal server error ({type(exc).__name__}).", "InternalServerError")


def create_app(
    backend: LocalServingBackend | None = None,
    *,
    api_key: str | SecretStr | None = None,
    served_model_name: str | None = None,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
) -> FastAPI:
    """The FastAPI app: vLLM-shaped chat completions, models listing and dynamic LoRA over ``backend``.

    Args:
        backend: a :class:`~langchain_metaclaw.chat_model.backends.local.LocalServingBackend`; ``None`` builds
            one on the embedded SmolLM2.
        api_key: when set, every request needs ``Authorization: Bearer <api_key>`` (401 otherwise). Only
            what is passed counts here; :func:`serve` falls back to ``METACLAW_API_KEY``.
        served_model_name: the ``model`` name of the base (default: the backend's base model name; that
            name is accepted too).
        default_max_tokens: new tokens when a request sets no limit.
    """
    fastapi = require("fastapi", backend="serve", extra="serve")
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

    if backend is None:
        from langchain_metaclaw.chat_model.backends.local import LocalServingBackend

        backend = LocalServingBackend()
    server = _Server(backend, served_model_name or backend.model_name, default_max_tokens)
    app = fastapi.FastAPI(title="metaclaw serve", version="1")
    app.state.metaclaw = server

    @app.exception_handler(APIError)
    async def _api_error(request: Any, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Any, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body') or 'body'}: {err.get('msg')}"
            for err in exc.errors()
        )
        return JSONResponse(APIError(400, problems or "Invalid request.", "InvalidUserInput").body(),
                            status_code=400)

    @app.get("/health")
    def health() -> Response:
        return Response(status_code=200)

    @app.get("/v1/models")
    def list_models() -> JSONResponse:
        return JSONResponse(server.models())

    @app.post("/v1/load_lora_adapter")
    def load_lora_adapter(body: LoadLoRAAdapterRequest) -> PlainTextResponse:
        return PlainTextResponse(server.load_adapter(body))

    @app.post("/v1/unload_lora_adapter")
    def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        return PlainTextResponse(server.unload_adapter(body))

    @app.post("/v1/chat/completions")
    def chat_completions(body: ChatCompletionRequest) -> Any:
        request, adapter, options = server.prepare(body)
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(server.stream(request, adapter, options, include_usage),
                                     media_type="text/event-stream")
        try:
            completion = backend.complete(request, adapter)
        except Exception as exc:
            raise _as_api_error(exc) from exc
        return JSONResponse(server.response(completion, options))

    key = _secret(api_key)
    if key is not None:
        app.add_middleware(_BearerAuth, key=SecretStr(key))
    return app


def make_server(
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | SecretStr | None = None,
    base_model: str | None = None,
    *,
    backend: LocalServingBackend | None = None,
    served_model_name: str | None = None,
    log_level: str = "info",
) -> Any:
    """A ready ``uvicorn.Server`` (call ``.run()``; tests run it in a thread and set ``should_exit``).

    ``api_key=None`` falls back to ``METACLAW_API_KEY``. Raises ``ConfigurationError`` before loading any
    model when ``host`` is not loopback and there is no key.
    """
    from langchain_metaclaw.config import get_settings

    key = _secret(api_key) or _secret(get_settings().api_key)
    check_bind(host, key)
    uvicorn = require("uvicorn", backend="serve", extra="serve")
    require("fastapi", backend="serve", extra="serve")
    if backend is None:
        from langchain_metaclaw.chat_model.backends.local import LocalServingBackend

        backend = LocalServingBackend(base_model)
    app = create_app(backend, api_key=key, served_model_name=served_model_name)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=True,
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | SecretStr | None = None,
    base_model: str | None = None,
    *,
    served_model_name: str | None = None,
    log_level: str = "info",
) -> None:
    """Serve the local backend over HTTP until interrupted (what ``metaclaw serve`` runs).

    Binds ``127.0.0.1:8000`` by default. Any other address needs an API key (``api_key=`` or
    ``METACLAW_API_KEY``), else ``ConfigurationError``; with a key every request needs
    ``Authorization: Bearer <key>``. ``base_model=None`` serves the embedded SmolLM2-135M-Instruct.
    """
    server = make_server(host, port, api_key, base_model, served_model_name=served_model_name,
                         log_level=log_level)
    auth = "API key required" if server.config.app.user_middleware else "no API key (loopback only)"
    logger.info("metaclaw serve on http://%s:%d/v1 (%s)", host, port, auth)
    server.run()
