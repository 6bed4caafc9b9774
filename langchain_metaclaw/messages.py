"""Messages between every stage: content as text, LangChain <-> chat-template dicts, tool calls, ``tool_choice``.

The one home for reading a message (capture, scoring, training, serving and the server all use it), so a
message means the same thing at every stage. Pure functions, tested directly (the ``langchain-openai``
layout). Models whose chat template has no tool support (SmolLM2's) see tools as a system-prompt block and
answer with Hermes-style ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; a block that does not
parse becomes an ``invalid_tool_call``, never an exception.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.tool import InvalidToolCall, ToolCall, invalid_tool_call
from langchain_core.messages.tool import tool_call as make_tool_call

METACLAW_METADATA_KEY = "metaclaw"
"""``AIMessage.response_metadata[METACLAW_METADATA_KEY]``: engine token ids, logprobs, adapter version.

Written by :class:`~langchain_metaclaw.chat_model.MetaClawChatModel`, read by capture: part of what a
message carries, so it lives with the rest of the message layout."""

TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

TOOLS_SYSTEM_TEMPLATE = (
    "You can call these tools:\n<tools>\n{tools}\n</tools>\n"
    "To call a tool, answer with one block per call:\n"
    '<tool_call>{{"name": "<tool name>", "arguments": {{<arguments as JSON>}}}}</tool_call>\n'
    "Otherwise answer the user directly."
)


NonText = Literal["skip", "mark", "raise"]
"""What :func:`content_text` does with a content block that is not text."""


def _block_text(block: Any) -> str | None:
    """A block's text, or ``None`` when it is not a text block (an image, a tool use, reasoning...)."""
    if isinstance(block, str):
        return block
    if isinstance(block, Mapping) and block.get("type", "text") == "text" and isinstance(block.get("text"), str):
        return block["text"]
    return None


def content_text(content: Any, *, non_text: NonText = "skip") -> str:
    """The text of a message's ``content``: the one rule every stage reads content by.

    ``None`` is ``""`` and a string is itself. A list of content blocks gives its strings and the ``text``
    of its text blocks (``{"type": "text", "text": ...}``, or a block with only a ``text``), joined with
    nothing in between, as langchain-core's ``BaseMessage.text`` does. Any other block (an image, a tool
    use, reasoning) is, by ``non_text``:

    - ``"skip"``: left out (what a text-only chat template, a reward rule or a judge's answer wants);
    - ``"mark"``: written as ``[<type>]``, so a reader (the PRM judge) knows something was there;
    - ``"raise"``: refused with a ``ValueError`` that names the block's type (the server answers 400).

    Content of any other type is ``str(content)``, or a ``ValueError`` under ``"raise"``.

    >>> content_text([{"type": "text", "text": "Hello "}, "world", {"type": "image_url", "image_url": {}}])
    'Hello world'
    >>> content_text(["See", {"type": "image_url", "image_url": {}}], non_text="mark")
    'See[image_url]'
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        if non_text == "raise":
            msg = f"content must be a string or a list of content blocks, got {type(content).__name__}"
            raise ValueError(msg)
        return str(content)
    parts = []
    for block in content:
        text = _block_text(block)
        if text is None:
            kind = block.get("type") if isinstance(block, Mapping) else type(block).__name__
            if non_text == "raise":
                msg = f"content block of type {kind!r} is not supported (text only)"
                raise ValueError(msg)
            text = f"[{kind}]" if non_text == "mark" else ""
        parts.append(text)
    return "".join(parts)


def normalize_tool_choice(tool_choice: Any, tools: Sequence[Mapping[str, Any]] | None) -> str | None:
    """Every spelling of ``tool_choice`` (LangChain's and OpenAI's) as one value; the one place that reads it.

    Returns ``None`` when the model chooses (no choice, ``"auto"``), ``"none"`` when tools are hidden from
    it (``"none"``, ``False``), ``"required"`` for one call to any bound tool (``"required"``, ``"any"``,
    ``True``), else the name of the tool it must call (the name, or ``{"type": "function", "function":
    {"name": ...}}``). A forced choice needs ``tools`` (OpenAI schemas) and must name one of them.

    Raises:
        ValueError: a dict that names no function, a value of no known form, a forced choice without
            tools, or a name no bound tool has. The message is what an API user should read.
    """
    if tool_choice in (None, "auto"):
        return None
    if tool_choice in ("none", False):
        return "none"
    if tool_choice in ("required", "any", True):
        choice = "required"
    elif isinstance(tool_choice, Mapping):
        choice = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
        if not isinstance(choice, str) or not choice:
            msg = "tool_choice must name a function."
            raise ValueError(msg)
    elif isinstance(tool_choice, str):
        choice = tool_choice
    else:
        msg = f"Invalid tool_choice {tool_choice!r}."
        raise ValueError(msg)
    if not tools:
        msg = "When using `tool_choice`, `tools` must be set."
        raise ValueError(msg)
    names = [t["function"]["name"] for t in tools]
    if choice != "required" and choice not in names:
        msg = f"tool_choice {choice!r} names no bound tool (bound: {names})"
        raise ValueError(msg)
    return choice


def render_tool_call(call: ToolCall | dict[str, Any]) -> str:
    return "<tool_call>" + json.dumps({"name": call["name"], "arguments": call.get("args", {})}) + "</tool_call>"


def convert_message_to_dict(message: BaseMessage) -> dict[str, Any]:
    """A LangChain message as a chat-template dict (``role``/``content`` strings, tool calls as text)."""
    if isinstance(message, SystemMessage):
        return {"role": "system", "content": content_text(message.content)}
    if isinstance(message, HumanMessage):
        return {"role": "user", "content": content_text(message.content)}
    if isinstance(message, AIMessage):
        content = content_text(message.content)
        calls = "".join(render_tool_call(tc) for tc in message.tool_calls)
        return {"role": "assistant", "content": (content + ("\n" if content and calls else "") + calls)}
    if isinstance(message, ToolMessage):
        return {"role": "tool", "content": content_text(message.content), "tool_call_id": message.tool_call_id}
    if isinstance(message, ChatMessage):
        return {"role": message.role, "content": content_text(message.content)}
    msg = f"Unsupported message type {type(message).__name__}"
    raise TypeError(msg)


def convert_dict_to_message(message: dict[str, Any], tool_names: set[str] | None = None) -> BaseMessage:
    """A chat-template dict as a LangChain message (the inverse of :func:`convert_message_to_dict`).

    An assistant's ``<tool_call>`` blocks become ``tool_calls`` (ids are new: the template does not carry
    them); a block that does not parse becomes an ``invalid_tool_call``, never an exception.
    """
    role = message.get("role")
    content = content_text(message.get("content"))
    if role == "system":
        return SystemMessage(content=content)
    if role == "user":
        return HumanMessage(content=content)
    if role == "assistant":
        text, calls, invalid = parse_tool_calls(content, tool_names)
        return AIMessage(content=text, tool_calls=calls, invalid_tool_calls=invalid)
    if role == "tool":
        return ToolMessage(content=content, tool_call_id=message.get("tool_call_id") or "")
    if not role:
        msg = f"message has no role: {message!r}"
        raise ValueError(msg)
    return ChatMessage(role=role, content=content)


def convert_messages(messages: Sequence[BaseMessage], tools: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Messages for the chat template; tools (OpenAI schemas) go into the system prompt."""
    dicts = [convert_message_to_dict(m) for m in messages]
    if tools:
        block = TOOLS_SYSTEM_TEMPLATE.format(tools="\n".join(json.dumps(t["function"]) for t in tools))
        if dicts and dicts[0]["role"] == "system":
            dicts[0] = {**dicts[0], "content": f"{dicts[0]['content']}\n\n{block}".strip()}
        else:
            dicts.insert(0, {"role": "system", "content": block})
    return dicts


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_call_json(raw: str) -> ToolCall | InvalidToolCall:
    """One ``{"name": ..., "arguments": {...}}`` object as a tool call, or an invalid one with the reason."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        return invalid_tool_call(name=None, args=raw, id=_call_id(), error=f"invalid JSON: {exc}")
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return invalid_tool_call(name=None, args=raw, id=_call_id(), error="tool call needs a string 'name'")
    args = data.get("arguments", data.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    if not isinstance(args, dict):
        return invalid_tool_call(name=data["name"], args=raw, id=_call_id(), error="'arguments' must be an object")
    return make_tool_call(name=data["name"], args=args, id=_call_id())


def parse_tool_calls(text: str, tool_names: set[str] | None = None) -> tuple[str, list[ToolCall], list[InvalidToolCall]]:
    """Split generated text into (content, tool_calls, invalid_tool_calls).

    Besides ``<tool_call>`` blocks, an answer that is nothing but one JSON call to a bound tool
    (``{"name": "get_weather", "arguments": {...}}``, what small models often emit) is a tool call too.
    """
    bare = text.strip()
    if tool_names and bare.startswith("{") and bare.endswith("}"):
        parsed = parse_tool_call_json(bare)
        if parsed.get("type") == "tool_call" and parsed["name"] in tool_names:
            return "", [parsed], []
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    for match in TOOL_CALL_RE.finditer(text):
        parsed = parse_tool_call_json(match.group(1))
        if parsed.get("type") == "tool_call" and tool_names is not None and parsed["name"] not in tool_names:
            parsed = invalid_tool_call(name=parsed["name"], args=json.dumps(parsed["args"]), id=parsed["id"],
                                       error=f"unknown tool {parsed['name']!r}; available: {sorted(tool_names)}")
        (calls if parsed.get("type") == "tool_call" else invalid).append(parsed)
    content = TOOL_CALL_RE.sub("", text).strip() if (calls or invalid) else text
    return content, calls, invalid


def _closed_arguments(parameters: dict[str, Any] | None) -> dict[str, Any]:
    """A tool's parameter schema with ``additionalProperties: false`` unless it says otherwise.

    A forced call should carry the arguments the tool declares; left open, a small model under the grammar
    can invent keys until the token budget runs out (a tool without arguments is the usual victim).
    """
    schema = dict(parameters or {"type": "object", "properties": {}})
    if schema.get("type") == "object" and "additionalProperties" not in schema:
        schema["additionalProperties"] = False
    return schema


def forced_tool_schema(tools: list[dict[str, Any]], choice: str | None) -> dict[str, Any]:
    """JSON schema of one call to ``choice`` (a tool name) or to any of ``tools`` (``"any"``/``"required"``)."""
    selected = [t for t in tools if choice in (None, "any", "required", True) or t["function"]["name"] == choice]
    if not selected:
        msg = f"tool_choice {choice!r} names no bound tool (bound: {[t['function']['name'] for t in tools]})"
        raise ValueError(msg)
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                "arguments": _closed_arguments(t["function"].get("parameters")),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in selected
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def chat_prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, Any]], *,
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Token ids of chat ``messages`` with the model's chat template and the generation prompt.

    The one rendering every backend uses (the local engine, Tinker/MinT sampling, the trainer's
    re-tokenization): ``apply_chat_template(add_generation_prompt=True, tokenize=False)``, then encoded
    without special tokens, so a prompt is the same tokens everywhere. Not thread-safe: HF fast tokenizers
    are not; callers that share one hold a lock.
    """
    kwargs = {"tools": tools} if tools else {}
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False, **kwargs)
    return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]


def create_usage_metadata(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"input_tokens": prompt_tokens, "output_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
