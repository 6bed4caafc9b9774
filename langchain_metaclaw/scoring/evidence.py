"""What the judge sees about one assistant turn, gathered from the store (or from a message list).

For an llm turn the evidence is:

- the turn: its output message (text, tool calls, malformed tool calls);
- the results of its tool calls: the tool turns of the same episode whose ``tool_call_id`` matches a call
  (falling back to ``ToolMessage``s answering the call in a later llm turn's input);
- the preceding context: the turn's own input messages;
- the user's *next* message in the same thread: the first human message in a later llm turn's input
  (same episode) that was not in this turn's input. When the later input contains this turn's output,
  only messages after it count. This is the strongest signal of whether the turn helped.

Everything is normalised to plain JSON-able dicts (``{"role", "content", "tool_calls"}``), so evidence can
sit in LangGraph state under any checkpointer.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from langchain_metaclaw.messages import content_text
from langchain_metaclaw.scoring.types import JUDGE_TAG, MessageView, ToolResult, TurnEvidence

if TYPE_CHECKING:
    from langchain_core.messages import BaseMessage

    from langchain_metaclaw.store.records import Turn
    from langchain_metaclaw.store.trace_store import TraceStore

__all__ = [
    "EpisodeIndex",
    "evidence_from_messages",
    "evidence_from_turn",
    "find_next_user_message",
    "gather_evidence",
    "is_judge_turn",
    "message_view",
]

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool", "function": "tool",
          "chat": "user", "developer": "system", "AIMessageChunk": "assistant", "HumanMessageChunk": "user"}


# ---------------------------------------------------------------------------------------------- messages


def _tool_calls(calls: Any) -> list[dict[str, Any]]:
    out = []
    for call in calls or []:
        if isinstance(call, Mapping):
            if "function" in call and "name" not in call:  # OpenAI wire format in additional_kwargs
                fn = call.get("function") or {}
                out.append({"name": fn.get("name"), "args": fn.get("arguments"), "id": call.get("id")})
            else:
                out.append({"name": call.get("name"), "args": call.get("args"), "id": call.get("id")})
    return out


def message_view(message: Any) -> MessageView:
    """A LangChain message (object, ``message_to_dict`` dict or ``{"role", "content"}`` dict) as a view."""
    is_mapping = type(message) is dict or isinstance(message, Mapping)
    if is_mapping and "data" in message and "type" in message:
        kind, data = message["type"], message.get("data") or {}
    elif is_mapping:
        kind, data = message.get("role") or message.get("type") or "?", message
    elif hasattr(message, "type") and hasattr(message, "content"):
        kind = message.type
        data = {
            "content": message.content,
            "tool_calls": getattr(message, "tool_calls", None),
            "invalid_tool_calls": getattr(message, "invalid_tool_calls", None),
            "tool_call_id": getattr(message, "tool_call_id", None),
            "name": getattr(message, "name", None),
        }
    else:
        kind, data = "human", {"content": str(message)}
    view = MessageView(role=_ROLES.get(kind, kind), content=content_text(data.get("content"), non_text="mark"))
    calls = _tool_calls(data.get("tool_calls"))
    if calls:
        view["tool_calls"] = calls
    invalid = [
        {"name": c.get("name"), "args": c.get("args"), "error": c.get("error")}
        for c in data.get("invalid_tool_calls") or []
        if isinstance(c, Mapping)
    ]
    if invalid:
        view["invalid_tool_calls"] = invalid
    if data.get("tool_call_id"):
        view["tool_call_id"] = str(data["tool_call_id"])
    if data.get("name"):
        view["name"] = str(data["name"])
    return view


def _message_id(record: Any) -> str | None:
    if isinstance(record, Mapping):
        data = record.get("data") if "data" in record else record
        value = (data or {}).get("id")
    else:
        value = getattr(record, "id", None)
    return str(value) if value else None


def _identity(record: Any) -> tuple[str, str]:
    """Content identity of a message (role, content, tool calls), used when ids are missing."""
    view = message_view(record)
    calls = [(c.get("name"), json.dumps(c.get("args"), sort_keys=True, default=str)) for c in view.get("tool_calls", [])]
    return view["role"], json.dumps([view.get("content", ""), calls], default=str)


def _role(record: Any) -> str:
    """A message's role without building its view (hot path: every message of every later input)."""
    if type(record) is dict or isinstance(record, Mapping):
        kind = record.get("type") if "data" in record else (record.get("role") or record.get("type"))
    else:
        kind = getattr(record, "type", None)
    return _ROLES.get(kind, kind) if isinstance(kind, str) else "?"


# ---------------------------------------------------------------------------------------------- evidence

MAX_LOOKAHEAD = 64
"""Later llm turns searched for the user's next message (an agent's own tool loop rarely runs longer)."""


def is_judge_turn(turn: Turn) -> bool:
    """True for a captured call of the PRM judge itself (never scored)."""
    return JUDGE_TAG in (turn.tags or [])


class _Membership:
    """Is a message one of ``messages``? By id when both sides have one, else by content identity (lazy)."""

    def __init__(self, messages: Sequence[Any]) -> None:
        self._messages = messages
        self._ids: set[str] | None = None
        self._identities: set[tuple[str, str]] | None = None

    def __contains__(self, message: Any) -> bool:
        if self._ids is None:
            self._ids = {i for i in (_message_id(m) for m in self._messages) if i}
        mid = _message_id(message)
        if mid and mid in self._ids:
            return True
        if self._identities is None:
            self._identities = {_identity(m) for m in self._messages}
        return _identity(message) in self._identities


def _same_message(a: Any, b: Any) -> bool:
    ida, idb = _message_id(a), _message_id(b)
    if ida and idb:
        return ida == idb
    return _identity(a) == _identity(b)


def _anchor(messages: Sequence[Any], output: Any, natural_from: int) -> int | None:
    """Index just after ``output`` in ``messages``, or ``None``.

    An append-only history puts it right after the turn's own input (``natural_from``): that copy is checked
    first (O(1)) and wins over an identical earlier answer; otherwise the last copy found.
    """
    if natural_from < len(messages):
        candidate = messages[natural_from]
        if _role(candidate) == "assistant" and _same_message(candidate, output):
            return natural_from + 1
    out_id = _message_id(output)
    out_identity: tuple[str, str] | None = None
    found = None
    for index, message in enumerate(messages):
        if _role(message) != "assistant":
            continue
        mid = _message_id(message)
        if mid and out_id:
            same = mid == out_id
        else:
            out_identity = out_identity or _identity(output)
            same = _identity(message) == out_identity
        if same:
            found = index + 1
    return found


def find_next_user_message(turn: Turn, later_llm_turns: Iterable[Turn], *,
                           lookahead: int = MAX_LOOKAHEAD) -> str | None:
    """The user's next message after ``turn``, from the inputs of later llm turns of the same episode.

    In each later input (oldest turn first), if ``turn``'s output message is found (by message id, else by
    role, text and tool calls), the first human message after it is the answer; otherwise the first human
    message that is not in ``turn``'s input. Later inputs with no new human message (the agent's own tool
    loop) are passed over, up to ``lookahead`` of them.
    """
    own_input = list(turn.input_messages or [])
    own = _Membership(own_input)
    output = turn.output_message
    natural = len(own_input)
    checked = 0  # with an append-only history, later inputs share the prefix already searched
    for n, later in enumerate(later_llm_turns):
        if n >= lookahead:
            break
        messages = later.input_messages or []
        start = _anchor(messages, output, natural) if output is not None else None
        if start == natural + 1:
            begin, checked = max(start, checked), len(messages)
        else:
            begin, checked = (start or 0), 0
        for message in messages[begin:]:
            if _role(message) != "user" or (start is None and message in own):
                continue
            return message_view(message).get("content", "")
    return None


class EpisodeIndex:
    """The turns of one episode with the look-ups evidence needs, built once per episode."""

    def __init__(self, turns: Sequence[Turn]) -> None:
        self.turns = list(turns)
        self.position = {t.id: i for i, t in enumerate(self.turns)}
        self.tool_by_call_id = {t.tool_call_id: t for t in self.turns if t.kind == "tool" and t.tool_call_id}
        self._llm_positions = [i for i, t in enumerate(self.turns)
                               if t.kind == "llm" and not is_judge_turn(t) and t.input_messages]

    def later_llm(self, turn: Turn) -> Iterator[Turn]:
        """llm turns after ``turn`` (judge calls and turns without input left out), oldest first."""
        position = self.position.get(turn.id)
        if position is None:
            yield from (self.turns[i] for i in self._llm_positions if self.turns[i].started_at > turn.started_at)
            return
        for i in self._llm_positions[bisect.bisect_right(self._llm_positions, position):]:
            yield self.turns[i]


def _tool_results(output: MessageView, index: EpisodeIndex, turn: Turn) -> list[ToolResult]:
    calls = output.get("tool_calls") or []
    results: list[ToolResult] = []
    for call in calls:
        call_id = call.get("id")
        tool = index.tool_by_call_id.get(call_id) if call_id else None
        if tool is not None:
            results.append(ToolResult(tool_call_id=call_id, name=tool.tool_name or tool.name or call.get("name"),
                                      args=tool.tool_args if tool.tool_args is not None else call.get("args"),
                                      status=tool.status,
                                      result=tool.tool_result if tool.tool_result is not None else tool.error))
            continue
        if not call_id:
            continue
        # the tool turn was not captured: use the ToolMessage the model saw next
        for n, later in enumerate(index.later_llm(turn)):
            if n >= MAX_LOOKAHEAD:
                break
            message = next((m for m in later.input_messages or []
                            if _role(m) == "tool" and message_view(m).get("tool_call_id") == call_id), None)
            if message is not None:
                status = (message.get("data") or message).get("status") if isinstance(message, Mapping) else None
                results.append(ToolResult(tool_call_id=call_id, name=call.get("name"), args=call.get("args"),
                                          status="error" if status == "error" else "ok",
                                          result=message_view(message).get("content")))
                break
    return results


def evidence_from_turn(turn: Turn, episode_turns: Sequence[Turn] | EpisodeIndex) -> TurnEvidence:
    """Evidence for llm ``turn`` given all turns of its episode (in store order, or an :class:`EpisodeIndex`)."""
    index = episode_turns if isinstance(episode_turns, EpisodeIndex) else EpisodeIndex(episode_turns)
    output = message_view(turn.output_message or {"type": "ai", "data": {"content": ""}})
    output["role"] = "assistant"
    end = turn.ended_at or turn.created_at
    return TurnEvidence(
        turn_id=turn.id,
        episode_id=turn.episode_id,
        node=turn.node,
        context=[message_view(m) for m in turn.input_messages or []],
        output=output,
        tool_results=_tool_results(output, index, turn),
        next_user_message=find_next_user_message(turn, index.later_llm(turn)),
        next_message_note=None,
        ended_at=end.timestamp() if end else None,
    )


def gather_evidence(store: TraceStore, turn_id: str) -> TurnEvidence:
    """Evidence for one llm turn, read from ``store``."""
    turn = store.turn(turn_id)
    if turn is None:
        msg = f"no turn with id {turn_id!r} in {store!r}"
        raise ValueError(msg)
    if turn.kind != "llm":
        msg = f"turn {turn_id!r} is a {turn.kind} turn; only llm (assistant) turns are judged"
        raise ValueError(msg)
    return evidence_from_turn(turn, store.turns(episode_id=turn.episode_id))


def evidence_from_messages(messages: Sequence[BaseMessage | Mapping[str, Any]]) -> TurnEvidence:
    """Evidence from a conversation: the last assistant message is the turn to grade.

    Messages before it are the context, tool messages after it answering its calls are its tool results,
    and the first user message after it is the user's next message.
    """
    views = [message_view(m) for m in messages]
    index = max((i for i, v in enumerate(views) if v["role"] == "assistant"), default=None)
    if index is None:
        msg = "evidence_from_messages needs at least one assistant (AI) message: the turn to grade"
        raise ValueError(msg)
    output = views[index]
    call_ids = {c.get("id") for c in output.get("tool_calls") or [] if c.get("id")}
    calls = {c.get("id"): c for c in output.get("tool_calls") or []}
    results: list[ToolResult] = []
    next_user = None
    for message, view in zip(messages[index + 1:], views[index + 1:], strict=True):
        if view["role"] == "tool" and view.get("tool_call_id") in call_ids:
            call = calls[view["tool_call_id"]]
            status = getattr(message, "status", None)
            if isinstance(message, Mapping):
                status = (message.get("data") or message).get("status")
            results.append(ToolResult(tool_call_id=view["tool_call_id"], name=call.get("name"), args=call.get("args"),
                                      status="error" if status == "error" else "ok", result=view.get("content")))
        elif view["role"] == "user" and next_user is None:
            next_user = view.get("content", "")
    return TurnEvidence(
        turn_id=None,
        context=views[:index],
        output=output,
        tool_results=results,
        next_user_message=next_user,
        next_message_note=None if next_user is not None else "the conversation ends with this turn",
    )
