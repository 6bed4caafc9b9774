"""Select, the first step of a run: what it trains on, what it holds out for the gate, or why it skips.

Reads the store (scored samples, earlier runs, adapter versions) and decides nothing else: the trainer
records a skip reason as given, word for word, in the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from langchain_metaclaw.adapters import AdapterRegistry
from langchain_metaclaw.store.trace_store import TraceStore
from langchain_metaclaw.training.data import Sample, collect_samples, drop_stale
from langchain_metaclaw.training.sampler import ChatPrompt

if TYPE_CHECKING:
    from langchain_metaclaw.training.config import TrainerConfig

__all__ = ["Plan", "chat_of", "select"]


@dataclass
class Plan:
    """What a run trains on: fresh samples (off-policy) or captured prompts (on-policy), and held-out prompts."""

    samples: list[Sample]
    meta: dict[str, Any]
    """Run metrics known before training (``samples_scored``, ``samples_fresh``, ``dropped_stale``, ...)."""
    onpolicy: bool
    prompts: list[ChatPrompt] = field(default_factory=list)
    eval_prompts: list[ChatPrompt] = field(default_factory=list)


def select(
    store: TraceStore,
    registry: AdapterRegistry,
    cfg: TrainerConfig,
    *,
    onpolicy: bool,
    eval_prompts: Sequence[ChatPrompt] | None,
    owner: dict[str, Any],
) -> tuple[Plan, str | None]:
    """The run's :class:`Plan`, and the reason to skip it (``None``: train).

    Without ``eval_prompts``, the most recent ``cfg.eval_prompts // 2`` captured prompts are held out for
    the promotion gate, and no sample with one of them is trained on.
    """
    samples, meta = _fresh_samples(store, registry, cfg.max_staleness)
    meta["owner"] = owner
    plan = Plan(samples=samples, meta=meta, onpolicy=onpolicy)
    if not samples and not onpolicy:
        if meta["samples_scored"] == 0:
            return plan, "no scored turns yet"
        if meta["samples_fresh"]:
            return plan, f"all {int(meta['samples_fresh'])} fresh samples are stale (> {cfg.max_staleness} versions old)"
        return plan, "no new scored turns since the last run"
    if not onpolicy and len(samples) < cfg.min_samples:
        return plan, f"{len(samples)} fresh scored samples < min_samples={cfg.min_samples}"
    prompts = _distinct_prompts(samples)
    if eval_prompts is None:  # hold out the most recent prompts; never train on them
        eval_prompts, prompts = prompts[: cfg.eval_prompts // 2], prompts[cfg.eval_prompts // 2 :]
    held_out = {repr(p) for p in eval_prompts}
    plan.samples = [s for s in samples if repr(chat_of(s)) not in held_out]
    plan.prompts, plan.eval_prompts = prompts, list(eval_prompts)
    meta["held_out_prompts"] = float(len(eval_prompts))
    if not onpolicy and not plan.samples:
        return plan, "every fresh sample is held out for evaluation; waiting for more traffic"
    if onpolicy and not prompts:
        return plan, "no captured prompts to sample"
    return plan, None


def chat_of(sample: Sample) -> ChatPrompt:
    """The sample's prompt as chat dicts (empty when it was captured without its messages)."""
    from langchain_core.messages import messages_from_dict

    from langchain_metaclaw.messages import convert_messages

    return convert_messages(messages_from_dict(sample.messages)) if sample.messages else []


def _fresh_samples(
    store: TraceStore, registry: AdapterRegistry, max_staleness: int
) -> tuple[list[Sample], dict[str, Any]]:
    samples = collect_samples(store)
    trained = store.trained_turn_ids()
    fresh = [s for s in samples if s.turn_id not in trained]
    order = [a.version for a in registry.versions()]
    current = registry.current()
    kept, stale = drop_stale(fresh, order, current.version if current else None, max_staleness)
    return kept, {
        "samples_scored": float(len(samples)),
        "samples_fresh": float(len(fresh)),
        "dropped_stale": float(stale),
    }


def _distinct_prompts(samples: Sequence[Sample]) -> list[ChatPrompt]:
    """Distinct captured prompts (chat dicts), most recent first."""
    seen, prompts = set(), []
    for sample in reversed(samples):
        chat = chat_of(sample)
        if chat and repr(chat) not in seen:
            seen.add(repr(chat))
            prompts.append(chat)
    return prompts
