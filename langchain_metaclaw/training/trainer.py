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
from dataclasses import dataclass, field
from typing import Any

from langchain_metaclaw.adapters import AdapterRegistry
from langchain_metaclaw.errors import BackendUnavailableError, MetaClawError
from langchain_metaclaw.store.records import AdapterVersion, TrainRun
from langchain_metaclaw.store.trace_store import TraceStore
from langchain_metaclaw.training.config import TrainerConfig
from langchain_metaclaw.training.data import RunningBaseline, Sample, group_advantages, sample_to_datum
from langchain_metaclaw.training.rollouts import RewardFn, group_data, mean_greedy_reward, scored_groups
from langchain_metaclaw.training.sampler import ChatPrompt, Sampler
from langchain_metaclaw.training.selection import Plan, select
from langchain_metaclaw.training.types import AdamParams, Datum

logger = logging.getLogger(__name__)


@dataclass
class _Loop:
    """The state the step loop carries: the current policy's sampler and what was trained so far."""

    metrics: dict[str, Any]
    sampler: Sampler | None = None
    steps: int = 0
    trained: list[str] = field(default_factory=list)
    stopped: str | None = None


class Trainer:
    """Train LoRA adapters from a trace store and promote the ones that are better.

    The loop is tinker-cookbook's: select -> prepare -> train_step -> sampler -> gate. Every policy it
    samples from (on-policy groups, the candidate and the serving adapter at the gate) is a
    :class:`~langchain_metaclaw.training.sampler.Sampler` the training backend hands over, so the loop runs
    the same on the local engine and on Tinker / MinT.

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
        self._owns_backend = backend is None
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

    def close(self) -> None:
        """Close the backend this trainer built (one passed in stays its owner's)."""
        if self._owns_backend and self._backend is not None:
            self._backend.close()
            self._backend = None

    def _sampler_for(self, adapter: AdapterVersion | None) -> Sampler:
        """A sampler on a registered version (``None``: the base model), from the training backend."""
        if adapter is None:
            return self.backend.sampler()
        return self.backend.sampler(adapter.version, adapter.uri)

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

    def _onpolicy_data(self, prompts: Sequence[ChatPrompt], sampler: Sampler) -> tuple[list[Datum], dict[str, float]]:
        """G completions per prompt from ``sampler`` (the current weights), scored by ``reward_fn``; a
        constant group is sampled once more at ``explore_temperature`` when that is on."""
        cfg = self.config
        groups = self._scored_groups(sampler, prompts, cfg.temperature)
        flat = [i for i, g in enumerate(groups) if group_advantages([w for _, w in g]) is None]
        if flat and cfg.explore_temperature:
            again = self._scored_groups(sampler, [prompts[i] for i in flat], cfg.explore_temperature)
            for i, group in zip(flat, again, strict=True):
                groups[i] = group
        data, constant = group_data(groups, normalize=cfg.normalize_group_advantages, kl_coef=cfg.kl_coef)
        rewards = [w for g in groups for _, w in g]
        metrics = {
            "groups": float(len(prompts)),
            "constant_groups": float(constant),
            "explored_groups": float(len(flat) if cfg.explore_temperature else 0),
            "group_reward:mean": statistics.fmean(rewards) if rewards else 0.0,
        }
        return data, metrics

    def _scored_groups(self, sampler: Sampler, prompts: Sequence[ChatPrompt], temperature: float):
        return scored_groups(
            sampler,
            prompts,
            self.reward_fn,  # type: ignore[arg-type]  # on-policy runs only with a reward_fn
            n=self.config.group_size,
            max_tokens=self.config.max_new_tokens,
            temperature=temperature,
            seed=self._rng.randrange(2**31),
        )

    def train_step(self, data: Sequence[Datum]) -> dict[str, float]:
        cfg = self.config
        config = {"kl_coef": cfg.kl_coef} if cfg.kl_coef else None
        out = self.backend.forward_backward(list(data), cfg.loss_fn, config)
        opt = self.backend.optim_step(AdamParams(learning_rate=cfg.learning_rate))
        return {**out.metrics, **opt.metrics, "data": float(len(data))}

    # ------------------------------------------------------------------ evaluation and promotion

    def evaluate(self, adapter: str | Sampler | None, prompts: Sequence[list[dict[str, Any]]]) -> float | None:
        """Mean ``reward_fn`` of greedy answers by ``adapter`` on ``prompts``.

        ``adapter``: a registered version, ``None`` for the base model, or a ready :class:`Sampler`.
        """
        if self.reward_fn is None or not prompts:
            return None
        if isinstance(adapter, str | None):
            return self._evaluate_version(self.registry.get(adapter) if adapter else None, prompts)
        return mean_greedy_reward(adapter, prompts, self.reward_fn, max_tokens=self.config.max_new_tokens)

    def _evaluate_version(self, adapter: AdapterVersion | None, prompts: Sequence[ChatPrompt]) -> float | None:
        sampler = self._sampler_for(adapter)
        try:
            return self.evaluate(sampler, prompts)
        finally:
            sampler.close()

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
        run = self.store.train_run(run_id)
        if run is None:  # the run this trainer started: train runs are never deleted
            msg = f"train run {run_id} vanished from the store"
            raise MetaClawError(msg)
        return run

    def _run(self, run_id: str, current, max_steps: int, stop_event: threading.Event, progress) -> TrainRun:
        """select -> prepare -> (train_step -> sampler) x steps -> candidate -> gate."""
        if self.check_live_reward():
            current = self.registry.current()
        resumed = self._close_dead_runs(run_id, current)
        plan, skipped = select(
            self.store,
            self.registry,
            self.config,
            onpolicy=self.config.group_size > 1 and self.reward_fn is not None,
            eval_prompts=self._eval_prompts,
            owner=_owner(),
        )
        if skipped:
            self.store.finish_train_run(run_id, status="skipped", reason=skipped, metrics=plan.meta)
            return self._get_run(run_id)
        loop = self._prepare(run_id, plan, current, resumed)
        try:
            self._train(run_id, plan, loop, max_steps, stop_event, progress)
        finally:
            if loop.sampler is not None:
                loop.sampler.close()
        loop.metrics["steps"] = float(loop.steps)
        if loop.steps == 0:
            self.store.finish_train_run(
                run_id,
                status="stopped" if loop.stopped else "skipped",
                reason=loop.stopped or "no step had any signal (every group scored alike)",
                metrics=loop.metrics,
                samples=loop.trained,
            )
            return self._get_run(run_id)
        self._finish_with_candidate(run_id, plan, loop, current)
        return self._get_run(run_id)

    def _prepare(self, run_id: str, plan: Plan, current: AdapterVersion | None, resumed: TrainRun | None) -> _Loop:
        """Load the weights to start from; for on-policy runs, get a sampler on exactly those weights."""
        backend = self.backend
        if resumed is not None:
            backend.load_state(resumed.metrics["checkpoint"])
            plan.meta["resumed_from"] = resumed.id
        elif current is not None and current.metrics.get("state_path"):
            backend.load_state(current.metrics["state_path"])
        loop = _Loop(metrics=dict(plan.meta))
        if plan.onpolicy:
            # a resumed run samples from the weights the dead run got to, else from the serving version
            loop.sampler = (
                backend.save_weights_and_get_sampler(f"{run_id[:8]}-s0")
                if resumed is not None
                else self._sampler_for(current)
            )
        return loop

    def _train(self, run_id: str, plan: Plan, loop: _Loop, max_steps: int, stop_event, progress) -> None:
        """Up to ``max_steps`` steps; the stop event is checked before each, every step is checkpointed."""
        for step in range(max_steps):
            if stop_event.is_set():
                loop.stopped = f"stop requested before step {step + 1}"
                return
            started = time.monotonic()
            step_data = self._step_data(plan, loop, step)
            if step_data is None:
                return
            data, step_metrics = step_data
            if not data:
                step_metrics["skipped_step"] = 1.0
            else:
                step_metrics.update(self.train_step(data))
                loop.steps += 1
                if plan.onpolicy:  # the next groups come from the weights just trained
                    self._next_sampler(run_id, loop)
            step_metrics["seconds"] = time.monotonic() - started
            self.history.append(step_metrics)
            loop.metrics = {**loop.metrics, **{f"last_{k}": v for k, v in step_metrics.items()}}
            if progress:
                progress(step + 1, max_steps, step_metrics)
            loop.metrics["checkpoint"] = self.backend.save_state(f"{run_id[:8]}-ckpt")
            self.store.update_train_run(run_id, steps=loop.steps, samples=loop.trained, metrics=loop.metrics)

    def _step_data(self, plan: Plan, loop: _Loop, step: int) -> tuple[list[Datum], dict[str, float]] | None:
        """This step's data: fresh groups from the current sampler, or the next batch of captured samples
        (``None`` when the captured samples are used up)."""
        cfg = self.config
        if plan.onpolicy:
            prompts = self._rng.sample(plan.prompts, min(cfg.group_prompts, len(plan.prompts)))
            return self._onpolicy_data(prompts, loop.sampler)  # type: ignore[arg-type]
        batch = plan.samples[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        if not batch:
            return None
        data, metrics = self._offpolicy_data(batch)
        loop.trained.extend(s.turn_id for s in batch)
        return data, metrics

    def _next_sampler(self, run_id: str, loop: _Loop) -> None:
        previous = loop.sampler
        loop.sampler = self.backend.save_weights_and_get_sampler(f"{run_id[:8]}-s{loop.steps}")
        if previous is not None:
            previous.close()

    def _finish_with_candidate(self, run_id: str, plan: Plan, loop: _Loop, current: AdapterVersion | None) -> None:
        """Register what was learned as a candidate, gate it, and close the run."""
        cfg = self.config
        version = f"{run_id[:8]}"
        saved = self.backend.save_weights_for_sampler(f"cand-{version}")
        state_path = self.backend.save_state(f"cand-{version}")
        candidate = self.registry.register(
            saved.path_or_uri,
            backend=cfg.backend,
            base_model=cfg.base_model,
            parent_version=current.version if current else None,
            metrics={"state_path": state_path, "train_run": run_id},
        )
        decision = self._gate(candidate, current, plan.eval_prompts)
        self.store.update_adapter(
            candidate.version, metrics={**candidate.metrics, **decision["metrics"]}, notes=decision["reason"]
        )
        self.store.finish_train_run(
            run_id,
            status="stopped" if loop.stopped else "ok",
            reason=loop.stopped or decision["reason"],
            steps=loop.steps,
            samples=loop.trained,
            metrics={**loop.metrics, **decision["metrics"]},
            candidate_adapter=candidate.version,
        )

    def _gate(
        self, candidate: AdapterVersion, serving: AdapterVersion | None, prompts: Sequence[ChatPrompt]
    ) -> dict[str, Any]:
        """Promote ``candidate`` when its held-out reward is not worse than the serving version's."""
        if self.reward_fn is None:
            return {"reason": "candidate kept: no reward_fn to evaluate it, promote by hand", "metrics": {}}
        before = after = None
        if prompts:
            before = self._evaluate_version(serving, prompts)
            after = self._evaluate_version(candidate, prompts)
        result = {"eval_serving": before, "eval_candidate": after, "eval_prompts": float(len(prompts))}
        if before is None or after is None:
            return {"reason": "candidate kept: no held-out prompts scored", "metrics": result}
        if after >= before - self.config.promotion_margin:
            self.registry.promote(candidate.version)  # the one validator runs here too
            return {"reason": f"promoted: held-out reward {before:.3f} -> {after:.3f}", "metrics": result}
        self.store.update_adapter(candidate.version, status="rejected")
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
