"""On-policy groups and held-out evaluation, through a :class:`~langchain_metaclaw.training.sampler.Sampler`.

Pure steps of the trainer's loop (tinker-cookbook's ``do_group_rollout`` -> ``compute_advantages`` ->
``assemble_training_data``, for single-turn prompts): they take the sampler the backend handed over and a
reward function, and know nothing of which backend produced the weights.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

from langchain_metaclaw.training.data import group_advantages
from langchain_metaclaw.training.sampler import ChatPrompt, SampledCompletion, Sampler
from langchain_metaclaw.training.types import Datum, datum_from_tokens

__all__ = ["RewardFn", "ScoredGroup", "group_data", "mean_greedy_reward", "scored_groups"]

RewardFn = Callable[[list[dict[str, Any]], str], float | None]
"""``(prompt messages as chat dicts, completion text) -> reward`` for on-policy groups and evaluation."""

ScoredGroup = list[tuple[SampledCompletion, float]]
"""A group's completions with their rewards (completions the reward function left unscored dropped)."""


def scored_groups(
    sampler: Sampler,
    prompts: Sequence[ChatPrompt],
    reward_fn: RewardFn,
    *,
    n: int,
    max_tokens: int,
    temperature: float,
    seed: int | None,
) -> list[ScoredGroup]:
    """``n`` completions of each prompt from ``sampler``, each scored by ``reward_fn``."""
    groups = sampler.sample(prompts, n, max_tokens=max_tokens, temperature=temperature, seed=seed)
    scored = []
    for prompt, group in zip(prompts, groups, strict=True):
        rewards = [reward_fn(prompt, c.text) for c in group]
        scored.append([(c, float(w)) for c, w in zip(group, rewards, strict=True) if w is not None])
    return scored


def group_data(
    groups: Sequence[ScoredGroup], *, normalize: bool, kl_coef: float
) -> tuple[list[Datum], int]:
    """The RL data of scored groups (group-relative advantages) and how many groups were constant.

    A constant group has no reward signal and is skipped, unless ``kl_coef`` is on: then it trains with
    advantage 0, so the KL term alone pulls a collapsed policy back toward the base.
    """
    data: list[Datum] = []
    constant = 0
    for group in groups:
        advantages = group_advantages([w for _, w in group], normalize=normalize)
        if advantages is None:
            constant += 1
            if not kl_coef:
                continue
            advantages = [0.0] * len(group)
        for (completion, _), adv in zip(group, advantages, strict=True):
            data.append(
                datum_from_tokens(
                    completion.prompt_token_ids, completion.completion_token_ids, completion.logprobs, adv
                )
            )
    return data, constant


def mean_greedy_reward(
    sampler: Sampler, prompts: Sequence[ChatPrompt], reward_fn: RewardFn, *, max_tokens: int
) -> float | None:
    """Mean ``reward_fn`` of the sampler's greedy answers to ``prompts`` (``None``: nothing scored)."""
    if not prompts:
        return None
    texts = sampler.greedy(list(prompts), max_tokens=max_tokens)
    rewards = [reward_fn(p, t) for p, t in zip(prompts, texts, strict=True)]
    scored = [float(r) for r in rewards if r is not None]
    return statistics.fmean(scored) if scored else None
