"""The PRM scorer as a LangGraph graph: evidence -> judge prompt -> N parallel votes -> majority -> score.

Key components:

- :func:`create_prm_graph` builds and compiles the graph; use it standalone (``invoke`` / ``ainvoke`` /
  ``abatch``) or add it as a node of your own ``StateGraph`` (it reads ``messages``, ``evidence`` or
  ``turn_id`` from the parent state and writes ``score``, ``confidence``, ``status``, ``reason``, ``votes``
  and ``details`` back).
- :class:`PRMState` (with :class:`PRMInput` / :class:`PRMOutput`): the graph's state.
- Nodes ``prepare`` -> ``vote`` -> ``aggregate`` (-> ``record`` when a store is given).

>>> graph = create_prm_graph(ChatOpenAI(model="gpt-4o-mini"), votes=3, vote_timeout=20)   # doctest: +SKIP
>>> graph.invoke({"messages": [HumanMessage("2+2?"), AIMessage("4"), HumanMessage("thanks!")]})  # doctest: +SKIP
{'score': 1.0, 'confidence': 1.0, 'status': 'scored', 'reason': '3/3 valid votes +1: ...', ...}

Inside a user graph::

    class State(TypedDict):
        messages: Annotated[list[AnyMessage], add_messages]
        score: NotRequired[float | None]
        status: NotRequired[str]

    builder = StateGraph(State)
    builder.add_node("agent", call_model)
    builder.add_node("prm", create_prm_graph(judge))       # grades the agent's last answer
    builder.add_edge(START, "agent"); builder.add_edge("agent", "prm"); builder.add_edge("prm", END)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, NotRequired, TypedDict

from langchain_core.messages import AnyMessage, BaseMessage
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from langgraph.graph import END, START, StateGraph

from langchain_metaclaw.errors import ConfigurationError
from langchain_metaclaw.scoring.evidence import evidence_from_messages, gather_evidence
from langchain_metaclaw.scoring.judge import (
    Aggregate,
    Vote,
    aggregate_votes,
    ajudge_votes,
    build_judge_messages,
    check_aggregate,
    failure_counts,
    judge_config,
    judge_name,
    judge_votes,
    resolve_rubric,
    unscored_reason,
)
from langchain_metaclaw.scoring.types import TurnEvidence
from langchain_metaclaw.store.scores import PRM_SOURCE, REWARD_KEY

try:  # LangGraph's sync/async node wrapper; guarded because the module is private
    from langgraph._internal._runnable import RunnableCallable as _RunnableCallable
except ImportError:  # pragma: no cover
    _RunnableCallable = None

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel
    from langgraph.graph.state import CompiledStateGraph
    from langgraph.types import Checkpointer

    from langchain_metaclaw.store.trace_store import TraceStore

__all__ = ["AGGREGATE", "PREPARE", "RECORD", "VOTE", "PRMInput", "PRMOutput", "PRMState", "create_prm_graph"]

PREPARE = "prepare"
VOTE = "vote"
AGGREGATE = "aggregate"
RECORD = "record"

MISSING_INPUT_ERROR = (
    "The PRM graph grades one assistant turn and needs one of: 'evidence' (a TurnEvidence), 'turn_id' (a "
    "captured llm turn; needs create_prm_graph(..., store=...)), or 'messages' (a conversation with at least "
    "one AI message: the last one is graded). Got state keys: {keys}."
)
TURN_ID_WITHOUT_STORE_ERROR = (
    "The PRM graph got 'turn_id'={turn_id!r} but was built without a store to read it from: pass "
    "create_prm_graph(..., store=store), or pass 'evidence' / 'messages' instead."
)
BAD_EVIDENCE_ERROR = "'evidence' must be a mapping with an 'output' message (see TurnEvidence); got {value!r:.200}"


class PRMInput(TypedDict):
    """What the graph reads: the first of ``evidence``, ``turn_id`` (with a store), ``messages``."""

    evidence: NotRequired[TurnEvidence]
    turn_id: NotRequired[str | None]
    messages: NotRequired[list[AnyMessage]]


class PRMOutput(TypedDict):
    """What the graph writes (and, used as a sub-graph, returns to the parent's matching keys)."""

    turn_id: NotRequired[str | None]
    score: NotRequired[float | None]
    """-1.0, 0.0 or +1.0 (majority of the valid votes); ``None`` while unscored."""
    confidence: NotRequired[float | None]
    """Share of the valid votes that agree with ``score``."""
    status: NotRequired[Literal["scored", "unscored"]]
    reason: NotRequired[str]
    """The winning votes' reasoning, or why no vote counted (e.g. ``3/3 votes unparseable``)."""
    votes: NotRequired[list[Vote]]
    details: NotRequired[dict[str, Any]]


class PRMState(PRMInput, PRMOutput):
    """The full state: input, output and the judge prompt built for this turn."""

    prompt: NotRequired[list[BaseMessage]]


def _aggregate_label(aggregate: Aggregate) -> str:
    return aggregate if isinstance(aggregate, str) else getattr(aggregate, "__name__", "custom")


_SCORE_LINE_RE = re.compile(r"^\W*score\W*[:=].*$", re.IGNORECASE | re.MULTILINE)


def _reasoning(text: str, limit: int = 300) -> str:
    text = " ".join(_SCORE_LINE_RE.sub("", text).split())
    return text[:limit] + ("..." if len(text) > limit else "")


def _node(func: Callable[..., Any], afunc: Callable[..., Awaitable[Any]] | None = None, *, name: str) -> Runnable:
    """A node with a sync and an async body, so ``ainvoke`` never hops to a thread for a cheap step.

    ``afunc`` defaults to running ``func`` inline (the step is pure CPU and short). LangGraph's own wrapper
    (what ``langgraph.prebuilt`` uses) is untraced like a plain-function node; ``RunnableLambda`` is the
    public fallback (it adds one traced run per node).
    """
    if afunc is None:
        async def afunc(*args: Any, **kwargs: Any) -> Any:
            return func(*args, **kwargs)

        functools.update_wrapper(afunc, func)
    if _RunnableCallable is not None:
        return _RunnableCallable(func, afunc, name=name, trace=False)
    return RunnableLambda(func, afunc=afunc, name=name)  # pragma: no cover - older/newer LangGraph layouts


def _read_evidence(state: PRMState, store: TraceStore | None) -> TurnEvidence:
    """The turn to grade, from the first of ``evidence``, ``turn_id`` (read from ``store``), ``messages``."""
    evidence = state.get("evidence")
    if evidence is not None:
        if not isinstance(evidence, Mapping) or not isinstance(evidence.get("output"), Mapping):
            raise ValueError(BAD_EVIDENCE_ERROR.format(value=evidence))
        return evidence  # type: ignore[return-value]
    turn_id = state.get("turn_id")
    if turn_id:
        if store is None:
            raise ValueError(TURN_ID_WITHOUT_STORE_ERROR.format(turn_id=turn_id))
        return gather_evidence(store, turn_id)
    messages = state.get("messages")
    if messages:
        return evidence_from_messages(messages)
    raise ValueError(MISSING_INPUT_ERROR.format(keys=sorted(k for k, v in state.items() if v is not None)))


def _check_options(votes: int, vote_timeout: float, aggregate: Aggregate) -> None:
    if not isinstance(votes, int) or votes < 1:
        msg = f"votes must be an integer >= 1, got {votes!r}"
        raise ConfigurationError(msg)
    if not vote_timeout or vote_timeout <= 0:
        msg = f"vote_timeout must be > 0 seconds, got {vote_timeout!r}"
        raise ConfigurationError(msg)
    check_aggregate(aggregate)


class _PRMNodes:
    """The graph's node bodies, bound to one judge and its options (what ``create_prm_graph`` was given)."""

    def __init__(self, judge: BaseChatModel, *, votes: int, vote_timeout: float,
                 rubric: str | Mapping[str, str] | None, aggregate: Aggregate, store: TraceStore | None) -> None:
        self.judge, self.votes, self.vote_timeout = judge, votes, vote_timeout
        self.rubric, self.aggregate, self.store = rubric, aggregate, store
        self.judge_label = judge_name(judge)
        self.aggregate_label = _aggregate_label(aggregate)
        # File databases: commit on one writer thread so the event loop keeps judging during the disk write.
        # In-memory SQLite shares one connection (StaticPool), so it is written inline.
        self.writer = None
        if store is not None and not store.single_connection:
            self.writer = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                                thread_name_prefix="metaclaw-prm-writer")

    def prepare(self, state: PRMState) -> dict[str, Any]:
        evidence = _read_evidence(state, self.store)
        return {"evidence": evidence, "turn_id": evidence.get("turn_id"),
                "prompt": build_judge_messages(evidence, self.rubric)}

    def vote(self, state: PRMState, config: RunnableConfig) -> dict[str, Any]:
        return {"votes": judge_votes(self.judge, state["prompt"], votes=self.votes, timeout=self.vote_timeout,
                                     config=judge_config(config))}

    async def avote(self, state: PRMState, config: RunnableConfig) -> dict[str, Any]:
        return {"votes": await ajudge_votes(self.judge, state["prompt"], votes=self.votes,
                                            timeout=self.vote_timeout, config=judge_config(config))}

    def _details(self, evidence: TurnEvidence, cast_votes: list[Vote], valid: list[Vote]) -> dict[str, Any]:
        has_next = evidence.get("next_user_message") is not None
        details: dict[str, Any] = {
            "scale": "-1|0|+1",
            "judge": self.judge_label,
            "votes": [v["value"] for v in cast_votes],
            "outcomes": [v["outcome"] for v in cast_votes],
            "valid_votes": len(valid),
            "total_votes": len(cast_votes),
            "failures": failure_counts(cast_votes),
            "aggregate": self.aggregate_label,
            "rubric": resolve_rubric(self.rubric, evidence.get("node"))[1],
            "node": evidence.get("node"),
            "next_user_message": "present" if has_next else "absent",
            "tool_results": len(evidence.get("tool_results") or []),
            "answers": [v["text"][:300] for v in cast_votes],
        }
        if not has_next:
            details["next_message_note"] = evidence.get("next_message_note") or "the user has not replied"
        return details

    def aggregate_node(self, state: PRMState) -> dict[str, Any]:
        cast_votes: list[Vote] = state.get("votes") or []
        valid = [v for v in cast_votes if v["outcome"] == "ok" and v["value"] is not None]
        details = self._details(state["evidence"], cast_votes, valid)
        if not valid:
            return {"score": None, "confidence": None, "status": "unscored",
                    "reason": unscored_reason(cast_votes), "details": details}
        value, confidence = aggregate_votes([v["value"] for v in valid], self.aggregate)
        agreeing = [v for v in valid if v["value"] == value]
        why = _reasoning(agreeing[0]["text"]) if agreeing else ""
        reason = f"{len(agreeing)}/{len(valid)} valid votes {value:+g}" + (f": {why}" if why else "")
        return {"score": value, "confidence": confidence, "status": "scored", "reason": reason, "details": details}

    def record(self, state: PRMState) -> dict[str, Any]:
        turn_id = state.get("turn_id")
        score = None
        if turn_id:
            score = {
                "turn_id": turn_id,
                "episode_id": state["evidence"].get("episode_id"),
                "source": PRM_SOURCE,
                "key": REWARD_KEY,
                "value": state.get("score"),
                "confidence": state.get("confidence"),
                "status": state["status"],
                "reason": state.get("reason"),
                "details": state.get("details"),
            }
        self.store.record_prm_result(score=score, turn_id=turn_id, judge=self.judge_label,
                                     votes=state.get("votes") or [])
        return {}

    async def arecord(self, state: PRMState) -> dict[str, Any]:
        if self.writer is None:
            return self.record(state)
        return await asyncio.get_running_loop().run_in_executor(self.writer, self.record, state)


def create_prm_graph(
    judge: BaseChatModel,
    *,
    votes: int = 3,
    vote_timeout: float = 30.0,
    rubric: str | Mapping[str, str] | None = None,
    aggregate: Aggregate = "majority",
    store: TraceStore | None = None,
    checkpointer: Checkpointer = None,
    name: str = "prm_scorer",
) -> CompiledStateGraph:
    """Build the process-reward-model graph that grades one assistant turn with ``votes`` judge calls.

    Args:
        judge (`BaseChatModel`): any LangChain chat model; it should answer ``Score: +1 | 0 | -1``.
        votes (`int`, defaults to 3): judge calls per turn, made in parallel.
        vote_timeout (`float`, defaults to 30.0): seconds per call (``asyncio.wait_for``); a late call is a
            ``timeout`` vote, dropped and counted, never read as 0.
        rubric (`str | dict[str, str]`, *optional*): grading instructions; a dict is keyed by LangGraph node
            name, with ``"*"`` as its fallback (default: :data:`~langchain_metaclaw.scoring.judge.DEFAULT_RUBRIC`).
        aggregate (`"majority" | "mean" | "min" | callable`, defaults to ``"majority"``): how valid votes
            become one score (majority: most frequent value, a tie is 0).
        store (`TraceStore`, *optional*): adds a ``record`` node that commits the score (``source="prm"``)
            and one ``judge_calls`` row per vote, and lets the input be just a ``turn_id``.
        checkpointer, name: passed to ``compile``.

    Returns:
        A compiled graph: input :class:`PRMInput`, output :class:`PRMOutput`.
    """
    _check_options(votes, vote_timeout, aggregate)
    nodes = _PRMNodes(judge, votes=votes, vote_timeout=vote_timeout, rubric=rubric, aggregate=aggregate,
                      store=store)
    workflow = StateGraph(PRMState, input_schema=PRMInput, output_schema=PRMOutput)
    workflow.add_node(PREPARE, _node(nodes.prepare, name=PREPARE))
    workflow.add_node(VOTE, _node(nodes.vote, nodes.avote, name=VOTE))
    workflow.add_node(AGGREGATE, _node(nodes.aggregate_node, name=AGGREGATE))
    workflow.add_edge(START, PREPARE)
    workflow.add_edge(PREPARE, VOTE)
    workflow.add_edge(VOTE, AGGREGATE)
    if store is not None:
        workflow.add_node(RECORD, _node(nodes.record, nodes.arecord, name=RECORD))
        workflow.add_edge(AGGREGATE, RECORD)
        workflow.add_edge(RECORD, END)
    else:
        workflow.add_edge(AGGREGATE, END)
    return workflow.compile(checkpointer=checkpointer, name=name)
