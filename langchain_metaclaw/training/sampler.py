"""The ``Sampler`` protocol: the policy a training backend hands the trainer, on its own weights.

tinker-cookbook's RL loop asks the training client for the next policy after every step
(``save_weights_and_get_sampling_client``) and samples its rollouts from that; it never loads checkpoints
into a serving engine itself. The trainer does the same through this protocol: on-policy groups and the
promotion gate only call :meth:`Sampler.sample` and :meth:`Sampler.greedy`, so they run unchanged on the
local engine and on Tinker / MinT's ``SamplingClient``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = ["ChatPrompt", "SampledCompletion", "Sampler"]

ChatPrompt = list[dict[str, Any]]
"""A prompt as chat dicts (``{"role": ..., "content": ...}``), rendered with the base model's chat template."""


@dataclass(frozen=True)
class SampledCompletion:
    """One sampled completion with the exact tokens and the behaviour logprobs that produced it."""

    prompt_token_ids: list[int]
    completion_token_ids: list[int]
    logprobs: list[float]
    """Log-probability of each completion token under the (tempered) distribution it was drawn from."""
    text: str


@runtime_checkable
class Sampler(Protocol):
    """Samples from one fixed set of weights: the base model, a saved version, or a training step's."""

    version: str | None
    """The adapter version (or step checkpoint name) sampled from; ``None``: the base model."""

    def sample(self, prompts: Sequence[ChatPrompt], n: int, *, max_tokens: int, temperature: float = 1.0,
               seed: int | None = None) -> list[list[SampledCompletion]]:
        """``n`` completions of each prompt (one group per prompt, in order).

        ``seed`` seeds the call: the same seed and weights give the same groups where the backend is
        deterministic (the local engine is; a service may not be).
        """
        ...

    def greedy(self, prompts: Sequence[ChatPrompt], *, max_tokens: int) -> list[str]:
        """The greedy answer text to each prompt (what the promotion gate scores)."""
        ...

    def close(self) -> None:
        """Release what this sampler holds (a step adapter loaded for it); unusable afterwards."""
        ...
