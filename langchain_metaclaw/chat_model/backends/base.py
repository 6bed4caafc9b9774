"""The serving-backend protocol: one request shape in, one completion shape out, adapters by version."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol


@dataclass(frozen=True)
class CompletionRequest:
    """What the chat model asks a backend for (messages already in chat-template form)."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    """OpenAI tool schemas; backends with native tool calling send them, others already have them in the prompt."""
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    stop: list[str] | None = None
    seed: int | None = None
    json_schema: dict[str, Any] | None = None
    """Constrain the output to this schema (forced tool calls, structured output)."""


@dataclass(frozen=True)
class Completion:
    """One completion with what RL needs: engine tokens and behaviour logprobs when the backend has them."""

    text: str
    finish_reason: Literal["stop", "length", "tool_calls"]
    prompt_token_ids: list[int] | None
    completion_token_ids: list[int] | None
    logprobs: list[float] | None
    adapter_version: str | None
    model_name: str
    sampling: dict[str, Any] = field(default_factory=dict)
    tool_calls: list[dict[str, Any]] | None = None
    """Tool calls the backend parsed itself (OpenAI-compatible servers); ``None`` means parse ``text``."""
    usage: dict[str, int] | None = None


class ServingBackend(Protocol):
    """A model that serves a base plus named adapter versions, each request pinned to one version."""

    name: str

    def complete(self, request: CompletionRequest, adapter: str | None) -> Completion: ...

    def stream(self, request: CompletionRequest, adapter: str | None) -> Iterator[tuple[str, Completion | None]]:
        """Text deltas, then ``("", completion)``."""
        ...

    def load_adapter(self, version: str, uri: str) -> None:
        """Validate and load ``version`` so requests can pin it; raises ``AdapterError`` and changes nothing."""
        ...

    def unload_adapter(self, version: str) -> None: ...
