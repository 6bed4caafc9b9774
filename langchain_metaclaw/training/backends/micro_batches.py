"""Micro-batch planning for the local backend: length bucketing and shared-prompt groups.

Bucketing. ``forward_backward`` sorts the batch by length (longest first) and packs consecutive data into
micro-batches while ``longest * count <= token_budget``, right-padding each micro-batch only to its own
longest datum. Every loss is a sum over tokens, so accumulating gradients over micro-batches equals one
big batch, while peak memory is bounded by ``token_budget``.

Shared prompts. Data that start with the same unweighted prompt (an on-policy group) are grouped so the
backend runs that prompt once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from langchain_metaclaw.training.types import Datum, LossFnName, Metrics

if TYPE_CHECKING:
    import torch

__all__ = [
    "MetricsAccumulator",
    "collate",
    "micro_batch_loss",
    "plan_micro_batches",
    "remainder",
    "shared_prefix_groups",
]

_ENTROPY_CHUNK = 256  # rows of [rows, vocab] softmax materialised at once for the entropy metric


def plan_micro_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Group indices into micro-batches whose padded size (``longest * count``) fits ``token_budget``.

    Indices are visited longest first, so each micro-batch holds data of similar length and pads little.
    A datum longer than the budget gets a micro-batch of its own.

    >>> plan_micro_batches([5, 100, 40, 60, 10], token_budget=120)
    [[1], [3, 2], [0, 4]]
    """
    if token_budget <= 0:
        msg = f"token_budget must be positive, got {token_budget}"
        raise ValueError(msg)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        if current and longest * (len(current) + 1) > token_budget:
            batches.append(current)
            current = []
        if not current:
            longest = lengths[i]
        current.append(i)
    if current:
        batches.append(current)
    return batches


_MIN_SHARED_PREFIX = 8


def shared_prefix_groups(data: Sequence[Datum]) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """``([(prefix length, indices)], alone)``: data that begin with the same unweighted prompt, grouped.

    A datum's prompt is every position before its first weighted one (weight 0 there: no loss, so only its
    keys and values matter). Two or more data with the same prompt of at least ``_MIN_SHARED_PREFIX``
    tokens form a group; every other datum is ``alone``.
    """
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    alone: list[int] = []
    for i, datum in enumerate(data):
        weights = datum.weights()
        first = next((t for t, w in enumerate(weights) if w > 0), len(weights))
        if _MIN_SHARED_PREFIX <= first < datum.length:
            by_prompt.setdefault(tuple(int(t) for t in datum.model_input[:first]), []).append(i)
        else:
            alone.append(i)
    groups = []
    for prompt, members in by_prompt.items():
        if len(members) > 1:
            groups.append((len(prompt), members))
        else:
            alone.extend(members)
    return groups, sorted(alone)


def remainder(datum: Datum, prefix: int) -> Datum:
    """``datum`` without its first ``prefix`` positions (their keys and values come from the shared pass)."""
    return Datum(
        model_input=list(datum.model_input[prefix:]),
        loss_fn_inputs={k: list(v[prefix:]) for k, v in datum.loss_fn_inputs.items()},
    )


class MetricsAccumulator:
    """Sums and maxima of per-micro-batch loss metrics, reduced into the step's metrics."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.maxima: dict[str, float] = {}
        self.tokens = 0.0
        self.entropy = 0.0
        self.padded_tokens = 0
        self.micro_batches = 0

    def add(self, result: Any, entropy_sum: float, padded: int) -> None:
        for key, value in result.sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        for key, value in result.maxima.items():
            self.maxima[key] = max(self.maxima.get(key, value), value)
        self.tokens += result.tokens
        self.entropy += entropy_sum
        self.padded_tokens += padded
        self.micro_batches += 1

    def metrics(self, n_data: int, real_tokens: int) -> Metrics:
        denom = max(self.tokens, 1.0)
        out: Metrics = {"loss:sum": self.sums.get("loss", 0.0), "tokens:sum": self.tokens}
        out["entropy:mean"] = self.entropy / denom
        for key, value in self.sums.items():
            if key != "loss":
                out[f"{key}:mean"] = value / denom
        for key, value in self.maxima.items():
            out[f"{key}:max"] = value
        out["sequences:sum"] = float(n_data)
        out["micro_batches:sum"] = float(self.micro_batches)
        out["padding_frac:mean"] = 1.0 - real_tokens / self.padded_tokens if self.padded_tokens else 0.0
        return out


def collate(data: list[Datum], device: Any, *, with_inputs: bool) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest datum (pad positions have attention 0 and weight 0)."""
    import torch

    rows, longest = len(data), max(d.length for d in data)
    ids = torch.zeros((rows, longest), dtype=torch.long)
    mask = torch.zeros((rows, longest), dtype=torch.long)
    targets = torch.zeros((rows, longest), dtype=torch.long)
    floats: dict[str, torch.Tensor] = {}
    keys = ["weights"]
    if with_inputs:
        keys += sorted({k for d in data for k in d.loss_fn_inputs if k not in ("target_tokens", "weights")})
    for key in keys:
        floats[key] = torch.zeros((rows, longest), dtype=torch.float32)
    for r, datum in enumerate(data):
        n = datum.length
        ids[r, :n] = torch.tensor(datum.model_input, dtype=torch.long)
        mask[r, :n] = 1
        targets[r, :n] = torch.tensor(datum.loss_fn_inputs["target_tokens"], dtype=torch.long)
        floats["weights"][r, :n] = torch.tensor(datum.weights(), dtype=torch.float32)
        for key in keys[1:]:
            values = datum.loss_fn_inputs.get(key)
            if values is not None:
                floats[key][r, :n] = torch.tensor(values, dtype=torch.float32)
    batch = {"input_ids": ids, "attention_mask": mask, "target_tokens": targets, **floats}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def micro_batch_loss(
    batch: Mapping[str, torch.Tensor],
    logits: torch.Tensor,
    loss_fn: LossFnName,
    config: Mapping[str, float],
    acc: MetricsAccumulator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of one micro-batch (its metrics added to ``acc``) and the trainer's logprobs of its rows, on the CPU."""
    import torch

    from langchain_metaclaw.training.losses import compute_loss, log_softmax_and_pick

    log_probs, logp = log_softmax_and_pick(logits, batch["target_tokens"])
    valid = batch["attention_mask"].bool()
    inputs = {k: batch[k][valid] for k in ("weights", "logprobs", "advantages", "ref_logprobs") if k in batch}
    result = compute_loss(loss_fn, logp[valid], inputs, config)
    with torch.no_grad():
        entropy_sum = _entropy_sum(log_probs.detach(), valid & (batch["weights"] > 0))
        rows = logp.detach().to("cpu")
    acc.add(result, entropy_sum, padded=int(valid.numel()))
    return result.loss, rows


def _entropy_sum(log_probs: torch.Tensor, mask: torch.Tensor) -> float:
    """Sum of next-token entropies at ``mask`` positions, ``_ENTROPY_CHUNK`` rows at a time."""
    from langchain_metaclaw.training.losses import entropy_from_log_probs

    selected = mask.nonzero(as_tuple=True)
    total = 0.0
    count = selected[0].numel()
    for start in range(0, count, _ENTROPY_CHUNK):
        rows = log_probs[
            selected[0][start : start + _ENTROPY_CHUNK], selected[1][start : start + _ENTROPY_CHUNK]
        ]
        total += float(entropy_from_log_probs(rows).sum())
    return total
