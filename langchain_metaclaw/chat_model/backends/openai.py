"""The ``openai`` serving backend: any OpenAI-compatible server, with vLLM's extensions when it has them.

Works against vLLM (dynamic LoRA), ``metaclaw serve`` and plain OpenAI-compatible endpoints, through the
``openai`` SDK's sync client (which does the retries, timeouts and auth).

Engine tokens (DESIGN decision 2). Each request asks for ``logprobs=True`` and, in ``extra_body``, vLLM's
``return_token_ids: true`` (the generated ids in ``choices[0].token_ids`` and the prompt's in the top-level
``prompt_token_ids``) and ``return_tokens_as_token_ids: true`` (logprob tokens as ``"token_id:<id>"``, the
fallback for vLLM versions before ``return_token_ids``). ``Completion.completion_token_ids`` comes from
``token_ids``, else from the ``token_id:`` logprob tokens; when the server gives neither (a plain OpenAI
endpoint), ids *and* logprobs are ``None`` and the chat model marks the sample ``retokenized``.
``prompt_token_ids`` is ``None`` when the server does not return it. Pass ``vllm_extensions=False`` for
servers that reject unknown fields (api.openai.com): then only ``logprobs=True`` is sent.

For vLLM, start it with ``--logprobs-mode processed_logprobs``: vLLM's default returns logprobs of the raw
logits, not of the temperature-scaled / top-p-truncated distribution the tokens were sampled from, and the
trainer needs the latter (``metaclaw serve`` always returns the latter).

Tool calls. The chat model renders bound tools into the system prompt (for backends without native tool
calling); this backend removes that block again and sends the tools natively (``tools=``), so the server's
own chat template and tool parser are used. A forced tool (``tool_choice`` in ``bind_tools``) arrives as a
JSON schema of one call; it is sent as ``tool_choice={"type": "function", "function": {"name": ...}}`` (or
``"required"`` for a choice among several tools). Any other ``json_schema`` (structured output) is sent as
``response_format={"type": "json_schema", "json_schema": {"name": "output", "schema": ..., "strict":
true}}``, the OpenAI field vLLM also serves (not the deprecated ``guided_json``).

The server's ``tool_calls`` become ``Completion.tool_calls``: LangChain ``ToolCall`` dicts
(``type="tool_call"``), and for a call whose ``arguments`` is not a JSON object an ``InvalidToolCall``
dict (``type="invalid_tool_call"``, raw ``args`` string, ``error``) in the same list; the chat model splits
the list on ``type``. When the server returned no tool calls, ``tool_calls`` is ``None`` so the chat model
parses the text itself (servers started without a tool parser).

Adapters (DESIGN decision 6). ``load_adapter(version, uri)`` posts vLLM's ``/v1/load_lora_adapter``
``{"lora_name": version, "lora_path": uri}``; requests pinned to that version then use ``model=version``.
``unload_adapter`` posts ``/v1/unload_lora_adapter``. vLLM only serves these with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` and ``--enable-lora``; ``uri`` must be a path *the server* can read.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Iterator
from typing import Any

from langchain_core.messages.tool import invalid_tool_call
from langchain_core.messages.tool import tool_call as make_tool_call
from pydantic import SecretStr

from langchain_metaclaw.chat_model.backends.base import Completion, CompletionRequest
from langchain_metaclaw.errors import AdapterError, ConfigurationError
from langchain_metaclaw.messages import TOOLS_SYSTEM_TEMPLATE, forced_tool_schema

__all__ = ["OpenAIServingBackend"]

logger = logging.getLogger(__name__)

_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "function_call": "tool_calls"}


def _dump(obj: Any) -> dict[str, Any]:
    """An SDK response object (extra fields included) as a plain dict."""
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return obj
    return obj.model_dump(exclude_unset=False)


def _strip_tools_block(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Remove the tools block ``convert_messages`` put in the system prompt (the server renders tools itself)."""
    if not messages or messages[0].get("role") != "system":
        return messages
    block = TOOLS_SYSTEM_TEMPLATE.format(tools="\n".join(json.dumps(t["function"]) for t in tools))
    content = messages[0].get("content") or ""
    if content == block:
        return messages[1:]
    if content.endswith("\n\n" + block):
        return [{**messages[0], "content": content[: -len(block) - 2]}, *messages[1:]]
    return messages


def _forced_choice(request: CompletionRequest) -> str | dict[str, Any] | None:
    """The ``tool_choice`` whose schema ``request.json_schema`` is, if it is a forced tool call."""
    if not request.tools or request.json_schema is None:
        return None
    for tool in request.tools:
        name = tool["function"]["name"]
        if forced_tool_schema(request.tools, name) == request.json_schema:
            return {"type": "function", "function": {"name": name}}
    if len(request.tools) > 1 and forced_tool_schema(request.tools, "required") == request.json_schema:
        return "required"
    return None


def _token_id(token: Any) -> int | None:
    if isinstance(token, str) and token.startswith("token_id:"):
        try:
            return int(token[len("token_id:"):])
        except ValueError:
            return None
    return None


def _tokens_from_logprobs(content: list[dict[str, Any]] | None) -> tuple[list[int] | None, list[float] | None]:
    if not content:
        return None, None
    ids = [_token_id(entry.get("token")) for entry in content]
    logprobs = [float(entry.get("logprob")) for entry in content]
    return (None if any(i is None for i in ids) else ids), logprobs  # type: ignore[return-value]


def _convert_tool_calls(raw_calls: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """OpenAI ``tool_calls`` as LangChain ToolCall / InvalidToolCall dicts (``None`` when there are none)."""
    if not raw_calls:
        return None
    out: list[dict[str, Any]] = []
    for raw in raw_calls:
        function = raw.get("function") or {}
        name, arguments, call_id = function.get("name"), function.get("arguments"), raw.get("id")
        call_id = call_id or f"call_{uuid.uuid4().hex[:24]}"
        if arguments in (None, ""):
            arguments = "{}"
        try:
            args = json.loads(arguments) if isinstance(arguments, str) else arguments
            error = None if isinstance(args, dict) else "arguments must be a JSON object"
        except json.JSONDecodeError as exc:
            args, error = None, f"invalid JSON arguments: {exc}"
        if not name:
            error = error or "tool call without a function name"
        if error is None:
            out.append(make_tool_call(name=name, args=args, id=call_id))
        else:
            raw_args = arguments if isinstance(arguments, str) else json.dumps(arguments)
            out.append(invalid_tool_call(name=name, args=raw_args, id=call_id, error=error))
    return out


class OpenAIServingBackend:
    """Serve through an OpenAI-compatible HTTP server (vLLM with dynamic LoRA, ``metaclaw serve``, ...).

    Args:
        base_url (`str`): the server's ``/v1`` URL, e.g. ``"http://127.0.0.1:8000/v1"``.
        api_key (`str` or `SecretStr`, *optional*): bearer key; ``METACLAW_API_KEY`` when unset, else
            ``"EMPTY"`` (vLLM's convention for a server without a key).
        model (`str`, *optional*): the base model's served name; ``None`` asks ``/v1/models`` for the
            first model without a ``parent`` (the base).
        timeout (`float`, *optional*): seconds per HTTP request (the SDK's default when ``None``).
        max_retries (`int`, defaults to 2): SDK retries of connection errors, 408/409/429 and 5xx.
        vllm_extensions (`bool`, defaults to `True`): send ``return_token_ids`` /
            ``return_tokens_as_token_ids``; set `False` for servers that reject unknown fields.
        client (*optional*): a ready ``openai.OpenAI`` client (the other connection arguments are ignored).
    """

    name = "openai"

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | SecretStr | None = None,
        model: str | None = None,
        timeout: float | None = None,
        max_retries: int = 2,
        *,
        vllm_extensions: bool = True,
        client: Any = None,
    ) -> None:
        import openai  # a dependency of langchain-openai, which the package requires
        if client is None:
            if not base_url:
                msg = "OpenAIServingBackend needs base_url (the server's /v1 URL)"
                raise ConfigurationError(msg)
            if isinstance(api_key, SecretStr):
                api_key = api_key.get_secret_value()
            if not api_key:
                from langchain_metaclaw.config import get_settings

                secret = get_settings().api_key
                api_key = secret.get_secret_value() if secret is not None else None
            kwargs: dict[str, Any] = {"base_url": base_url.rstrip("/"), "api_key": api_key or "EMPTY",
                                      "max_retries": max_retries}
            if timeout is not None:
                kwargs["timeout"] = timeout
            client = openai.OpenAI(**kwargs)
        self._openai = openai
        self.client = client
        self.vllm_extensions = vllm_extensions
        self._model = model
        self._loaded: dict[str, str] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OpenAIServingBackend(base_url={str(self.client.base_url)!r}, model={self._model!r})"

    # ------------------------------------------------------------------ models

    @property
    def model_name(self) -> str:
        """The base model's served name (asked from ``/v1/models`` once when not given)."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    models = [_dump(m) for m in self.client.models.list()]
                    bases = [m["id"] for m in models if not m.get("parent")]
                    if not bases:
                        msg = f"{self.client.base_url}models lists no base model; pass model= explicitly"
                        raise ConfigurationError(msg)
                    self._model = bases[0]
        return self._model

    @property
    def loaded_adapters(self) -> list[str]:
        """Versions this backend loaded (and has not unloaded)."""
        return list(self._loaded)

    # ------------------------------------------------------------------ requests

    def _params(self, request: CompletionRequest, adapter: str | None) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": adapter or self.model_name,
            "messages": request.messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "logprobs": True,
        }
        if request.stop:
            params["stop"] = list(request.stop)
        if request.seed is not None:
            params["seed"] = request.seed
        if request.tools:
            params["messages"] = _strip_tools_block(request.messages, request.tools)
            params["tools"] = request.tools
        forced = _forced_choice(request)
        if forced is not None:
            params["tool_choice"] = forced
        elif request.json_schema is not None:
            params["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": request.json_schema, "strict": True},
            }
        if self.vllm_extensions:
            params["extra_body"] = {"return_token_ids": True, "return_tokens_as_token_ids": True}
        return params

    def _sampling(self, request: CompletionRequest) -> dict[str, Any]:
        return {
            "temperature": float(request.temperature),
            "top_p": float(request.top_p),
            "seed": request.seed,
            "max_new_tokens": int(request.max_tokens),
            "greedy": request.temperature == 0,
            "constrained": request.json_schema is not None,
            "logprobs_from": "server",
        }

    def _completion(
        self,
        request: CompletionRequest,
        adapter: str | None,
        *,
        text: str,
        finish: str | None,
        raw_calls: list[dict[str, Any]] | None,
        token_ids: list[int] | None,
        logprob_content: list[dict[str, Any]] | None,
        prompt_ids: list[int] | None,
        usage: dict[str, Any] | None,
        model: str | None,
    ) -> Completion:
        ids_from_logprobs, logprobs = _tokens_from_logprobs(logprob_content)
        ids = token_ids if token_ids is not None else ids_from_logprobs
        if ids is None or logprobs is None or len(logprobs) != len(ids):
            if ids is not None and logprobs is not None:
                logger.warning("server returned %d token ids but %d logprobs; keeping neither",
                               len(ids), len(logprobs))
            ids, logprobs = None, None  # retokenized: the trainer recomputes both
        tool_calls = _convert_tool_calls(raw_calls)
        finish_reason = "tool_calls" if tool_calls else _FINISH.get(finish or "stop", "stop")
        usage_meta = None
        if usage:
            usage_meta = {"input_tokens": int(usage.get("prompt_tokens") or 0),
                          "output_tokens": int(usage.get("completion_tokens") or 0),
                          "total_tokens": int(usage.get("total_tokens") or 0)}
        return Completion(
            text=text,
            finish_reason=finish_reason,  # type: ignore[arg-type]
            prompt_token_ids=[int(t) for t in prompt_ids] if prompt_ids else None,
            completion_token_ids=[int(t) for t in ids] if ids is not None else None,
            logprobs=logprobs,
            adapter_version=adapter,
            model_name=self._model or (model if adapter is None and model else self.model_name),
            sampling=self._sampling(request),
            tool_calls=tool_calls,
            usage=usage_meta,
        )

    def complete(self, request: CompletionRequest, adapter: str | None) -> Completion:
        response = _dump(self.client.chat.completions.create(**self._params(request, adapter)))
        choice = response["choices"][0]
        message = choice.get("message") or {}
        return self._completion(
            request, adapter,
            text=message.get("content") or "",
            finish=choice.get("finish_reason"),
            raw_calls=message.get("tool_calls"),
            token_ids=choice.get("token_ids"),
            logprob_content=(choice.get("logprobs") or {}).get("content"),
            prompt_ids=response.get("prompt_token_ids"),
            usage=response.get("usage"),
            model=response.get("model"),
        )

    def stream(self, request: CompletionRequest, adapter: str | None) -> Iterator[tuple[str, Completion | None]]:
        params = self._params(request, adapter)
        params["stream"] = True
        params["stream_options"] = {"include_usage": True}
        text: list[str] = []
        token_ids: list[int] = []
        saw_token_ids = False
        logprob_content: list[dict[str, Any]] = []
        calls: dict[int, dict[str, Any]] = {}
        prompt_ids = None
        finish = None
        usage = None
        model = None
        stream = self.client.chat.completions.create(**params)
        try:
            for event in stream:
                data = _dump(event)
                if data.get("error"):
                    message = (data["error"] or {}).get("message", "stream error")
                    raise RuntimeError(f"server error while streaming: {message}")
                model = data.get("model") or model
                prompt_ids = data.get("prompt_token_ids") or prompt_ids
                usage = data.get("usage") or usage
                for choice in data.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if choice.get("token_ids") is not None:
                        saw_token_ids = True
                        token_ids.extend(choice["token_ids"])
                    logprob_content.extend((choice.get("logprobs") or {}).get("content") or [])
                    for part in delta.get("tool_calls") or []:
                        slot = calls.setdefault(int(part.get("index") or 0),
                                                {"id": None, "function": {"name": "", "arguments": ""}})
                        slot["id"] = part.get("id") or slot["id"]
                        function = part.get("function") or {}
                        slot["function"]["name"] += function.get("name") or ""
                        slot["function"]["arguments"] += function.get("arguments") or ""
                    if delta.get("content"):
                        text.append(delta["content"])
                        yield delta["content"], None
                    finish = choice.get("finish_reason") or finish
        finally:
            close = getattr(stream, "close", None)
            if callable(close):
                close()
        yield "", self._completion(
            request, adapter,
            text="".join(text),
            finish=finish,
            raw_calls=[calls[i] for i in sorted(calls)] or None,
            token_ids=token_ids if saw_token_ids else None,
            logprob_content=logprob_content or None,
            prompt_ids=prompt_ids,
            usage=usage,
            model=model,
        )

    # ------------------------------------------------------------------ adapters

    def _post(self, path: str, body: dict[str, Any]) -> str:
        """POST to the server's ``/v1/<path>``; returns the response text (SDK errors propagate)."""
        import httpx

        response = self.client.post(path, body=body, cast_to=httpx.Response)
        return response.text

    def load_adapter(self, version: str, uri: str) -> None:
        """Load ``uri`` on the server as ``version`` (vLLM ``/v1/load_lora_adapter``); ``AdapterError`` if refused."""
        uri = str(uri)
        with self._lock:
            if self._loaded.get(version) == uri:
                return
            try:
                self._post("/load_lora_adapter", {"lora_name": version, "lora_path": uri})
            except self._openai.APIStatusError as exc:
                message = _error_message(exc)
                if exc.status_code == 400 and "already been loaded" in message and self._serves(version, uri):
                    self._loaded[version] = uri
                    return
                msg = f"The server refused adapter {version!r} from {uri}: {message}"
                raise AdapterError(msg) from exc
            except self._openai.APIConnectionError as exc:
                msg = f"Could not reach {self.client.base_url} to load adapter {version!r}: {exc}"
                raise AdapterError(msg) from exc
            self._loaded[version] = uri

    def _serves(self, version: str, uri: str) -> bool:
        """Whether ``/v1/models`` lists ``version`` loaded from ``uri`` (a load by another client)."""
        try:
            return any(_dump(m).get("id") == version and _dump(m).get("root") in (uri, None)
                       for m in self.client.models.list())
        except Exception:  # noqa: BLE001 - only a best-effort check
            return False

    def unload_adapter(self, version: str) -> None:
        """Unload ``version`` on the server (vLLM ``/v1/unload_lora_adapter``); unknown versions are ignored."""
        with self._lock:
            try:
                self._post("/unload_lora_adapter", {"lora_name": version})
            except self._openai.NotFoundError:
                pass
            except self._openai.APIStatusError as exc:
                msg = f"The server did not unload adapter {version!r}: {_error_message(exc)}"
                raise AdapterError(msg) from exc
            self._loaded.pop(version, None)


def _error_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return str(getattr(exc, "message", exc))
