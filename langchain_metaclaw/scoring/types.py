"""What the scoring modules share: the judge's tag and the evidence the judge is shown about a turn.

Plain data with no behaviour, so :mod:`~langchain_metaclaw.scoring.evidence` (which gathers evidence) and
:mod:`~langchain_metaclaw.scoring.judge` (which prompts from it) both import it and not each other.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

from langchain_metaclaw.store.scores import JUDGE_TAG  # its home is the store: its queries skip judge calls

__all__ = ["JUDGE_TAG", "MessageView", "ToolResult", "TurnEvidence"]


class MessageView(TypedDict, total=False):
    """A message as the judge sees it."""

    role: str
    """``user`` | ``assistant`` | ``system`` | ``tool``."""
    content: str
    tool_calls: list[dict[str, Any]]
    invalid_tool_calls: list[dict[str, Any]]
    tool_call_id: str
    name: str


class ToolResult(TypedDict):
    """What one of the turn's tool calls returned."""

    tool_call_id: str | None
    name: str | None
    args: Any
    status: str
    """``ok`` | ``error``."""
    result: str | None


class TurnEvidence(TypedDict):
    """Everything the judge is shown about one assistant turn."""

    turn_id: NotRequired[str | None]
    episode_id: NotRequired[str | None]
    node: NotRequired[str | None]
    """LangGraph node that made the call (selects the rubric)."""
    context: list[MessageView]
    """The turn's input messages."""
    output: MessageView
    """The turn's output message (``role="assistant"``)."""
    tool_results: list[ToolResult]
    next_user_message: str | None
    """The user's next message in the thread; ``None`` when there is none (yet)."""
    next_message_note: NotRequired[str | None]
    """Why there is no next message (shown to the judge and kept in the score's details)."""
    ended_at: NotRequired[float | None]
    """When the turn ended (epoch seconds), for the wait-for-the-next-message rule."""
