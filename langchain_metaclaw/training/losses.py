"""Loss functions with tinker's definitions: sums over tokens, no normalisation.

All inputs are flat per-token tensors of the same shape (any shape works; everything is elementwise then
summed). ``logprobs`` carries the gradient; the others are constants.

| loss | definition (per token, summed) |
| --- | --- |
| ``cross_entropy`` | ``-(logp * w)`` |
| ``importance_sampling`` | ``-(exp(logp - sampler_logp) * A * w)`` |
| ``ppo`` | ``-min(r * A, clip(r, clip_low_threshold, clip_high_threshold) * A) * w``, ``r = exp(logp - sampler_logp)`` |
| KL penalty (``kl_coef > 0``) | ``+ kl_coef * k3(logp, ref_logp) * w``, ``k3 = exp(ref - logp) - (ref - logp) - 1`` |

``w`` is ``weights`` (ones when absent); tinker's RL losses take no weights, so the tinker backend folds them
into the advantages (``A * w``), which gives the same loss. The KL term is the k3 estimator of
KL(trainer || reference) (non-negative, unbiased on-policy, differentiable through ``logp``).

:func:`compute_loss` dispatches on the name and returns the loss with metric *sums* and a token count, so
a backend that accumulates over micro-batches divides once at the end.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from langchain_metaclaw.training.types import LOSS_FN_CONFIG_KEYS, check_loss_config

__all__ = [
    "LOSS_FN_CONFIG_KEYS",
    "LossResult",
    "compute_loss",
    "cross_entropy_loss",
    "entropy_from_log_probs",
    "importance_sampling_loss",
    "kl_penalty",
    "log_softmax_and_pick",
    "ppo_loss",
    "token_entropy",
    "token_logprobs",
]

DEFAULT_CLIP_LOW = 0.8
DEFAULT_CLIP_HIGH = 1.2


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[..., target]`` in float32; ``logits[..., V]``, ``targets[...]`` (int64)."""
    return log_softmax_and_pick(logits, targets)[1]


def log_softmax_and_pick(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_softmax(logits), its value at targets)``, so entropy can reuse the log-softmax.

    ``log_softmax`` + ``gather`` is the fast path on CPU (measured: its backward is ~35% cheaper than
    ``gather - logsumexp``, which recomputes the softmax), at the cost of keeping one ``[..., V]`` tensor.
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return log_probs, log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's next-token distribution (no gradient), ``[..., V] -> [...]``."""
    return entropy_from_log_probs(torch.log_softmax(logits.float(), dim=-1))


@torch.no_grad()
def entropy_from_log_probs(log_probs: torch.Tensor) -> torch.Tensor:
    """``-sum(p * log p)`` over the last dimension of a log-softmax (no gradient)."""
    return (-(log_probs.exp() * log_probs).sum(-1)).clamp_min(0.0)


def _weights(like: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(like) if weights is None else weights.to(like.dtype)


def cross_entropy_loss(logprobs: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``-(logp * w).sum()``."""
    return -(logprobs * _weights(logprobs, weights)).sum()


def importance_sampling_loss(
    logprobs: torch.Tensor,
    sampler_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``-(exp(logp - sampler_logp) * A * w).sum()``."""
    ratio = torch.exp(logprobs - sampler_logprobs)
    return -(ratio * advantages * _weights(logprobs, weights)).sum()


def ppo_loss(
    logprobs: torch.Tensor,
    sampler_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    clip_low_threshold: float = DEFAULT_CLIP_LOW,
    clip_high_threshold: float = DEFAULT_CLIP_HIGH,
) -> torch.Tensor:
    """``-min(r * A, clip(r, low, high) * A) * w`` summed, ``r = exp(logp - sampler_logp)``.

    The thresholds bound the ratio itself (tinker's ``clip_low_threshold=0.8``, ``clip_high_threshold=1.2``),
    not ``1 +- epsilon``.
    """
    ratio = torch.exp(logprobs - sampler_logprobs)
    clipped = ratio.clamp(clip_low_threshold, clip_high_threshold)
    objective = torch.minimum(ratio * advantages, clipped * advantages)
    return -(objective * _weights(logprobs, weights)).sum()


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Summed k3 estimate of KL(trainer || reference): ``(exp(ref - logp) - (ref - logp) - 1) * w``."""
    delta = ref_logprobs - logprobs
    return ((torch.exp(delta) - delta - 1.0) * _weights(logprobs, weights)).sum()


@dataclass
class LossResult:
    """A loss value with the sums a caller aggregates into metrics."""

    loss: torch.Tensor
    """Scalar to call ``backward()`` on (a sum over tokens)."""
    sums: dict[str, float] = field(default_factory=dict)
    """Per-metric sums over weighted tokens (``kl_sampler_trainer``, ``ratio``, ``clip_frac``, ``kl_ref``)
    plus ``loss``; divide by ``tokens`` for ``:mean`` metrics."""
    maxima: dict[str, float] = field(default_factory=dict)
    """Per-metric maxima over weighted tokens (``ratio``)."""
    tokens: float = 0.0
    """Number of positions with weight > 0."""


def compute_loss(
    loss_fn: str,
    logprobs: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, float] | None = None,
) -> LossResult:
    """Evaluate ``loss_fn`` on flat per-token tensors.

    Args:
        loss_fn (`str`): ``"cross_entropy"``, ``"importance_sampling"`` or ``"ppo"``.
        logprobs (`torch.Tensor`): the trainer's log-probabilities of the target tokens (with gradient).
        inputs (`Mapping[str, torch.Tensor]`): ``weights`` (optional), ``logprobs`` (sampler) and
            ``advantages`` for the RL losses, ``ref_logprobs`` when ``kl_coef > 0``.
        config (`Mapping[str, float]`, *optional*): ``kl_coef`` (any loss), ``clip_low_threshold`` /
            ``clip_high_threshold`` (ppo). Unknown keys raise ``ValueError``.
    """
    config = check_loss_config(loss_fn, config)
    weights = _weights(logprobs, inputs.get("weights"))
    mask = weights > 0
    tokens = float(mask.sum())
    sums: dict[str, float] = {}
    maxima: dict[str, float] = {}

    if loss_fn == "cross_entropy":
        loss = cross_entropy_loss(logprobs, weights)
    else:
        sampler = inputs["logprobs"].to(logprobs.dtype)
        advantages = inputs["advantages"].to(logprobs.dtype)
        if loss_fn == "importance_sampling":
            loss = importance_sampling_loss(logprobs, sampler, advantages, weights)
        else:
            low = float(config.get("clip_low_threshold", DEFAULT_CLIP_LOW))
            high = float(config.get("clip_high_threshold", DEFAULT_CLIP_HIGH))
            loss = ppo_loss(
                logprobs, sampler, advantages, weights, clip_low_threshold=low, clip_high_threshold=high
            )
        with torch.no_grad():
            diff = (sampler - logprobs)[mask]
            ratio = torch.exp(-diff)
            sums["kl_sampler_trainer"] = float(diff.sum())
            sums["ratio"] = float(ratio.sum())
            maxima["ratio"] = float(ratio.max()) if ratio.numel() else 0.0
            if loss_fn == "ppo":
                outside = (ratio < low) | (ratio > high)
                sums["clip_frac"] = float(outside.sum())

    kl_coef = float(config.get("kl_coef", 0.0))
    if kl_coef:
        if "ref_logprobs" not in inputs:
            msg = "kl_coef > 0 needs 'ref_logprobs' in the inputs (TrainingBackend.compute_logprobs(model='base'))"
            raise ValueError(msg)
        kl = kl_penalty(logprobs, inputs["ref_logprobs"].to(logprobs.dtype), weights)
        loss = loss + kl_coef * kl
        sums["kl_ref"] = float(kl.detach())
    sums["loss"] = float(loss.detach())
    return LossResult(loss=loss, sums=sums, maxima=maxima, tokens=tokens)
