"""How a training run is configured: :class:`TrainerConfig`, read by run selection, the trainer and the scheduler.

Its own module so that the steps a run is made of (selection, rollouts, the gate) read the same settings
without importing the trainer that composes them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

__all__ = ["TrainerConfig"]


class TrainerConfig(BaseModel):
    """Hyper-parameters of one training run (defaults: the settings that learned on a 2-core CPU)."""

    backend: Literal["local", "tinker", "mint"] = "local"
    base_model: str | None = None
    """``None``: the embedded SmolLM2-135M-Instruct (local); an HF id for tinker/mint."""
    learning_rate: float = 2e-4
    loss_fn: Literal["importance_sampling", "cross_entropy", "ppo"] = "importance_sampling"
    kl_coef: float = 0.0
    """KL penalty against the base model (0: off). When on, constant groups are trained too (advantage 0):
    their only gradient is the KL term, which is what lifts a collapsed policy (every group alike) back
    toward the base's diversity instead of leaving it with no gradient at all."""
    rank: int = 16
    alpha: int = 32
    token_budget: int = 1024
    """Tokens per micro-batch (bounds peak memory)."""
    batch_size: int = 32
    """Samples per optimizer step."""
    max_steps: int = 8
    min_samples: int = 4
    max_staleness: int = 2
    """Drop samples produced more than this many adapter versions before the serving one."""
    group_size: int = 0
    """On-policy groups: sample G completions per captured prompt with the current weights (0: off)."""
    group_prompts: int = 4
    """Captured prompts per on-policy step."""
    temperature: float = 1.0
    explore_temperature: float = 0.0
    """When a group comes back constant (no signal), sample it once more at this temperature (0: off), so a
    collapsed policy still meets the answers it stopped giving. The behaviour logprobs are those of the
    tempered distribution, so the importance ratio keeps the update on the trainer's own policy."""
    max_new_tokens: int = 48
    normalize_group_advantages: bool = False
    eval_prompts: int = 16
    """Held-out recent prompts for the promotion gate."""
    promotion_margin: float = 0.0
    """Promote when candidate >= serving - margin."""
    rollback_drop: float = 0.25
    """Roll back when live reward after promotion falls this much below the parent's."""
    live_min_samples: int = 8
    seed: int = 0
    threads: int | None = None
    low_priority: bool = True
