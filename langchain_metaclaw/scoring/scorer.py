"""``score_pending``: one incremental pass of every scorer over what the store has not scored yet.

The scheduler, ``metaclaw score`` and notebooks all call the same function. One pass:

1. **Feedback**: numeric feedback whose turn was not captured when it was given becomes a
   ``source="feedback"`` score once the turn is in the store (the same target rule as
   ``TraceStore.add_feedback``: the turn itself, else the last llm turn of that root run). Idempotent: a
   feedback id already recorded in a score's details is never written again.
2. **Rules**: each named reward rule runs on llm turns without a ``rule:<name>`` score.
3. **PRM judge**: successful llm turns with no ``prm`` score, or ``unscored`` with attempts left, go through
   the PRM graph (``concurrency`` turns at a time, ``votes`` parallel calls each). A turn with no next user
   message yet whose thread may still get one waits ``wait_for_next_message`` (skipped, not an attempt);
   after that it is scored without it, and its details say so. Each result is committed as soon as it is
   known, so a killed run loses only the turns in flight, and a second run judges nothing twice.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar

from pydantic import BaseModel, Field

from langchain_metaclaw.errors import ConfigurationError
from langchain_metaclaw.scoring.evidence import EpisodeIndex, evidence_from_turn, is_judge_turn
from langchain_metaclaw.scoring.judge import FAILURE_KINDS, Aggregate
from langchain_metaclaw.scoring.rewards import RuleContext, evaluate_reward, get_reward, rule_source
from langchain_metaclaw.scoring.types import TurnEvidence

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel

    from langchain_metaclaw.store.records import Episode, Turn
    from langchain_metaclaw.store.trace_store import TraceStore

__all__ = ["DEFAULT_WAIT", "ScoringReport", "ascore_pending", "judge_health", "rollup", "score_pending"]

logger = logging.getLogger(__name__)

DEFAULT_WAIT = timedelta(minutes=10)
"""How long a turn waits for the user's next message before it is judged without it."""

Progress = bool | Callable[[int, int], None]
P = ParamSpec("P")
R = TypeVar("R")


class ScoringReport(BaseModel):
    """What one ``score_pending`` pass did."""

    scored: int = 0
    """llm turns that got a ``prm`` score in this pass."""
    unscored: int = 0
    """llm turns whose votes all failed in this pass (written ``unscored`` with the reason; retried later)."""
    exhausted: int = 0
    """Of ``unscored``: turns that used their last attempt (``max_attempts``) and are left alone from now on."""
    skipped_waiting: int = 0
    """llm turns skipped for now: no next user message yet, and younger than ``wait_for_next_message``."""
    rule_scores: dict[str, int] = Field(default_factory=dict)
    """Score rows written per rule name."""
    rule_errors: dict[str, int] = Field(default_factory=dict)
    """Turns on which a rule raised or returned something invalid, per rule name (logged, no row)."""
    feedback_resolved: int = 0
    """Feedback turned into ``source="feedback"`` scores in this pass (its turn arrived after it)."""
    feedback_pending: int = 0
    """Numeric feedback whose run is still not in the store."""
    judge_calls: int = 0
    """Judge calls (votes) made in this pass."""
    judge_failures: dict[str, int] = Field(default_factory=dict)
    """Failed votes by kind: ``unparseable``, ``refused``, ``timeout``, ``error``."""
    stopped: bool = False
    """``stop_event`` was set before every pending turn was judged."""
    elapsed_s: float = 0.0

    def summary(self) -> str:
        """One line for logs and the CLI."""
        parts = [f"prm: {self.scored} scored, {self.unscored} unscored"]
        if self.exhausted:
            parts[-1] += f" ({self.exhausted} out of attempts)"
        if self.skipped_waiting:
            parts.append(f"{self.skipped_waiting} waiting for the user's next message")
        if self.judge_calls:
            failed = ", ".join(f"{n} {k}" for k, n in self.judge_failures.items()) or "none failed"
            parts.append(f"{self.judge_calls} judge calls ({failed})")
        if self.rule_scores or self.rule_errors:
            rules = ", ".join(f"{k}={v}" for k, v in sorted(self.rule_scores.items()))
            errors = sum(self.rule_errors.values())
            parts.append(f"rules: {rules or 'none'}" + (f" ({errors} errors)" if errors else ""))
        if self.feedback_resolved or self.feedback_pending:
            parts.append(f"feedback: {self.feedback_resolved} resolved, {self.feedback_pending} pending")
        parts.append(f"{self.elapsed_s:.1f}s" + (" (stopped)" if self.stopped else ""))
        return "; ".join(parts)


# ---------------------------------------------------------------------------------------------- feedback


def _resolve_feedback(store: TraceStore, report: ScoringReport) -> None:
    rows = store.numeric_feedback()
    if not rows:
        return
    by_id = {f["id"]: f for f in rows}
    recorded: set[str] = set()
    current: dict[tuple[str, str], str] = {}  # (turn_id, key) -> feedback id behind its score
    for score in store.feedback_scores():
        fid = (score.get("details") or {}).get("feedback_id")
        if fid:
            recorded.add(fid)
            current[(score["turn_id"], score["key"])] = fid
    pending = [f for f in rows if f["id"] not in recorded]
    if not pending:
        return
    targets = store.feedback_targets(sorted({f["run_id"] for f in pending}))
    writes: dict[tuple[str, str], dict[str, Any]] = {}
    for fb in pending:  # oldest first: the newest feedback on a turn wins, as in add_feedback
        target = targets.get(fb["run_id"])
        if target is None:
            report.feedback_pending += 1
            continue
        slot = (target[0], fb["key"])
        holder = current.get(slot)
        if holder in by_id and by_id[holder]["created_at"] > fb["created_at"]:
            continue  # a newer feedback already scores this turn
        current[slot] = fb["id"]
        writes[slot] = {
            "turn_id": target[0],
            "episode_id": target[1],
            "source": "feedback",
            "key": fb["key"],
            "value": float(fb["score"]),
            "confidence": 1.0,
            "reason": fb["comment"],
            "details": {"feedback_id": fb["id"], "run_id": fb["run_id"], "resolved_by": "scorer"},
        }
    store.upsert_scores(list(writes.values()))
    report.feedback_resolved += len(writes)


# ---------------------------------------------------------------------------------------------- reading pages


class _EpisodeCache:
    """Episodes and their turns (indexed), read once per page of work."""

    def __init__(self, store: TraceStore) -> None:
        self.store = store
        self.index: dict[str, EpisodeIndex] = {}
        self.episodes: dict[str, Episode | None] = {}

    def load(self, pending: Sequence[tuple[str, str]]) -> list[Turn]:
        """Read the episodes of ``pending`` (turn id, episode id) pairs; returns those turns, in order."""
        self.index.clear()
        self.episodes.clear()
        for eid in dict.fromkeys(e for _, e in pending):
            self.index[eid] = EpisodeIndex(self.store.turns(episode_id=eid))
            self.episodes[eid] = self.store.episode(eid)
        turns = []
        for turn_id, eid in pending:
            index = self.index[eid]
            position = index.position.get(turn_id)
            if position is not None:
                turns.append(index.turns[position])
        return turns

    def context(self, turn: Turn) -> RuleContext:
        index = self.index.get(turn.episode_id) or EpisodeIndex([])
        data = (turn.output_message or {}).get("data") or {}
        calls = [c.get("id") for c in data.get("tool_calls") or [] if isinstance(c, Mapping) and c.get("id")]
        tools = tuple(index.tool_by_call_id[c] for c in calls if c in index.tool_by_call_id)
        return RuleContext(episode_turns=tuple(index.turns), tool_turns=tools)


# ---------------------------------------------------------------------------------------------- rules


def _score_rules(store: TraceStore, names: Sequence[str], report: ScoringReport, page: int = 500) -> None:
    cache = _EpisodeCache(store)
    for name in names:
        source = rule_source(name)
        report.rule_scores.setdefault(name, 0)
        pending = store.turns_without_score(source)
        first_error: str | None = None
        for start in range(0, len(pending), page):
            turns = cache.load(pending[start:start + page])
            rows = []
            for turn in turns:
                try:
                    value = evaluate_reward(name, turn, cache.episodes.get(turn.episode_id), cache.context(turn))
                except Exception as exc:  # noqa: BLE001 - a broken rule is counted, never fatal
                    report.rule_errors[name] = report.rule_errors.get(name, 0) + 1
                    if first_error is None:
                        first_error = f"{type(exc).__name__}: {exc}"
                        logger.warning("reward rule %r failed on turn %s: %s", name, turn.id, first_error,
                                       exc_info=True)
                    continue
                if value is None:
                    continue
                rows.append({"turn_id": turn.id, "episode_id": turn.episode_id, "source": source, "value": value,
                             "details": {"rule": name}})
            store.upsert_scores(rows)
            report.rule_scores[name] += len(rows)
        if report.rule_errors.get(name):
            logger.warning("reward rule %r failed on %d turn(s) (first: %s)", name, report.rule_errors[name],
                           first_error)


# ---------------------------------------------------------------------------------------------- PRM


def _wait_decision(evidence: TurnEvidence, episode: Episode | None, now: datetime,
                   wait: timedelta) -> Literal["ready", "wait"]:
    """Whether a turn should wait for the user's next message; fills ``next_message_note`` when not."""
    if evidence.get("next_user_message") is not None:
        return "ready"
    if episode is not None and episode.thread_id is None and episode.ended_at is not None:
        evidence["next_message_note"] = "the run ended and has no thread, so no reply can follow"
        return "ready"
    ended = evidence.get("ended_at")
    if ended is not None and now.timestamp() - ended < wait.total_seconds():
        return "wait"
    evidence["next_message_note"] = f"no reply within {wait} of the turn; judged without it"
    return "ready"


class _Progress:
    def __init__(self, progress: Progress, total: int) -> None:
        self.done = 0
        self.total = total
        self._callback = progress if callable(progress) else None
        self._bar = None
        if progress is True:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc="scoring", unit="turn")

    def advance(self, n: int = 1) -> None:
        if n <= 0:
            return
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        if self._callback is not None:
            self._callback(self.done, self.total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class _PRMPass:
    """One PRM pass over ``pending`` turns: a feeder reads them a page of episodes at a time into a bounded
    queue (so memory stays flat on a large backlog), and ``concurrency`` workers run the graph on each."""

    def __init__(self, store: TraceStore, graph: Any, report: ScoringReport, pending: list[tuple[str, str]], *,
                 max_attempts: int, wait: timedelta, concurrency: int, now: datetime, tracker: _Progress,
                 stop_event: threading.Event | None) -> None:
        self.store, self.graph, self.report, self.pending = store, graph, report, pending
        self.max_attempts, self.wait, self.concurrency, self.now = max_attempts, wait, concurrency, now
        self.tracker, self.stop_event = tracker, stop_event
        self.attempts = store.score_attempts([turn_id for turn_id, _ in pending])
        self.failures: Counter[str] = Counter()
        self.queue: asyncio.Queue[TurnEvidence | None] = asyncio.Queue(maxsize=concurrency * 2)

    async def _feed(self) -> None:
        cache = _EpisodeCache(self.store)
        page = max(128, self.concurrency * 8)
        for start in range(0, len(self.pending), page):
            turns = cache.load(self.pending[start:start + page])
            self.tracker.advance(len(self.pending[start:start + page]) - len(turns))  # vanished since the query
            for turn in turns:
                if self.stop_event is not None and self.stop_event.is_set():
                    self.report.stopped = True
                    return
                if is_judge_turn(turn) or turn.output_message is None:
                    self.tracker.advance()
                    continue
                evidence = evidence_from_turn(turn, cache.index[turn.episode_id])
                if _wait_decision(evidence, cache.episodes.get(turn.episode_id), self.now, self.wait) == "wait":
                    self.report.skipped_waiting += 1
                    self.tracker.advance()
                    continue
                await self.queue.put(evidence)

    async def _produce(self) -> None:
        await self._feed()  # on error, the task group cancels the workers; on success or stop, they drain and end
        for _ in range(self.concurrency):
            await self.queue.put(None)

    async def _work(self) -> None:
        report = self.report
        while (evidence := await self.queue.get()) is not None:
            result = await self.graph.ainvoke({"evidence": evidence})
            cast_votes = result.get("votes") or []
            report.judge_calls += len(cast_votes)
            self.failures.update(v["outcome"] for v in cast_votes if v["outcome"] != "ok")
            if result.get("status") == "scored":
                report.scored += 1
            else:
                report.unscored += 1
                if self.attempts.get(evidence.get("turn_id") or "", 0) + 1 >= self.max_attempts:
                    report.exhausted += 1
            self.tracker.advance()

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._produce())
                for _ in range(self.concurrency):
                    group.create_task(self._work())
        except BaseExceptionGroup as group_error:  # surface the first real error, not the group
            raise group_error.exceptions[0] from group_error
        finally:
            self.report.judge_failures = {k: self.failures[k] for k in FAILURE_KINDS if self.failures[k]}


async def _score_prm(
    store: TraceStore,
    judge: BaseChatModel,
    report: ScoringReport,
    *,
    votes: int,
    vote_timeout: float,
    rubric: str | Mapping[str, str] | None,
    aggregate: Aggregate,
    max_attempts: int,
    wait: timedelta,
    concurrency: int,
    limit: int | None,
    now: datetime,
    progress: Progress,
    stop_event: threading.Event | None,
) -> None:
    from langchain_metaclaw.scoring.graph import create_prm_graph

    graph = create_prm_graph(judge, votes=votes, vote_timeout=vote_timeout, rubric=rubric, aggregate=aggregate,
                             store=store)
    pending = store.pending_prm_turns(max_attempts=max_attempts, limit=limit)
    tracker = _Progress(progress, len(pending))
    try:
        if pending:
            await _PRMPass(store, graph, report, pending, max_attempts=max_attempts, wait=wait,
                           concurrency=concurrency, now=now, tracker=tracker, stop_event=stop_event).run()
    finally:
        tracker.close()


# ---------------------------------------------------------------------------------------------- public API


def _check_options(rules: Sequence[str], *, max_attempts: int, concurrency: int) -> None:
    """Fail before anything is written: unknown rule names, bounds that cannot work."""
    for name in rules:
        get_reward(name)
    if max_attempts < 1:
        msg = f"max_attempts must be >= 1, got {max_attempts}"
        raise ConfigurationError(msg)
    if concurrency < 1:
        msg = f"concurrency must be >= 1, got {concurrency}"
        raise ConfigurationError(msg)


async def ascore_pending(
    store: TraceStore,
    *,
    judge: BaseChatModel | None = None,
    rules: Sequence[str] | None = None,
    votes: int = 3,
    vote_timeout: float = 30.0,
    max_attempts: int = 3,
    wait_for_next_message: timedelta | float = DEFAULT_WAIT,
    concurrency: int = 16,
    rubric: str | Mapping[str, str] | None = None,
    aggregate: Aggregate = "majority",
    limit: int | None = None,
    progress: Progress = False,
    now: datetime | None = None,
    stop_event: threading.Event | None = None,
) -> ScoringReport:
    """Score everything the store has not scored yet: feedback, rules, then the PRM judge. Run it as often
    as you like: it is incremental and idempotent. ``score_pending`` is the blocking form (same arguments).

    Args:
        store (`TraceStore`): where turns are read and scores, judge calls are written.
        judge (`BaseChatModel`, *optional*): the PRM judge; ``None`` skips PRM scoring.
        rules (`list[str]`, *optional*): registered reward rules to run (see
            :func:`~langchain_metaclaw.scoring.rewards.register_reward`); ``None`` runs none.
        votes, vote_timeout, rubric, aggregate: as in :func:`~langchain_metaclaw.scoring.graph.create_prm_graph`.
        max_attempts (`int`, defaults to 3): a turn whose votes all fail is retried on later passes until
            its ``unscored`` row has this many attempts; then it is left alone with its reason.
        wait_for_next_message (`timedelta | float`, defaults to 10 minutes): a turn with no next user message
            waits this long (seconds when a number) after it ended, skipped and not counted as an attempt,
            then is judged without it. A run without a thread id that has ended never waits.
        concurrency (`int`, defaults to 16): turns judged at once (each with ``votes`` parallel calls).
        limit (`int`, *optional*): judge at most this many pending turns in this pass.
        progress (`bool | callable`): ``True`` shows a tqdm bar; a callable gets ``(done, total)`` per turn.
        now (`datetime`, *optional*): the current time (tests, replays); default ``datetime.now(UTC)``.
        stop_event (`threading.Event`, *optional*): stop feeding turns to the judge once set (the scheduler's
            window closed); turns in flight finish and are committed.

    Returns:
        A :class:`ScoringReport` of this pass.
    """
    started = time.perf_counter()
    names = list(rules or [])
    _check_options(names, max_attempts=max_attempts, concurrency=concurrency)
    if isinstance(wait_for_next_message, int | float):
        wait_for_next_message = timedelta(seconds=wait_for_next_message)
    # a naive time is taken as UTC (turn times are epochs): datetime.utcnow() in a replay stays right
    now = datetime.now(UTC) if now is None else now if now.tzinfo else now.replace(tzinfo=UTC)

    report = ScoringReport()
    try:
        _resolve_feedback(store, report)
        if names:
            _score_rules(store, names, report)
        if judge is not None:
            await _score_prm(store, judge, report, votes=votes, vote_timeout=vote_timeout, rubric=rubric,
                             aggregate=aggregate, max_attempts=max_attempts, wait=wait_for_next_message,
                             concurrency=concurrency, limit=limit, now=now, progress=progress,
                             stop_event=stop_event)
    finally:
        report.elapsed_s = time.perf_counter() - started
    logger.info("score_pending: %s", report.summary())
    return report


def _blocking(afunc: Callable[P, Coroutine[Any, Any, R]], name: str) -> Callable[P, R]:
    """``afunc`` as a blocking function called ``name``, with ``afunc``'s signature and docstring.

    It runs ``afunc`` under ``asyncio.run``; called where an event loop is already running (a notebook, an
    async app), which it must not block, it runs it on its own loop in a worker thread instead.
    """

    @functools.wraps(afunc)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        coro = afunc(*args, **kwargs)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="metaclaw-score") as pool:
            return pool.submit(asyncio.run, coro).result()

    run.__name__ = run.__qualname__ = name
    return run


score_pending = _blocking(ascore_pending, "score_pending")


def rollup(
    store: TraceStore,
    by: Literal["node", "episode"] = "node",
    *,
    source: str = "prm",
    key: str = "reward",
) -> dict[str, float]:
    """Mean scored value of ``source`` per LangGraph node (``"(none)"`` outside any node) or per episode."""
    if by not in ("node", "episode"):
        msg = f"rollup by must be 'node' or 'episode', got {by!r}"
        raise ConfigurationError(msg)
    return store.rollup(by, source=source, key=key)


def judge_health(store: TraceStore, *, since: datetime | None = None, judge: str | None = None) -> dict[str, Any]:
    """Judge calls recorded in ``store``: counts, failures by kind, failure rate, latency, tokens.

    Returns ``{"calls", "ok", "failures": {"unparseable", "refused", "timeout", "error"}, "failure_rate",
    "latency_ms": {"mean", "p50", "p95", "max"}, "tokens": {"input", "output"}, "judges": {name: calls},
    "last_call_at"}``.
    """
    return store.judge_health(failure_kinds=FAILURE_KINDS, since=since, judge=judge)
