"""The OpenAI / vLLM wire format: request models, errors, and their translation to and from ours.

Requests become LangChain messages (rendered by ``convert_messages`` exactly as :class:`MetaClawChatModel` does
in process); completions become OpenAI tool calls, usage and error bodies.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from langchain_metaclaw.chat_model.backends.base import Completion
from langchain_metaclaw.errors import AdapterError, ConfigurationError
from langchain_metaclaw.messages import content_text

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
"""New tokens when a request gives neither ``max_tokens`` nor ``max_completion_tokens``."""


class APIError(Exception):
    """An error returned to the client in vLLM's / OpenAI's shape."""

    def __init__(self, status: int, message: str, err_type: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.err_type, self.param = status, message, err_type, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.status}}


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


def text_content(content: Any, role: str) -> str:
    try:
        return content_text(content, non_text="raise")
    except ValueError as exc:
        raise APIError(400, f"Invalid {role} message: {exc}.", "InvalidUserInput", "messages") from exc


def to_langchain(messages: list[dict[str, Any]]) -> list[Any]:
    """OpenAI chat messages as LangChain messages (then rendered by ``convert_messages``, like the chat model)."""
    from langchain_core.messages import AIMessage, ChatMessage, HumanMessage, SystemMessage, ToolMessage
    from langchain_core.messages.tool import invalid_tool_call, tool_call

    out: list[Any] = []
    for message in messages:
        role = message.get("role")
        content = text_content(message.get("content"), str(role))
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


def check_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    checked = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(function, dict) or not function.get("name"):
            raise APIError(400, "Each tool must be {'type': 'function', 'function': {'name': ..., "
                                "'parameters': {...}}}.", "InvalidUserInput", "tools")
        checked.append({"type": "function", "function": function})
    return checked


def json_schema_of(req: ChatCompletionRequest) -> dict[str, Any] | None:
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


def openai_call(call_id: str | None, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def raw_arguments(args: Any) -> str:
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


def usage_of(completion: Completion) -> dict[str, int]:
    prompt = len(completion.prompt_token_ids or [])
    generated = len(completion.completion_token_ids or [])
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def as_api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, AdapterError):
        return APIError(400, str(exc), "BadRequestError")
    if isinstance(exc, ConfigurationError | ValueError):
        return APIError(400, str(exc), "BadRequestError")
    logger.error("chat completion failed", exc_info=(type(exc), exc, exc.__traceback__))
    return APIError(500, f"Internal server error ({type(exc).__name__}).", "InternalServerError")
