"""Pure conversion of LangChain callback events into capture records (no I/O here).

A record is a plain, JSON-ready dict; ``TraceStore.write_records`` understands three types:
``episode_start`` (which carries the end too when the episode ends in the event that starts it), ``turn``
(one per LLM call and one per tool call, written when the run ends) and ``episode_end``. Serialisation is hand-rolled for the message fields RL needs because it runs on the
agent's thread and ``model_dump`` of every message would cost more than the whole capture budget.
"""

from __future__ import annotations

from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, LLMResult

METACLAW_METADATA_KEY = "metaclaw"
"""``AIMessage.response_metadata[METACLAW_METADATA_KEY]``: engine token ids, logprobs, adapter version."""

_ENGINE_FIELDS = ("prompt_token_ids", "completion_token_ids", "logprobs")


def message_to_record(message: BaseMessage) -> dict[str, Any]:
    """The subset of a message that round-trips through ``messages_from_dict``."""
    data: dict[str, Any] = {"content": message.content}
    if message.id:
        data["id"] = message.id
    if message.name:
        data["name"] = message.name
    if message.additional_kwargs:
        data["additional_kwargs"] = message.additional_kwargs
    if isinstance(message, AIMessage):
        if message.tool_calls:
            data["tool_calls"] = message.tool_calls
        if message.invalid_tool_calls:
            data["invalid_tool_calls"] = message.invalid_tool_calls
        if message.usage_metadata:
            data["usage_metadata"] = dict(message.usage_metadata)
        if message.response_metadata:
            data["response_metadata"] = message.response_metadata
    elif isinstance(message, ToolMessage):
        data["tool_call_id"] = message.tool_call_id
        if message.status != "success":
            data["status"] = message.status
    return {"type": message.type, "data": data}


def llm_output_fields(response: LLMResult) -> dict[str, Any]:
    """Output message, usage, model name and engine tokens of a finished chat-model run."""
    generation = response.generations[0][0] if response.generations and response.generations[0] else None
    fields: dict[str, Any] = {"tokens_source": "retokenized"}
    if generation is None:
        return fields
    if isinstance(generation, ChatGeneration):
        message = generation.message
        fields["output_message"] = message_to_record(message)
        meta = message.response_metadata or {}
        fields["model_name"] = meta.get("model_name") or meta.get("model")
        usage = getattr(message, "usage_metadata", None)
        if usage:
            fields["usage"] = {k: usage[k] for k in ("input_tokens", "output_tokens", "total_tokens") if k in usage}
        engine = meta.get(METACLAW_METADATA_KEY)
        if isinstance(engine, dict):
            fields["adapter_version"] = engine.get("adapter_version")
            if all(engine.get(k) is not None for k in _ENGINE_FIELDS):
                for key in _ENGINE_FIELDS:
                    fields[key] = list(engine[key])
                fields["tokens_source"] = engine.get("tokens_source", "engine")
            if engine.get("sampling") is not None:
                fields["sampling"] = engine["sampling"]
    else:  # a completion LLM: text only
        fields["output_message"] = {"type": "ai", "data": {"content": generation.text}}
    if not fields.get("usage") and response.llm_output:
        usage = response.llm_output.get("token_usage") or response.llm_output.get("usage")
        if isinstance(usage, dict):
            fields["usage"] = {
                "input_tokens": usage.get("prompt_tokens", usage.get("input_tokens")),
                "output_tokens": usage.get("completion_tokens", usage.get("output_tokens")),
                "total_tokens": usage.get("total_tokens"),
            }
    if not fields.get("model_name") and response.llm_output:
        fields["model_name"] = response.llm_output.get("model_name")
    return fields


def tool_result_text(output: Any) -> tuple[str, str | None]:
    """(text, status) of a tool's return value; ``ToolMessage`` outputs keep their error status."""
    if isinstance(output, ToolMessage):
        content = output.content if isinstance(output.content, str) else str(output.content)
        return content, output.status
    if isinstance(output, str):
        return output, None
    return str(output), None


def graph_fields(metadata: dict[str, Any] | None) -> dict[str, Any]:
    """LangGraph coordinates from callback metadata: node, step, sub-graph namespace, thread."""
    if not metadata:
        return {}
    ns = metadata.get("checkpoint_ns") or metadata.get("langgraph_checkpoint_ns")
    return {
        "node": metadata.get("langgraph_node"),
        "step": metadata.get("langgraph_step"),
        "checkpoint_ns": ns or None,
        "thread_id": metadata.get("thread_id"),
    }


_DROP_METADATA = frozenset(
    {"langgraph_node", "langgraph_step", "checkpoint_ns", "langgraph_checkpoint_ns", "thread_id",
     "langgraph_triggers", "langgraph_path"}
)
_SCALARS = (str, int, float)  # bool is an int


def extra_metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
    """User metadata worth keeping (graph coordinates already have their own columns)."""
    if not metadata:
        return {}
    return {k: v for k, v in metadata.items() if k not in _DROP_METADATA and isinstance(v, _SCALARS)}
