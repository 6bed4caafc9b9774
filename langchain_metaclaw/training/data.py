"""From scored traces to training data: pure functions, no I/O beyond the store reads in ``collect``.

The chain is tinker-cookbook's, adapted to captured traffic instead of an environment:

    collect_samples(store)        llm turns with a reward, the tokens that produced them, their policy version
    drop_stale(samples, ...)      samples from adapters older than the staleness bound (counted, not silent)
    RunningBaseline.advantages    reward - per-task running mean (a batch of 4 unrelated turns has no useful mean)
    group_advantages(rewards_G)   on-policy groups: reward - group mean (GRPO), constant groups skipped
    sample_to_datum(sample, adv)  the shifted datum, built from the engine's own token ids

Multi-turn episodes need nothing special: each assistant turn is its own sample whose prompt is the
whole context the engine saw (tool results and user text included), so only the assistant's own tokens
carry loss.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from langchain_metaclaw.store.records import Score, Turn
from langchain_metaclaw.store.trace_store import TraceStore
from langchain_metaclaw.training.types import Datum, datum_from_tokens

logger = logging.getLogger(__name__)

DEFAULT_SOURCE_WEIGHTS: dict[str, float] = {"feedback": 2.0, "rule": 1.0, "prm": 1.0}
"""How much each reward source counts when a turn has several (explicit feedback outranks the judge)."""


@dataclass(frozen=True)
class Sample:
    """One assistant turn with its reward, ready to become a datum."""

    turn_id: str
    task: str
    """Key of the running baseline (by default the graph node that made the call)."""
    reward: float
    prompt_token_ids: list[int] | None
    completion_token_ids: list[int] | None
    logprobs: list[float] | None
    tokens_source: str
    adapter_version: str | None
    messages: list[dict[str, Any]] = field(default_factory=list)
    """Input messages (LangChain dicts), for re-tokenization when the engine's ids are missing."""
    output_text: str = ""
    created_at: datetime | None = None


def combine_rewards(
    scores: Sequence[Score], weights: Mapping[str, float] = DEFAULT_SOURCE_WEIGHTS
) -> float | None:
    """Weighted mean of a turn's scored rewards; ``rule:<name>`` sources weigh as ``rule``."""
    total = weight_sum = 0.0
    for score in scores:
        if score.status != "scored" or score.value is None:
            continue
        weight = weights.get(score.source, weights.get(score.source.split(":", 1)[0], 0.0))
        total += weight * score.value
        weight_sum += weight
    return total / weight_sum if weight_sum else None


def default_task_key(turn: Turn) -> str:
    return turn.node or turn.name or "default"


def collect_samples(
    store: TraceStore,
    *,
    since: datetime | None = None,
    weights: Mapping[str, float] = DEFAULT_SOURCE_WEIGHTS,
    task_key: Callable[[Turn], str] = default_task_key,
) -> list[Sample]:
    """Successful llm turns that have at least one reward, oldest first."""
    samples = []
    for turn, scores in store.scored_turns(since=since):
        reward = combine_rewards(scores, weights)
        if reward is None or turn.output_message is None:
            continue
        samples.append(
            Sample(
                turn_id=turn.id,
                task=task_key(turn),
                reward=reward,
                prompt_token_ids=turn.prompt_token_ids,
                completion_token_ids=turn.completion_token_ids,
                logprobs=turn.logprobs,
                tokens_source=turn.tokens_source or "retokenized",
                adapter_version=turn.adapter_version,
                messages=turn.input_messages or [],
                output_text=str(turn.output_message.get("data", {}).get("content", "")),
                created_at=turn.created_at,
            )
        )
    return samples


def drop_stale(
    samples: Sequence[Sample], version_order: Sequence[str], current: str | None, max_staleness: int
) -> tuple[list[Sample], int]:
    """Keep samples produced at most ``max_staleness`` versions before ``current``; returns (kept, dropped).

    ``version_order`` lists adapter versions oldest first; the base model (``None``) comes before all.
    Samples from versions newer than ``current`` (after a rollback) are off-policy but not stale: the
    importance-sampling loss corrects for them with their recorded behaviour logprobs.
    """
    index = {v: i for i, v in enumerate(version_order)}
    now = index.get(current, -1) if current is not None else -1
    kept = [
        s
        for s in samples
        if now - (index.get(s.adapter_version, -1) if s.adapter_version else -1) <= max_staleness
    ]
    return kept, len(samples) - len(kept)


class RunningBaseline:
    """Per-task running mean of rewards; the advantage of a sample is its reward minus the mean before it.

    A task seen for the first time starts from the mean over all tasks so far (0 before any reward), so
    its first sample still carries signal.
    """

    def __init__(self, momentum: float = 0.9) -> None:
        self.momentum = momentum
        self.means: dict[str, float] = {}
        self.global_mean: float | None = None

    def advantage(self, task: str, reward: float) -> float:
        prior = self.means.get(task, self.global_mean if self.global_mean is not None else 0.0)
        self.means[task] = (
            self.momentum * prior + (1 - self.momentum) * reward if task in self.means else reward
        )
        self.global_mean = reward if self.global_mean is None else 0.9 * self.global_mean + 0.1 * reward
        return reward - prior

    def advantages(self, samples: Sequence[Sample]) -> list[float]:
        return [self.advantage(s.task, s.reward) for s in samples]


def group_advantages(rewards_G: Sequence[float], *, normalize: bool = False) -> list[float] | None:
    """Group-relative advantages (reward - group mean); ``None`` for a constant group (no signal)."""
    if len(rewards_G) < 2 or max(rewards_G) == min(rewards_G):
        return None
    mean = sum(rewards_G) / len(rewards_G)
    adv = [r - mean for r in rewards_G]
    if normalize:
        std = (sum(a * a for a in adv) / len(adv)) ** 0.5
        adv = [a / (std + 1e-6) for a in adv]
    return adv


def retokenize(sample: Sample, tokenizer: Any) -> tuple[list[int], list[int]]:
    """Prompt and completion ids of a sample without engine tokens, with the trainer's tokenizer."""
    from langchain_core.messages import messages_from_dict

    from langchain_metaclaw.messages import chat_prompt_ids, convert_messages

    prompt_ids = chat_prompt_ids(tokenizer, convert_messages(messages_from_dict(sample.messages)))
    completion_ids = list(tokenizer(sample.output_text, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        completion_ids.append(tokenizer.eos_token_id)
    return prompt_ids, completion_ids


def sample_to_datum(sample: Sample, advantage: float, tokenizer: Any = None) -> Datum:
    """The RL datum of one sample; re-tokenized samples get placeholder logprobs (recompute before use)."""
    if sample.prompt_token_ids and sample.completion_token_ids:
        return datum_from_tokens(
            sample.prompt_token_ids, sample.completion_token_ids, sample.logprobs, advantage
        )
    if tokenizer is None:
        msg = f"turn {sample.turn_id} has no engine tokens; a tokenizer is needed to re-tokenize it"
        raise ValueError(msg)
    prompt_ids, completion_ids = retokenize(sample, tokenizer)
    return datum_from_tokens(prompt_ids, completion_ids, None, advantage)
