"""Typed records returned by :class:`~langchain_metaclaw.store.TraceStore` reads.

Reads never hand out ORM rows or SQL results: every later stage (scoring, training, status) works on
these pydantic models, so the storage layout can change without touching them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TurnKind = Literal["llm", "tool"]
TokensSource = Literal["engine", "retokenized"]
AdapterStatus = Literal["candidate", "serving", "retired", "rolled_back", "rejected"]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True)


class Episode(_Record):
    """A LangGraph thread, or a single root run when the agent has no thread id."""

    id: str
    thread_id: str | None = None
    root_run_id: str | None = None
    graph_name: str | None = None
    started_at: datetime
    ended_at: datetime | None = None
    status: Literal["running", "ok", "error", "interrupted"] = "running"
    error: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class Turn(_Record):
    """One LLM call or one tool call, with everything RL needs to train on it."""

    id: str
    """The LangChain run id; feedback and scores refer to it."""
    seq: int | None = None
    parent_run_id: str | None = None
    root_run_id: str | None = None
    episode_id: str
    kind: TurnKind
    name: str | None = None
    node: str | None = None
    """LangGraph node that made the call (``langgraph_node`` metadata)."""
    step: int | None = None
    checkpoint_ns: str | None = None
    """LangGraph checkpoint namespace: non-empty inside a sub-graph."""
    started_at: datetime
    ended_at: datetime | None = None
    latency_ms: float | None = None
    status: Literal["ok", "error"]
    error: str | None = None
    input_messages: list[dict[str, Any]] | None = None
    output_message: dict[str, Any] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None
    tool_args: Any = None
    tool_result: str | None = None
    usage: dict[str, int] | None = None
    model_name: str | None = None
    adapter_version: str | None = None
    """Adapter that produced this turn (None: not served by MetaClawChatModel, or the base model)."""
    prompt_token_ids: list[int] | None = None
    completion_token_ids: list[int] | None = None
    logprobs: list[float] | None = None
    tokens_source: TokensSource | None = None
    """``engine``: ids and logprobs are what the engine sampled; ``retokenized``: only text is known."""
    sampling: dict[str, Any] | None = None
    invocation_params: dict[str, Any] | None = None
    tags: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime


class Score(_Record):
    """A reward for one turn from one source (PRM judge, user feedback, or a named rule)."""

    id: int
    turn_id: str
    episode_id: str | None = None
    source: str
    key: str = "reward"
    value: float | None = None
    confidence: float | None = None
    status: Literal["scored", "unscored"] = "scored"
    reason: str | None = None
    attempts: int = 1
    details: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    updated_at: datetime


class Feedback(_Record):
    """Explicit feedback on a run, in the shape of LangSmith's feedback API."""

    id: str
    run_id: str
    key: str = "user_score"
    score: float | None = None
    value: Any = None
    comment: str | None = None
    correction: Any = None
    source_info: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime


class AdapterVersion(_Record):
    """One trained adapter and where it stands in the serving lifecycle."""

    version: str
    parent_version: str | None = None
    backend: str
    base_model: str | None = None
    uri: str
    status: AdapterStatus
    created_at: datetime
    promoted_at: datetime | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    notes: str | None = None


class TrainRun(_Record):
    """One invocation of the trainer, including the ones that did nothing (and why)."""

    id: str
    started_at: datetime
    ended_at: datetime | None = None
    status: Literal["running", "ok", "skipped", "stopped", "interrupted", "error"]
    """``interrupted``: its process died mid-run and a later run resumed from its last checkpoint."""
    reason: str | None = None
    backend: str | None = None
    base_adapter: str | None = None
    candidate_adapter: str | None = None
    steps: int = 0
    samples: list[str] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
