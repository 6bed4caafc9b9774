"""The training loop: scored traces -> LoRA update -> candidate -> gate -> promotion -> watch.

``Trainer.run(max_steps, stop_event)`` is what ``metaclaw train`` and the MadMax scheduler call. It checks
``stop_event`` between steps (the scheduler preempts it within one step), checkpoints after every step,
and records in ``train_runs`` what it trained on, its metrics, and, when it did nothing, exactly why.

Guards against what collapses small-model RL (DESIGN "Learning on this machine"): constant groups are
skipped and counted (or resampled at ``explore_temperature``), entropy and KL(sampler || trainer) are
reported per step, an optional KL penalty against the base model (``kl_coef``; with it, constant groups
train on the KL term alone), and promotion only when the candidate is not worse than the serving adapter
on held-out recent prompts, with an automatic rollback when live reward drops after promotion.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import BaseModel

from langchain_metaclaw.adapters import AdapterRegistry
from langchain_metaclaw.errors import BackendUnavailableError, MetaClawError
from langchain_metaclaw.store.records import TrainRun
from langchain_metaclaw.store.trace_store import TraceStore
from langchain_metaclaw.training.data import (
    RunningBaseline,
    Sample,
    collect_samples,
    drop_stale,
    group_advantages,
    sample_to_datum,
)
from langchain_metaclaw.training.types import AdamParams, Datum, datum_from_tokens

logger = logging.getLogger(__name__)

RewardFn = Callable[[list[dict[str, Any]], str], float | None]
"""``(prompt messages as chat dicts, completion text) -> reward`` for on-policy groups and evaluation."""


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


class Trainer:
    """Train LoRA adapters from a trace store and promote the ones that are better.

    Args:
        store: the trace store (samples in, candidates and train runs out).
        config: :class:`TrainerConfig`.
        reward_fn: scores a completion for on-policy groups and for the promotion gate; without one,
            the trainer trains on captured rewards only and leaves candidates for a human to promote.
        backend: a ready ``TrainingBackend`` (tests); default built from ``config``.
    """

    def __init__(
        self,
        store: TraceStore,
        config: TrainerConfig | None = None,
        *,
        reward_fn: RewardFn | None = None,
        backend: Any = None,
        eval_prompts: Sequence[list[dict[str, Any]]] | None = None,
    ) -> None:
        self.store = store
        self.config = config or TrainerConfig()
        self.reward_fn = reward_fn
        self.registry = AdapterRegistry(store)
        self._backend = backend
        self._eval_prompts = list(eval_prompts) if eval_prompts is not None else None
        self._baseline = RunningBaseline()
        self._rng = random.Random(self.config.seed)
        self.history: list[dict[str, float]] = []
        """Metrics of every step of this trainer, in order (for plots)."""

    # ------------------------------------------------------------------ building blocks

    @property
    def backend(self) -> Any:
        if self._backend is None:
            from langchain_metaclaw.training.backends import get_backend

            cfg = self.config
            kwargs: dict[str, Any] = {"base_model": cfg.base_model}
            if cfg.backend == "local":
                kwargs.update(
                    rank=cfg.rank,
                    alpha=cfg.alpha,
                    token_budget=cfg.token_budget,
                    threads=cfg.threads,
                    low_priority=cfg.low_priority,
                    seed=cfg.seed,
                )
            else:
                kwargs["rank"] = cfg.rank
            self._backend = get_backend(cfg.backend, **kwargs)
        return self._backend

    def _engine(self):
        from langchain_metaclaw.chat_model.backends.local import shared_engine

        return shared_engine(self.config.base_model)

    def _trained_turns(self) -> set[str]:
        done: set[str] = set()
        for run in self.store.train_runs():
            if run.status in ("ok", "stopped", "interrupted"):
                done.update(run.samples)
        return done

    def _close_dead_runs(self, run_id: str, current: Any) -> TrainRun | None:
        """Close the runs whose process died mid-run; return the newest one this run resumes from.

        A dead run is resumable when it checkpointed at least one step on the same backend from the same
        serving adapter; its samples then count as trained (they are in the checkpoint). Any other dead run
        is closed as ``error`` with the reason, and what it trained on is trained again.
        """
        resumed = None
        for run in self.store.train_runs():  # newest first
            if run.status != "running" or not _owner_is_dead(run.metrics.get("owner")):
                continue
            died = f"its process {run.metrics['owner']['pid']} died after step {run.steps}"
            same_line = run.backend == self.config.backend and run.base_adapter == (
                current.version if current else None
            )
            if resumed is None and same_line and run.steps > 0 and run.metrics.get("checkpoint"):
                resumed = run
                reason = f"{died}; run {run_id[:8]} resumed from its checkpoint"
                self.store.finish_train_run(run.id, status="interrupted", reason=reason)
            else:
                why = "a newer run was resumed" if resumed else "no checkpoint from the serving adapter"
                self.store.finish_train_run(run.id, status="error", reason=f"{died}; not resumed ({why})")
        return resumed

    def _fresh_samples(self) -> tuple[list[Sample], dict[str, Any]]:
        cfg = self.config
        samples = collect_samples(self.store)
        trained = self._trained_turns()
        fresh = [s for s in samples if s.turn_id not in trained]
        order = [a.version for a in self.registry.versions()]
        current = self.registry.current()
        kept, stale = drop_stale(fresh, order, current.version if current else None, cfg.max_staleness)
        return kept, {
            "samples_scored": float(len(samples)),
            "samples_fresh": float(len(fresh)),
            "dropped_stale": float(stale),
        }

    @staticmethod
    def _chat(sample: Sample) -> list[dict[str, Any]]:
        from langchain_core.messages import messages_from_dict

        from langchain_metaclaw.messages import convert_messages

        return convert_messages(messages_from_dict(sample.messages)) if sample.messages else []

    def _prompts(self, samples: Sequence[Sample]) -> list[list[dict[str, Any]]]:
        """Distinct captured prompts (chat dicts), most recent first."""
        seen, prompts = set(), []
        for sample in reversed(samples):
            chat = self._chat(sample)
            if chat and repr(chat) not in seen:
                seen.add(repr(chat))
                prompts.append(chat)
        return prompts

    # ------------------------------------------------------------------ one step

    def _offpolicy_data(self, samples: Sequence[Sample]) -> tuple[list[Datum], dict[str, float]]:
        tokenizer = None
        data, retokenized = [], []
        for sample, adv in zip(samples, self._baseline.advantages(samples), strict=True):
            if sample.completion_token_ids is None and tokenizer is None:
                tokenizer = self.backend.get_tokenizer()
            datum = sample_to_datum(sample, adv, tokenizer)
            if sample.logprobs is None:
                retokenized.append(len(data))
            data.append(datum)
        if retokenized and self.config.loss_fn != "cross_entropy":
            recomputed = self.backend.compute_logprobs([data[i] for i in retokenized])
            for i, logprobs in zip(retokenized, recomputed, strict=True):
                data[i] = data[i].with_inputs(logprobs=logprobs)
        return data, {"retokenized_recomputed": float(len(retokenized))}

    def _onpolicy_data(
        self, prompts: Sequence[list[dict[str, Any]]], adapter: str | None
    ) -> tuple[list[Datum], dict[str, float]]:
        """G completions per prompt from the current weights, scored by ``reward_fn``, group advantages."""
        cfg = self.config
        data: list[Datum] = []
        rewards_all: list[float] = []
        constant = explored = 0
        for prompt in prompts:
            pairs = self._scored_group(prompt, adapter, cfg.temperature)
            advantages = group_advantages([w for _, w in pairs], normalize=cfg.normalize_group_advantages)
            if advantages is None and cfg.explore_temperature:
                explored += 1
                pairs = self._scored_group(prompt, adapter, cfg.explore_temperature)
                advantages = group_advantages([w for _, w in pairs], normalize=cfg.normalize_group_advantages)
            rewards_all.extend(w for _, w in pairs)
            if advantages is None:
                constant += 1
                if not cfg.kl_coef:
                    continue
                # no reward signal, but the KL term still pulls a collapsed policy back toward the base
                advantages = [0.0] * len(pairs)
            for (result, _), adv in zip(pairs, advantages, strict=True):
                data.append(
                    datum_from_tokens(
                        result.prompt_token_ids, result.completion_token_ids, result.logprobs, adv
                    )
                )
        metrics = {
            "groups": float(len(prompts)),
            "constant_groups": float(constant),
            "explored_groups": float(explored),
            "group_reward:mean": statistics.fmean(rewards_all) if rewards_all else 0.0,
        }
        return data, metrics

    def _scored_group(
        self, prompt: list[dict[str, Any]], adapter: str | None, temperature: float
    ) -> list[tuple[Any, float]]:
        """``group_size`` completions of ``prompt`` with their rewards (completions without one dropped)."""
        # one batched decode per group: the prompt is prefilled once, the G rows decode together
        results = self._engine().sample_group(
            prompt,
            n=self.config.group_size,
            adapter=adapter,
            max_new_tokens=self.config.max_new_tokens,
            temperature=temperature,
            seed=self._rng.randrange(2**31),
        )
        rewards = [self.reward_fn(prompt, r.text) for r in results]
        return [(r, float(w)) for r, w in zip(results, rewards, strict=True) if w is not None]

    def train_step(self, data: Sequence[Datum]) -> dict[str, float]:
        cfg = self.config
        config = {"kl_coef": cfg.kl_coef} if cfg.kl_coef else None
        out = self.backend.forward_backward(list(data), cfg.loss_fn, config)
        opt = self.backend.optim_step(AdamParams(learning_rate=cfg.learning_rate))
        return {**out.metrics, **opt.metrics, "data": float(len(data))}

    # ------------------------------------------------------------------ evaluation and promotion

    def evaluate(self, adapter: str | None, prompts: Sequence[list[dict[str, Any]]]) -> float | None:
        """Mean ``reward_fn`` of greedy answers by ``adapter`` (``None``: base) on ``prompts``."""
        if self.reward_fn is None or not prompts:
            return None
        engine = self._engine()
        rewards = []
        # greedy, several prompts per batched decode (the same tokens as generate() one prompt at a time)
        results = engine.generate_batch(
            list(prompts), adapter=adapter, max_new_tokens=self.config.max_new_tokens
        )
        for prompt, result in zip(prompts, results, strict=True):
            reward = self.reward_fn(prompt, result.text)
            if reward is not None:
                rewards.append(float(reward))
        return statistics.fmean(rewards) if rewards else None

    def check_live_reward(self) -> str | None:
        """Roll back the serving adapter when its live reward fell below its parent's; returns what it did."""
        current = self.registry.current()
        if current is None:
            return None

        now, before = self.store.live_rewards(current.version), self.store.live_rewards(current.parent_version)
        n = self.config.live_min_samples
        if len(now) < n or len(before) < n:
            return None
        drop = statistics.fmean(before) - statistics.fmean(now)
        if drop > self.config.rollback_drop:
            back = self.registry.rollback()
            reason = (
                f"live reward of {current.version} fell {drop:.2f} below {current.parent_version or 'base'} "
                f"({len(now)} vs {len(before)} scored turns): rolled back to {back.version if back else 'base'}"
            )
            self.store.update_adapter(current.version, notes=reason)
            logger.warning(reason)
            return reason
        return None

    # ------------------------------------------------------------------ the loop

    def run(
        self,
        max_steps: int | None = None,
        stop_event: threading.Event | None = None,
        progress: Callable[[int, int, dict[str, float]], None] | None = None,
    ) -> TrainRun:
        """Train up to ``max_steps`` steps; returns the recorded train run (status says what happened)."""
        cfg = self.config
        max_steps = max_steps or cfg.max_steps
        stop_event = stop_event or threading.Event()
        current = self.registry.current()
        run = self.store.start_train_run(
            backend=cfg.backend,
            config=cfg.model_dump(),
            base_adapter=current.version if current else None,
            metrics={"owner": _owner()},
        )
        try:
            return self._run(run.id, current, max_steps, stop_event, progress)
        except BackendUnavailableError as exc:
            self.store.finish_train_run(run.id, status="error", reason=f"backend unavailable: {exc}")
        except MetaClawError as exc:
            self.store.finish_train_run(run.id, status="error", reason=str(exc))
        except Exception as exc:
            logger.exception("training run %s failed", run.id)
            self.store.finish_train_run(run.id, status="error", reason=f"{type(exc).__name__}: {exc}")
        return self._get_run(run.id)

    def _get_run(self, run_id: str) -> TrainRun:
        return next(r for r in self.store.train_runs() if r.id == run_id)

    def _run(self, run_id: str, current, max_steps: int, stop_event: threading.Event, progress) -> TrainRun:
        cfg = self.config
        rolled = self.check_live_reward()
        if rolled:
            current = self.registry.current()
        resumed = self._close_dead_runs(run_id, current)
        samples, meta = self._fresh_samples()
        meta["owner"] = _owner()
        onpolicy = cfg.group_size > 1 and self.reward_fn is not None
        if not samples and not onpolicy:
            reason = (
                "no scored turns yet"
                if meta["samples_scored"] == 0
                else f"all {int(meta['samples_fresh'])} fresh samples are stale (> {cfg.max_staleness} versions old)"
                if meta["samples_fresh"]
                else "no new scored turns since the last run"
            )
            self.store.finish_train_run(run_id, status="skipped", reason=reason, metrics=meta)
            return self._get_run(run_id)
        if not onpolicy and len(samples) < cfg.min_samples:
            self.store.finish_train_run(
                run_id,
                status="skipped",
                metrics=meta,
                reason=f"{len(samples)} fresh scored samples < min_samples={cfg.min_samples}",
            )
            return self._get_run(run_id)
        eval_prompts = self._eval_prompts
        prompts = self._prompts(samples)
        if eval_prompts is None:  # hold out the most recent prompts; never train on them
            eval_prompts, prompts = prompts[: cfg.eval_prompts // 2], prompts[cfg.eval_prompts // 2 :]
        held_out = {repr(p) for p in eval_prompts}
        samples = [s for s in samples if repr(self._chat(s)) not in held_out]
        meta["held_out_prompts"] = float(len(eval_prompts))
        if not onpolicy and not samples:
            self.store.finish_train_run(
                run_id,
                status="skipped",
                metrics=meta,
                reason="every fresh sample is held out for evaluation; waiting for more traffic",
            )
            return self._get_run(run_id)
        if onpolicy and not prompts:
            self.store.finish_train_run(
                run_id, status="skipped", metrics=meta, reason="no captured prompts to sample"
            )
            return self._get_run(run_id)

        backend = self.backend
        if resumed is not None:
            backend.load_state(resumed.metrics["checkpoint"])
            meta["resumed_from"] = resumed.id
        elif current is not None and current.metrics.get("state_path"):
            backend.load_state(current.metrics["state_path"])
        step_adapter = current.version if current else None
        engine = self._engine() if onpolicy else None
        if engine is not None and resumed is not None:  # sample from the weights the dead run got to
            step_adapter = f"{run_id[:8]}-s0"
            engine.load_adapter(step_adapter, backend.save_weights_for_sampler(step_adapter).path_or_uri)
        elif engine is not None and current is not None and current.version not in engine.adapters:
            engine.load_adapter(current.version, current.uri)
        trained: list[str] = []
        steps = 0
        metrics: dict[str, Any] = dict(meta)
        stopped = None
        for step in range(max_steps):
            if stop_event.is_set():
                stopped = f"stop requested before step {step + 1}"
                break
            started = time.monotonic()
            if onpolicy:
                batch_prompts = self._rng.sample(prompts, min(cfg.group_prompts, len(prompts)))
                data, step_meta = self._onpolicy_data(batch_prompts, step_adapter)
            else:
                batch = samples[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                if not batch:
                    break
                data, step_meta = self._offpolicy_data(batch)
                trained.extend(s.turn_id for s in batch)
            if not data:
                step_metrics = {**step_meta, "skipped_step": 1.0}
            else:
                step_metrics = {**step_meta, **self.train_step(data)}
                steps += 1
                if onpolicy:  # the next groups come from the weights just trained
                    saved = backend.save_weights_for_sampler(f"{run_id[:8]}-s{steps}")
                    name = f"{run_id[:8]}-s{steps}"
                    engine.load_adapter(name, saved.path_or_uri)
                    if step_adapter and step_adapter.startswith(run_id[:8]):
                        engine.unload_adapter(step_adapter)
                    step_adapter = name
            step_metrics["seconds"] = time.monotonic() - started
            self.history.append(step_metrics)
            metrics = {**metrics, **{f"last_{k}": v for k, v in step_metrics.items()}}
            if progress:
                progress(step + 1, max_steps, step_metrics)
            checkpoint = backend.save_state(f"{run_id[:8]}-ckpt")
            metrics["checkpoint"] = checkpoint
            self.store.update_train_run(run_id, steps=steps, samples=trained, metrics=metrics)
        metrics["steps"] = float(steps)
        if steps == 0:
            status = "stopped" if stopped else "skipped"
            self.store.finish_train_run(
                run_id,
                status=status,
                reason=stopped or "no step had any signal (every group scored alike)",
                metrics=metrics,
                samples=trained,
            )
            return self._get_run(run_id)

        version = f"{run_id[:8]}"
        saved = backend.save_weights_for_sampler(f"cand-{version}")
        state_path = backend.save_state(f"cand-{version}")
        candidate = self.registry.register(
            saved.path_or_uri,
            backend=cfg.backend,
            base_model=cfg.base_model,
            parent_version=current.version if current else None,
            metrics={"state_path": state_path, "train_run": run_id},
        )
        decision = self._gate(candidate.version, current.version if current else None, eval_prompts, metrics)
        self.store.update_adapter(
            candidate.version, metrics={**candidate.metrics, **decision["metrics"]}, notes=decision["reason"]
        )
        status = "stopped" if stopped else "ok"
        self.store.finish_train_run(
            run_id,
            status=status,
            reason=stopped or decision["reason"],
            steps=steps,
            samples=trained,
            metrics={**metrics, **decision["metrics"]},
            candidate_adapter=candidate.version,
        )
        return self._get_run(run_id)

    def _gate(self, candidate: str, serving: str | None, prompts, metrics) -> dict[str, Any]:
        if self.reward_fn is None:
            return {"reason": "candidate kept: no reward_fn to evaluate it, promote by hand", "metrics": {}}
        engine = self._engine()
        adapter = self.registry.get(candidate)
        if candidate not in engine.adapters:
            engine.load_adapter(candidate, adapter.uri)
        before = self.evaluate(serving, prompts)
        after = self.evaluate(candidate, prompts)
        result = {"eval_serving": before, "eval_candidate": after, "eval_prompts": float(len(prompts))}
        if before is None or after is None:
            return {"reason": "candidate kept: no held-out prompts scored", "metrics": result}
        if after >= before - self.config.promotion_margin:
            self.registry.promote(candidate, validator=lambda a: None)
            return {"reason": f"promoted: held-out reward {before:.3f} -> {after:.3f}", "metrics": result}
        self.store.update_adapter(candidate, status="rejected")
        return {"reason": f"rejected: held-out reward {before:.3f} -> {after:.3f}", "metrics": result}


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _owner_is_dead(owner: dict[str, Any] | None) -> bool:
    """True when a running train run's process is known to be gone (same host, no such pid)."""
    if not owner or owner.get("host") != socket.gethostname() or owner.get("pid") == os.getpid():
        return False
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, TypeError, KeyError):
        return False
    return False
