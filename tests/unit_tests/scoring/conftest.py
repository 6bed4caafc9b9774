"""Scoring test fixtures: a scripted judge and a builder that writes captured conversations to a store."""

from __future__ import annotations

import asyncio
import itertools
import re
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
    message_to_dict,
)
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import Field, PrivateAttr

from langchain_metaclaw.store import TraceStore

T0 = datetime(2024, 1, 1, tzinfo=UTC)
"""Conversations start here by default: long ago, so nothing waits for a next message unless a test says so."""

Answer = str | AIMessage | BaseException | Callable[[list[BaseMessage]], "str | AIMessage | BaseException"]


class ScriptedJudge(BaseChatModel):
    """A judge that answers from ``answer`` (a string, message, exception, or a function of the prompt).

    ``delay`` seconds pass before each answer (``asyncio.sleep`` on the async path), so timeouts are real.
    Every prompt it receives is kept in ``calls``.
    """

    answer: Any = "The turn helped.\nScore: +1"
    delay: float = 0.0
    model_name: str = "scripted-judge"
    calls: list[list[BaseMessage]] = Field(default_factory=list)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def _reply(self, messages: list[BaseMessage]) -> AIMessage:
        with self._lock:
            self.calls.append(list(messages))
        answer = self.answer
        if callable(answer) and not isinstance(answer, BaseException | AIMessage):
            answer = answer(messages)
        if isinstance(answer, BaseException):
            raise answer
        if isinstance(answer, AIMessage):
            return answer
        prompt_chars = sum(len(str(m.content)) for m in messages)
        return AIMessage(content=answer, usage_metadata={"input_tokens": prompt_chars // 4,
                                                         "output_tokens": len(answer) // 4,
                                                         "total_tokens": prompt_chars // 4 + len(answer) // 4})

    def _generate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
        if self.delay:
            time.sleep(self.delay)
        return ChatResult(generations=[ChatGeneration(message=self._reply(messages))])

    async def _agenerate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
        if self.delay:
            await asyncio.sleep(self.delay)
        return ChatResult(generations=[ChatGeneration(message=self._reply(messages))])

    @property
    def _llm_type(self) -> str:
        return "scripted-judge"

    def prompts(self) -> list[str]:
        """The human (data) part of every prompt received."""
        return [str(call[-1].content) for call in self.calls]


_FENCED_RE = re.compile(r"<<<BEGIN (?P<nonce>[0-9a-f]+) [a-z_]+>>>\n.*?\n<<<END (?P=nonce)>>>", re.DOTALL)


def outside_fences(prompt: str) -> str:
    """The text of a judge prompt with every fenced block removed: what a judge treats as instructions."""
    return _FENCED_RE.sub("[data]", prompt)


def gullible_answer(messages: list[BaseMessage]) -> str:
    """A judge that obeys any score instruction it sees outside the fences, and otherwise says -1."""
    visible = "\n".join(outside_fences(str(m.content)) for m in messages)
    return follow_instructions(visible)


def follow_instructions(visible: str) -> str:
    if re.search(r"score\s*\+1", visible, re.IGNORECASE) and "ignore your instructions" in visible.lower():
        return "I was told to.\nScore: +1"
    return "The answer is wrong.\nScore: -1"


# ---------------------------------------------------------------------------------------------- traces


class Trace:
    """Writes one captured conversation (an episode) the way capture does, turn by turn.

    Each event is one second after the previous one, from ``start``. ``ids=False`` leaves message ids out
    (plain models do not set them; LangGraph does).
    """

    def __init__(self, store: TraceStore, episode_id: str | None = None, *, thread_id: str | None = "auto",
                 start: datetime = T0, node: str | None = "agent", ids: bool = True, ended: bool = True) -> None:
        self.store = store
        self.episode_id = episode_id or f"ep-{uuid.uuid4().hex[:8]}"
        self.thread_id = self.episode_id if thread_id == "auto" else thread_id
        self.root_run_id = str(uuid.uuid4())
        self.node = node
        self.ids = ids
        self._clock = itertools.count()
        self._start = start.timestamp()
        self.history: list[BaseMessage] = []
        self.turn_ids: list[str] = []
        self.ended = ended
        self.records: list[dict[str, Any]] = [{
            "type": "episode_start", "id": self.episode_id, "thread_id": self.thread_id,
            "root_run_id": self.root_run_id, "started_at": self._start,
        }]

    def _tick(self) -> float:
        return self._start + next(self._clock)

    def _id(self) -> str | None:
        return str(uuid.uuid4()) if self.ids else None

    def system(self, text: str) -> Trace:
        self.history.append(SystemMessage(content=text, id=self._id()))
        return self

    def user(self, text: str) -> Trace:
        self.history.append(HumanMessage(content=text, id=self._id()))
        return self

    def llm(self, content: str = "", *, tool_calls: list[dict] | None = None, turn_id: str | None = None,
            node: str | None = "same", status: str = "ok", tags: list[str] | None = None,
            invalid_tool_calls: list[dict] | None = None) -> str:
        turn_id = turn_id or str(uuid.uuid4())
        started = self._tick()
        reply = AIMessage(content=content, tool_calls=tool_calls or [], invalid_tool_calls=invalid_tool_calls or [],
                          id=f"run-{turn_id}" if self.ids else None)
        self.records.append({
            "type": "turn", "id": turn_id, "episode_id": self.episode_id, "kind": "llm",
            "started_at": started, "ended_at": started + 0.5, "status": status,
            "input_messages": [message_to_dict(m) for m in self.history],
            "output_message": message_to_dict(reply) if status == "ok" else None,
            "node": self.node if node == "same" else node, "parent_run_id": self.root_run_id,
            "root_run_id": self.root_run_id, "seq": len(self.records), "tags": tags or [],
            "error": None if status == "ok" else "RuntimeError: boom",
        })
        if status == "ok":
            self.history.append(reply)
        self.turn_ids.append(turn_id)
        return turn_id

    def tool(self, call_id: str, name: str, result: str, *, status: str = "ok", args: dict | None = None,
             capture: bool = True) -> str:
        turn_id = str(uuid.uuid4())
        started = self._tick()
        if capture:
            self.records.append({
                "type": "turn", "id": turn_id, "episode_id": self.episode_id, "kind": "tool",
                "started_at": started, "ended_at": started + 0.1, "status": status, "tool_name": name,
                "tool_args": args or {}, "tool_call_id": call_id, "tool_result": result, "node": "tools",
                "parent_run_id": self.root_run_id, "root_run_id": self.root_run_id, "seq": len(self.records),
                "error": result if status == "error" else None,
            })
        self.history.append(ToolMessage(content=result, tool_call_id=call_id, status="error" if status == "error" else "success",
                                        id=self._id()))
        return turn_id

    def commit(self) -> Trace:
        records = list(self.records)
        if self.ended:
            records.append({"type": "episode_end", "id": self.episode_id, "ended_at": self._tick(), "status": "ok"})
        self.store.write_records(records)
        self.records = []
        return self


def call(name: str, args: dict, call_id: str) -> dict:
    return {"name": name, "args": args, "id": call_id, "type": "tool_call"}


@pytest.fixture
def mem_store(tmp_path) -> TraceStore:
    store = TraceStore("sqlite://", spool_dir=tmp_path / "spool")
    yield store
    store.close()


@pytest.fixture
def file_store(tmp_path) -> TraceStore:
    store = TraceStore(f"sqlite:///{tmp_path / 'scoring.db'}", spool_dir=tmp_path / "spool")
    yield store
    store.close()


@pytest.fixture
def judge() -> ScriptedJudge:
    return ScriptedJudge()
