"""The ``local`` training backend: LoRA with peft + transformers on this machine's CPU or GPU.

Micro-batching (:mod:`.micro_batches`): data are bucketed by length into micro-batches of at most
``token_budget`` padded tokens; gradients accumulate over them, and since every loss is a sum over tokens
the result equals one big batch while peak memory stays bounded. True sequence packing would need a
block-diagonal attention mask, which SDPA on CPU has no variable-length kernel for; bucketing is cheaper
here, and a datum longer than the budget simply runs alone.

Shared prompts. Data that start with the same unweighted prompt (an on-policy group: G completions of one
prompt) run that prompt once: its forward pass yields the keys and values every completion of the group
attends to, the completions run as one micro-batch on top of them, and the backward pass sums their
gradients into the prompt's single graph. Same gradients as running each datum whole (tested), and a group
of 8 completions of a 100-token prompt trains ~3x fewer tokens.

Precision: float32 by default (bf16 on a CPU without AMX is ~25x slower). The base model's weights are
shared with the process-wide cached copy (``models.embedded.copy_sharing_weights``), so a serving model in
the same process costs no extra weight memory; only the LoRA parameters and the optimizer state are ours.

Checkpoints (:mod:`.checkpoints`) are safetensors + JSON only, never pickle, published with a rename.
Samplers (:mod:`.samplers`): the weights just trained are saved as a peft adapter and loaded, under the
checkpoint's own name, into this process's :class:`LocalEngine` (the one serving shares).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_metaclaw._compat import require
from langchain_metaclaw.errors import ConfigurationError, TrainingError
from langchain_metaclaw.training.backends.base import LogprobModel, validate_request
from langchain_metaclaw.training.backends.checkpoints import (
    atomic_dir,
    check_name,
    load_adapter_weights,
    quiet_transformers,
    read_optimizer_state,
    read_state,
    save_adapter,
    write_state,
)
from langchain_metaclaw.training.backends.micro_batches import (
    MetricsAccumulator,
    collate,
    micro_batch_loss,
    plan_micro_batches,
    remainder,
    shared_prefix_groups,
)
from langchain_metaclaw.training.backends.samplers import LocalSampler
from langchain_metaclaw.training.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    LossFnName,
    OptimStepResult,
    SavedWeights,
)

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_TARGET_MODULES", "LocalTrainingBackend"]

logger = logging.getLogger(__name__)

DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
_NICE_LOCK = threading.Lock()
_NICE_APPLIED = False


class LocalTrainingBackend:
    """LoRA training with peft on this machine, behind the :class:`TrainingBackend` protocol.

    Args:
        base_model (`str`, *optional*): `None` for the embedded SmolLM2-135M-Instruct, else a HuggingFace
            id or local directory (``models.embedded.load_base_model``). Ignored for loading when ``model``
            is given (then it only names the model).
        model (*optional*): an already-built ``transformers`` causal LM to train instead (tests, custom
            loading). It is not modified: peft wraps a copy that shares its weights.
        tokenizer (*optional*): its tokenizer (``get_tokenizer`` raises without one).
        rank (`int`, defaults to 16), alpha (`int`, defaults to 32), dropout (`float`, defaults to 0.0):
            the LoRA configuration.
        target_modules (`Sequence[str]`): module names to adapt (all attention and MLP projections).
        token_budget (`int`, defaults to 1024): padded tokens per micro-batch; bounds peak memory.
        share_prefixes (`bool`, defaults to `True`): run a prompt shared by several data once (see above).
        threads (`int`, *optional*): torch intra-op threads (process-wide). `None` keeps torch's setting,
            or half the cores when ``low_priority``.
        low_priority (`bool`, defaults to `False`): raise this process's niceness by ``nice_increment``
            (once per process; it cannot be lowered again), so training yields the CPU to the user. Run the
            trainer in its own process when serving shares the machine.
        output_dir (`str | Path`, *optional*): where checkpoints go; defaults to
            ``$METACLAW_HOME/training/local``. Sampler weights go to ``<output_dir>/sampler_weights/<name>``,
            states to ``<output_dir>/state/<name>``.
        device (`str`, *optional*): ``"cuda"`` when available, else ``"cpu"``.
        dtype (*optional*): weight dtype when this backend loads the model (default float32).
        seed (`int`, defaults to 0): seeds the LoRA initialisation.
        engine (*optional*): the :class:`LocalEngine` samplers load their weights into; default the
            process's shared engine for ``base_model`` (the one serving uses).
    """

    def __init__(
        self,
        base_model: str | None = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        rank: int = 16,
        alpha: int = 32,
        dropout: float = 0.0,
        target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
        token_budget: int = 1024,
        share_prefixes: bool = True,
        threads: int | None = None,
        low_priority: bool = False,
        nice_increment: int = 10,
        output_dir: str | os.PathLike[str] | None = None,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        seed: int = 0,
        engine: Any = None,
    ) -> None:
        if token_budget <= 0:
            msg = f"token_budget must be positive, got {token_budget}"
            raise ConfigurationError(msg)
        self.token_budget = int(token_budget)
        self.share_prefixes = bool(share_prefixes)
        self.rank, self.alpha, self.dropout = int(rank), int(alpha), float(dropout)
        self.target_modules = tuple(target_modules)
        self.seed = seed
        _configure_threads(threads, low_priority, nice_increment)
        self._engine, self._engine_model = engine, base_model
        if model is None:
            from langchain_metaclaw.models.embedded import EMBEDDED_MODEL_ID, load_base_model

            model, loaded_tokenizer = load_base_model(base_model, dtype=dtype)
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
            base_model = base_model or EMBEDDED_MODEL_ID
        self.base_model: str = base_model or getattr(model.config, "_name_or_path", "") or "unnamed"
        self._tokenizer = tokenizer
        torch = require("torch", backend="local", extra="local")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = self._wrap_lora(model, seed)
        self._trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not self._trainable:
            msg = f"No module of the model matched target_modules={list(self.target_modules)}"
            raise ConfigurationError(msg)
        self._optimizer = _adamw([p for _, p in self._trainable])
        self._step = 0
        self._closed = False
        self._lock = threading.RLock()
        if output_dir is None:
            from langchain_metaclaw.config import metaclaw_home

            output_dir = metaclaw_home() / "training" / "local"
        self.output_dir = Path(output_dir)

    def _wrap_lora(self, model: Any, seed: int) -> Any:
        """A peft LoRA model over a copy of ``model`` that shares its weights (the caller's stays untouched)."""
        torch = require("torch", backend="local", extra="local")
        peft = require("peft", backend="local", extra="local")
        require("safetensors", backend="local", extra="local")
        from langchain_metaclaw.models.embedded import copy_sharing_weights

        if next(model.parameters()).device == self.device:
            base = copy_sharing_weights(model)  # the cached model stays untouched; weights are shared
        else:  # moving shared parameters would move the caller's model too: take a private copy
            import copy

            base = copy.deepcopy(model).to(self.device)
        if getattr(base.config, "use_cache", None):
            base.config.use_cache = False
        lora_config = peft.LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        with torch.random.fork_rng(devices=[]), quiet_transformers():
            torch.manual_seed(seed)
            wrapped = peft.get_peft_model(base, lora_config)
        wrapped.peft_config["default"].base_model_name_or_path = self.base_model
        return wrapped

    # --- protocol ----------------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """Optimizer steps taken (restored by ``load_state``)."""
        return self._step

    def get_tokenizer(self) -> Any:
        if self._tokenizer is None:
            msg = "This LocalTrainingBackend was built from a model without a tokenizer"
            raise ConfigurationError(msg)
        return self._tokenizer

    def forward_backward(self, data: Sequence[Datum], loss_fn: LossFnName,
                         loss_fn_config: Mapping[str, float] | None = None) -> ForwardBackwardOutput:
        require("torch", backend="local", extra="local")
        data = list(data)
        config = dict(loss_fn_config or {})
        validate_request(data, loss_fn, config)
        if not data:
            return ForwardBackwardOutput(loss_fn_outputs=[], metrics={"loss:sum": 0.0, "tokens:sum": 0.0})
        with self._lock:
            self._check_open()
            if config.get("kl_coef") and any("ref_logprobs" not in d.loss_fn_inputs for d in data):
                missing = [i for i, d in enumerate(data) if "ref_logprobs" not in d.loss_fn_inputs]
                refs = self.compute_logprobs([data[i] for i in missing], model="base")
                for i, ref in zip(missing, refs, strict=True):
                    data[i] = data[i].with_inputs(ref_logprobs=ref)

            self.model.train()
            outputs: list[dict[str, list[float]] | None] = [None] * len(data)
            acc = MetricsAccumulator()
            groups, alone = shared_prefix_groups(data) if self.share_prefixes else ([], list(range(len(data))))
            real_tokens = sum(data[i].length for i in alone)
            try:
                for prefix, members in groups:
                    real_tokens += prefix + sum(data[i].length - prefix for i in members)
                    self._shared_prefix_pass(data, prefix, members, loss_fn, config, outputs, acc)
                for plan in plan_micro_batches([data[i].length for i in alone], self.token_budget):
                    idx = [alone[j] for j in plan]
                    batch = collate([data[i] for i in idx], self.device, with_inputs=True)
                    loss, rows = micro_batch_loss(batch, self._logits(batch), loss_fn, config, acc)
                    for row, i in enumerate(idx):
                        outputs[i] = {"logprobs": rows[row, : data[i].length].tolist()}
                    loss.backward()
                    del loss, batch
            except Exception as exc:
                # A half-accumulated batch must not leak into the next optim_step.
                self._optimizer.zero_grad(set_to_none=True)
                msg = f"forward_backward failed ({type(exc).__name__}: {exc}); accumulated gradients were cleared"
                raise TrainingError(msg) from exc
            metrics = acc.metrics(len(data), real_tokens)
            metrics["shared_prefix_tokens:sum"] = float(sum(p * (len(m) - 1) for p, m in groups))
            return ForwardBackwardOutput(loss_fn_outputs=[o for o in outputs if o is not None], metrics=metrics)

    @functools.cached_property
    def _cache_arg(self) -> str:
        """transformers 5.2x renamed forward's ``past_key_values`` to ``cache`` (the old name warns)."""
        params = inspect.signature(self.model.get_base_model().forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    def _shared_prefix_pass(self, data, prefix: int, members: list[int], loss_fn: LossFnName,
                            config: Mapping[str, float], outputs: list, acc: MetricsAccumulator) -> None:
        """Forward the shared prompt once, then every member's remainder on top of its keys and values."""
        import torch
        from transformers import DynamicCache

        from langchain_metaclaw.training.losses import token_logprobs

        first = data[members[0]]
        prompt = self.model(
            input_ids=torch.tensor([list(first.model_input[:prefix])], dtype=torch.long, device=self.device),
            use_cache=True,
        )
        kv = [(layer.keys, layer.values) for layer in getattr(prompt, self._cache_arg).layers]
        with torch.no_grad():  # prompt positions carry weight 0: their logprobs are reported, not trained
            targets = torch.tensor([first.target_tokens[:prefix]], dtype=torch.long, device=self.device)
            prompt_logprobs = token_logprobs(prompt.logits.detach(), targets)[0].to("cpu").tolist()
        del prompt
        acc.padded_tokens += prefix
        rests = [remainder(data[i], prefix) for i in members]
        plans = plan_micro_batches([d.length for d in rests], self.token_budget)
        for n, plan in enumerate(plans):
            batch = collate([rests[j] for j in plan], self.device, with_inputs=True)
            rows = len(plan)
            # expand: a view, so the backward pass sums every row's gradient into the one prompt pass
            cache = DynamicCache(
                ddp_cache_data=[(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in kv]
            )
            ones = torch.ones((rows, prefix), dtype=batch["attention_mask"].dtype, device=self.device)
            logits = self.model(
                input_ids=batch["input_ids"],
                attention_mask=torch.cat([ones, batch["attention_mask"]], dim=1),
                use_cache=True,
                **{self._cache_arg: cache},
            ).logits
            loss, logp = micro_batch_loss(batch, logits, loss_fn, config, acc)
            for row, j in enumerate(plan):
                outputs[members[j]] = {"logprobs": prompt_logprobs + logp[row, : rests[j].length].tolist()}
            del logits, cache
            loss.backward(retain_graph=n < len(plans) - 1)  # the prompt's graph serves every micro-batch

    def optim_step(self, adam_params: AdamParams) -> OptimStepResult:
        torch = require("torch", backend="local", extra="local")
        with self._lock:
            self._check_open()
            params = [p for _, p in self._trainable]
            if all(p.grad is None for p in params):
                msg = "optim_step called with no accumulated gradients: call forward_backward first"
                raise TrainingError(msg)
            for group in self._optimizer.param_groups:
                group["lr"] = adam_params.learning_rate
                group["betas"] = (adam_params.beta1, adam_params.beta2)
                group["eps"] = adam_params.eps
                group["weight_decay"] = adam_params.weight_decay
            with_grad = [p for p in params if p.grad is not None]
            if adam_params.grad_clip_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(with_grad, adam_params.grad_clip_norm)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad])
            grad_norm = float(norm)
            if not torch.isfinite(norm):
                self._optimizer.zero_grad(set_to_none=True)
                msg = f"Non-finite gradient norm ({grad_norm}); step skipped and gradients cleared"
                raise TrainingError(msg)
            self._optimizer.step()
            self._optimizer.zero_grad(set_to_none=True)
            self._step += 1
            return OptimStepResult(
                metrics={
                    "grad_norm": grad_norm,
                    "learning_rate": adam_params.learning_rate,
                    "step": float(self._step),
                }
            )

    def compute_logprobs(
        self, data: Sequence[Datum], *, model: LogprobModel = "current"
    ) -> list[list[float]]:
        from langchain_metaclaw.training.losses import token_logprobs

        torch = require("torch", backend="local", extra="local")
        if model not in ("current", "base"):
            msg = f"model must be 'current' or 'base', got {model!r}"
            raise ConfigurationError(msg)
        data = list(data)
        out: list[list[float] | None] = [None] * len(data)
        with self._lock:
            self._check_open()
            was_training = self.model.training
            self.model.eval()
            context = self.model.disable_adapter() if model == "base" else contextlib.nullcontext()
            try:
                with context, torch.inference_mode():
                    for idx in plan_micro_batches([d.length for d in data], self.token_budget):
                        batch = collate([data[i] for i in idx], self.device, with_inputs=False)
                        logp = token_logprobs(self._logits(batch), batch["target_tokens"]).to("cpu")
                        for row, i in enumerate(idx):
                            out[i] = logp[row, : data[i].length].tolist()
            finally:
                self.model.train(was_training)
        return [o for o in out if o is not None]

    def save_weights_for_sampler(self, name: str) -> SavedWeights:
        check_name(name)
        with self._lock:
            self._check_open()
            dest = self.output_dir / "sampler_weights" / name
            with atomic_dir(dest) as tmp:
                self._save_adapter(tmp, name)
            logger.info("saved sampler weights %s (step %d) at %s", name, self._step, dest)
            return SavedWeights(path_or_uri=str(dest), name=name, step=self._step)

    def save_weights_and_get_sampler(self, name: str) -> LocalSampler:
        """Save the current adapter as ``name`` and load it into the engine; :meth:`LocalSampler.close`
        unloads it again (the name is the caller's, private to its run)."""
        saved = self.save_weights_for_sampler(name)
        return LocalSampler(self.engine, name, saved.path_or_uri, owned=True)

    def sampler(self, version: str | None = None, path: str | None = None) -> LocalSampler:
        """A sampler on ``version`` (loaded from ``path`` unless the engine has it), or the base model.
        A registry version stays loaded after :meth:`LocalSampler.close`: serving may hold it too."""
        return LocalSampler(self.engine, version, path)

    @property
    def engine(self) -> Any:
        """The :class:`LocalEngine` samplers use (the process's shared one unless given)."""
        if self._engine is None:
            from langchain_metaclaw.engine.local import shared_engine

            self._engine = shared_engine(self._engine_model)
        return self._engine

    def save_state(self, name: str) -> str:
        check_name(name)
        with self._lock:
            self._check_open()
            dest = self.output_dir / "state" / name
            with atomic_dir(dest) as tmp:
                self._save_adapter(tmp, name)
                meta = {
                    "step": self._step,
                    "base_model": self.base_model,
                    "lora": self._lora_meta(),
                    "param_names": [n for n, _ in self._trainable],
                }
                write_state(tmp, self._optimizer, meta)
            logger.info("saved training state %s (step %d) at %s", name, self._step, dest)
            return str(dest)

    def load_state(self, path: str) -> None:
        root = Path(path)
        state = read_state(root, self._lora_meta(), [n for n, _ in self._trainable])
        with self._lock:
            self._check_open()
            load_adapter_weights(self.model, root, self.device)
            self._optimizer.load_state_dict(read_optimizer_state(root, state))
            self._optimizer.zero_grad(set_to_none=True)
            self._step = int(state["step"])
            logger.info("loaded training state from %s (step %d)", root, self._step)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.model = None
            self._optimizer = None
            self._trainable = []
        gc.collect()
        torch = require("torch", backend="local", extra="local")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # --- helpers -------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            msg = "This training backend is closed"
            raise TrainingError(msg)

    def _lora_meta(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": sorted(self.target_modules),
        }

    def _logits(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        )
        return out.logits

    def _save_adapter(self, directory: Path, name: str) -> None:
        meta = {"name": name, "step": self._step, "base_model": self.base_model, "lora": self._lora_meta()}
        save_adapter(self.model, directory, meta)


def _lower_priority(increment: int) -> None:
    """Raise the process's niceness once (training yields the CPU to interactive work)."""
    global _NICE_APPLIED
    with _NICE_LOCK:
        if _NICE_APPLIED or not hasattr(os, "nice"):
            return
        try:
            os.nice(increment)
            _NICE_APPLIED = True
            logger.info("training runs at niceness +%d", increment)
        except OSError as exc:  # pragma: no cover - platform specific
            logger.warning("could not lower training priority: %s", exc)


def _configure_threads(threads: int | None, low_priority: bool, nice_increment: int) -> None:
    """Torch intra-op threads (process-wide) and, when ``low_priority``, a higher niceness."""
    torch = require("torch", backend="local", extra="local")
    if low_priority:
        _lower_priority(nice_increment)
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    elif low_priority:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))


def _adamw(params: list[Any]) -> Any:
    """AdamW at :class:`AdamParams`' defaults (``optim_step`` sets each step's values)."""
    torch = require("torch", backend="local", extra="local")
    defaults = AdamParams()
    return torch.optim.AdamW(
        params,
        lr=defaults.learning_rate,
        betas=(defaults.beta1, defaults.beta2),
        eps=defaults.eps,
        weight_decay=defaults.weight_decay,
    )
