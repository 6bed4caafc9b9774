"""``invoke`` and ``stream`` shape the same completion into the same message (no model: a scripted backend).

The chat model parses tool calls once (``_message``) and derives the final stream chunk from that message, so
for the same backend output the aggregated stream and ``invoke`` agree on ``content``, ``tool_calls``,
``invalid_tool_calls`` and the engine token ids. A forced call that does not parse used to come back from
``stream`` as nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.tools import tool

from langchain_metaclaw.chat_model.backends.base import Completion, CompletionRequest
from langchain_metaclaw.chat_model.base import MetaClawChatModel


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"sunny in {city}"


class _Scripted:
    """A serving backend that answers every request with ``text`` (streamed in 3-character deltas)."""

    name = "scripted"

    def __init__(self, text: str, finish_reason: str = "stop") -> None:
        self.text = text
        self.finish_reason = finish_reason

    def _completion(self) -> Completion:
        ids = [100 + i for i in range(len(self.text))]
        return Completion(text=self.text, finish_reason=self.finish_reason, prompt_token_ids=[1, 2, 3],  # type: ignore[arg-type]
                          completion_token_ids=ids, logprobs=[-0.5] * len(ids), adapter_version=None,
                          model_name="scripted-model", sampling={"temperature": 0.0})

    def complete(self, request: CompletionRequest, adapter: str | None) -> Completion:
        return self._completion()

    def stream(self, request: CompletionRequest, adapter: str | None) -> Iterator[tuple[str, Completion | None]]:
        for i in range(0, len(self.text), 3):
            yield self.text[i : i + 3], None
        yield "", self._completion()

    def load_adapter(self, version: str, uri: str) -> None:
        raise NotImplementedError

    def unload_adapter(self, version: str) -> None:
        raise NotImplementedError


def _model(monkeypatch: pytest.MonkeyPatch, text: str, finish_reason: str = "stop") -> MetaClawChatModel:
    monkeypatch.setattr(MetaClawChatModel, "_build_backend", lambda self: _Scripted(text, finish_reason))
    return MetaClawChatModel(temperature=0)


def _aggregate(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    """What ``generate_from_stream`` (and so ``invoke`` under a streaming callback) makes of the chunks."""
    return chunks[0] + chunks[1:]


def _calls(message: AIMessage) -> list[tuple[Any, Any]]:
    return [(c["name"], c["args"]) for c in message.tool_calls]


def _invalid(message: AIMessage) -> list[tuple[Any, Any]]:
    return [(c["name"], c["args"]) for c in message.invalid_tool_calls]


FORCED_VALID = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
AUTO_VALID = 'Let me check.<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
AUTO_INVALID = "Let me check.<tool_call>not json</tool_call>"
PLAIN = "The capital of France is Paris."


@pytest.mark.parametrize(
    ("text", "tool_choice", "calls", "invalid"),
    [
        (FORCED_VALID, "get_weather", [("get_weather", {"city": "Paris"})], []),
        ("I cannot call tools.", "get_weather", [], [(None, "I cannot call tools.")]),
        (AUTO_VALID, None, [("get_weather", {"city": "Rome"})], []),
        (AUTO_INVALID, None, [], [(None, "not json")]),
        (PLAIN, None, [], []),
    ],
    ids=["forced-valid", "forced-invalid", "auto-valid", "auto-invalid", "plain-text"],
)
def test_stream_aggregates_to_what_invoke_returns(monkeypatch, text, tool_choice, calls, invalid) -> None:
    llm = _model(monkeypatch, text).bind_tools([get_weather], tool_choice=tool_choice)
    invoked = llm.invoke("Weather in Paris?")
    chunks = list(llm.stream("Weather in Paris?"))
    streamed = _aggregate(chunks)
    assert (_calls(invoked), _invalid(invoked)) == (calls, invalid)
    assert (_calls(streamed), _invalid(streamed)) == (calls, invalid)
    assert streamed.content == invoked.content
    assert streamed.response_metadata["finish_reason"] == invoked.response_metadata["finish_reason"]
    assert streamed.response_metadata["metaclaw"] == invoked.response_metadata["metaclaw"]
    assert streamed.usage_metadata == invoked.usage_metadata


def test_plain_text_is_streamed_in_deltas(monkeypatch) -> None:
    chunks = list(_model(monkeypatch, PLAIN).stream("Capital of France?"))
    assert len(chunks) > 2 and "".join(str(c.content) for c in chunks) == PLAIN
    assert [c.chunk_position for c in chunks][-1] == "last"
    assert _aggregate(chunks).response_metadata["metaclaw"]["completion_token_ids"] == list(range(100, 100 + len(PLAIN)))


def test_a_truncated_forced_call_is_invalid_in_the_streamed_message_too(monkeypatch) -> None:
    """The streamed chunk carries ``invoke``'s invalid call as it is, reason included.

    (Adding chunks makes langchain-core re-read every ``tool_call_chunk`` with its lenient partial-JSON parser,
    which reads a cut-off JSON object as a call; the chunk itself and ``stream`` consumers see the invalid call.)
    """
    truncated = '{"name": "get_weather", "arguments": {"ci'
    llm = _model(monkeypatch, truncated, finish_reason="length").bind_tools([get_weather], tool_choice="get_weather")
    invoked = llm.invoke("Weather in Paris?")
    (chunk,) = list(llm.stream("Weather in Paris?"))
    assert invoked.tool_calls == chunk.tool_calls == []
    assert [(c["args"], c["error"]) for c in chunk.invalid_tool_calls] == [
        (c["args"], c["error"]) for c in invoked.invalid_tool_calls
    ]
    assert "invalid JSON" in chunk.invalid_tool_calls[0]["error"]
    assert [c["args"] for c in chunk.tool_call_chunks] == [truncated]
    assert chunk.response_metadata["finish_reason"] == "length"
