"""The ``local`` training backend: LoRA with peft + transformers on this machine's CPU or GPU.

Micro-batching. ``forward_backward`` sorts the batch by length (longest first) and packs consecutive data
into micro-batches while ``longest * count <= token_budget``, right-padding each micro-batch only to its own
longest datum. Gradients accumulate over micro-batches; since every loss is a sum over tokens, the result
equals one big batch exactly (up to float rounding), while peak memory is bounded by ``token_budget``
(activations and ``[tokens, vocab]`` logits scale with it). Sorted bucketing leaves little padding
(neighbours in sorted order have similar lengths). True sequence packing (several data in one row) would
remove the rest but needs a block-diagonal attention mask: on CPU, SDPA has no variable-length kernel, so
a packed row costs attention over the whole row and materialises an ``L x L`` mask; bucketing is cheaper
here, and a datum longer than the budget simply runs alone.

Shared prompts. Data that start with the same unweighted prompt (an on-policy group: G completions of one
prompt) run that prompt once: its forward pass yields the keys and values every completion of the group
attends to, the completions run as one micro-batch on top of them, and the backward pass sums their
gradients into the prompt's single graph. Same gradients as running each datum whole (tested), and a group
of 8 completions of a 100-token prompt trains ~3x fewer tokens.

Precision: float32 by default (bf16 on a CPU without AMX is ~25x slower). The base model's weights are
shared with the process-wide cached copy (``models.embedded.copy_sharing_weights``), so a serving model in
the same process costs no extra weight memory; only the LoRA parameters and the optimizer state are ours.

Checkpoints are safetensors + JSON only, never pickle: ``save_weights_for_sampler`` writes a peft adapter
directory (``adapter_config.json`` + ``adapter_model.safetensors``); ``save_state`` writes the same plus
``optimizer.safetensors`` (AdamW state tensors, flattened) and ``trainer_state.json`` (the optimizer state's
structure, the step, the LoRA config). Both are written to a temporary sibling directory and renamed into
place, so a run killed mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_metaclaw._compat import require
from langchain_metaclaw.errors import AdapterError, ConfigurationError, TrainingError
from langchain_metaclaw.training.backends.base import LogprobModel, validate_request
from langchain_metaclaw.training.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    LossFnName,
    Metrics,
    OptimStepResult,
    SavedWeights,
)

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_TARGET_MODULES", "LocalTrainingBackend", "plan_micro_batches"]

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
STATE_FORMAT = 1
_STATE_FILE = "trainer_state.json"
_OPTIMIZER_FILE = "optimizer.safetensors"
_ADAPTER_FILE = "adapter_model.safetensors"
_ADAPTER_CONFIG = "adapter_config.json"
_META_FILE = "metaclaw_adapter.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ENTROPY_CHUNK = 256  # rows of [rows, vocab] softmax materialised at once for the entropy metric
_NICE_LOCK = threading.Lock()
_NICE_APPLIED = False


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


def _remainder(datum: Datum, prefix: int) -> Datum:
    """``datum`` without its first ``prefix`` positions (their keys and values come from the shared pass)."""
    return Datum(
        model_input=list(datum.model_input[prefix:]),
        loss_fn_inputs={k: list(v[prefix:]) for k, v in datum.loss_fn_inputs.items()},
    )


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        msg = f"Checkpoint name {name!r} must match {_NAME_RE.pattern} (it becomes a directory name)"
        raise ConfigurationError(msg)


def _fsync_dir_files(path: Path) -> None:
    for file in path.iterdir():
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())


@contextlib.contextmanager
def _atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``dest``; on success, publish it at ``dest`` with a rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_dir_files(tmp)
        old = None
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(dest, old)
        os.rename(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- optimizer state <-> (safetensors, JSON) -------------------------------------------------------------


def _flatten_state(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested state dict by ``{"__tensor__": key}``; JSON-encode the rest."""
    import torch

    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, Mapping):
        return {"__dict__": [[k, _flatten_state(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    msg = f"Cannot store optimizer state value of type {type(obj).__name__} at {prefix!r} as JSON"
    raise TrainingError(msg)


def _unflatten_state(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _unflatten_state(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_unflatten_state(v, tensors) for v in obj["__tuple__"])
        msg = f"Unrecognised optimizer state node {sorted(obj)}"
        raise AdapterError(msg)
    if isinstance(obj, list):
        return [_unflatten_state(v, tensors) for v in obj]
    return obj


class _MetricsAccumulator:
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
    ) -> None:
        torch = require("torch", backend="local", extra="local")
        peft = require("peft", backend="local", extra="local")
        require("safetensors", backend="local", extra="local")
        from langchain_metaclaw.models.embedded import (
            EMBEDDED_MODEL_ID,
            copy_sharing_weights,
            load_base_model,
        )

        if token_budget <= 0:
            msg = f"token_budget must be positive, got {token_budget}"
            raise ConfigurationError(msg)
        self.token_budget = int(token_budget)
        self.share_prefixes = bool(share_prefixes)
        self.rank, self.alpha, self.dropout = int(rank), int(alpha), float(dropout)
        self.target_modules = tuple(target_modules)
        self.seed = seed

        if low_priority:
            _lower_priority(nice_increment)
        if threads is not None:
            torch.set_num_threads(max(1, int(threads)))
        elif low_priority:
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))

        if model is None:
            model, loaded_tokenizer = load_base_model(base_model, dtype=dtype)
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
            base_model = base_model or EMBEDDED_MODEL_ID
        self.base_model: str = base_model or getattr(model.config, "_name_or_path", "") or "unnamed"
        self._tokenizer = tokenizer
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

        model_device = next(model.parameters()).device
        if model_device == self.device:
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
        with torch.random.fork_rng(devices=[]), _quiet_transformers():
            torch.manual_seed(seed)
            self.model = peft.get_peft_model(base, lora_config)
        self.model.peft_config["default"].base_model_name_or_path = self.base_model
        self._trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not self._trainable:
            msg = f"No module of the model matched target_modules={list(self.target_modules)}"
            raise ConfigurationError(msg)
        defaults = AdamParams()
        self._optimizer = torch.optim.AdamW(
            [p for _, p in self._trainable],
            lr=defaults.learning_rate,
            betas=(defaults.beta1, defaults.beta2),
            eps=defaults.eps,
            weight_decay=defaults.weight_decay,
        )
        self._step = 0
        self._closed = False
        self._lock = threading.RLock()
        if output_dir is None:
            from langchain_metaclaw.config import metaclaw_home

            output_dir = metaclaw_home() / "training" / "local"
        self.output_dir = Path(output_dir)

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

    def forward_backward(
        self,
        data: Sequence[Datum],
        loss_fn: LossFnName,
        loss_fn_config: Mapping[str, float] | None = None,
    ) -> ForwardBackwardOutput:
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
            acc = _MetricsAccumulator()
            groups, alone = shared_prefix_groups(data) if self.share_prefixes else ([], list(range(len(data))))
            real_tokens = sum(data[i].length for i in alone)
            try:
                for prefix, members in groups:
                    real_tokens += prefix + sum(data[i].length - prefix for i in members)
                    self._shared_prefix_pass(data, prefix, members, loss_fn, config, outputs, acc)
                for plan in plan_micro_batches([data[i].length for i in alone], self.token_budget):
                    idx = [alone[j] for j in plan]
                    batch = self._collate([data[i] for i in idx], with_inputs=True)
                    loss, rows = self._loss(batch, self._logits(batch), loss_fn, config, acc)
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

    def _loss(self, batch, logits, loss_fn: LossFnName, config: Mapping[str, float], acc: _MetricsAccumulator):
        """Loss of one micro-batch (added to ``acc``) and the trainer's logprobs of its rows, on the CPU."""
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

    @functools.cached_property
    def _cache_arg(self) -> str:
        """transformers 5.2x renamed forward's ``past_key_values`` to ``cache`` (the old name warns)."""
        params = inspect.signature(self.model.get_base_model().forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    def _shared_prefix_pass(self, data, prefix: int, members: list[int], loss_fn: LossFnName,
                            config: Mapping[str, float], outputs: list, acc: _MetricsAccumulator) -> None:
        """Forward the shared prompt once, then every member's remainder on top of its keys and values."""
        import torch
        from transformers import DynamicCache

        first = data[members[0]]
        prompt = self.model(
            input_ids=torch.tensor([list(first.model_input[:prefix])], dtype=torch.long, device=self.device),
            use_cache=True,
        )
        kv = [(layer.keys, layer.values) for layer in getattr(prompt, self._cache_arg).layers]
        with torch.no_grad():  # prompt positions carry weight 0: their logprobs are reported, not trained
            targets = torch.tensor([first.target_tokens[:prefix]], dtype=torch.long, device=self.device)
            prompt_logprobs = _token_logprobs(prompt.logits.detach(), targets)[0].to("cpu").tolist()
        del prompt
        acc.padded_tokens += prefix
        rests = [_remainder(data[i], prefix) for i in members]
        plans = plan_micro_batches([d.length for d in rests], self.token_budget)
        for n, plan in enumerate(plans):
            batch = self._collate([rests[j] for j in plan], with_inputs=True)
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
            loss, logp = self._loss(batch, logits, loss_fn, config, acc)
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
                        batch = self._collate([data[i] for i in idx], with_inputs=False)
                        logp = _token_logprobs(self._logits(batch), batch["target_tokens"]).to("cpu")
                        for row, i in enumerate(idx):
                            out[i] = logp[row, : data[i].length].tolist()
            finally:
                self.model.train(was_training)
        return [o for o in out if o is not None]

    def save_weights_for_sampler(self, name: str) -> SavedWeights:
        _check_name(name)
        with self._lock:
            self._check_open()
            dest = self.output_dir / "sampler_weights" / name
            with _atomic_dir(dest) as tmp:
                self._save_adapter(tmp, name)
            logger.info("saved sampler weights %s (step %d) at %s", name, self._step, dest)
            return SavedWeights(path_or_uri=str(dest), name=name, step=self._step)

    def save_state(self, name: str) -> str:
        from safetensors.torch import save_file

        _check_name(name)
        with self._lock:
            self._check_open()
            dest = self.output_dir / "state" / name
            with _atomic_dir(dest) as tmp:
                self._save_adapter(tmp, name)
                tensors: dict[str, torch.Tensor] = {}
                structure = _flatten_state(self._optimizer.state_dict(), "optimizer", tensors)
                save_file(tensors, str(tmp / _OPTIMIZER_FILE), metadata={"format": str(STATE_FORMAT)})
                state = {
                    "format": STATE_FORMAT,
                    "step": self._step,
                    "base_model": self.base_model,
                    "lora": self._lora_meta(),
                    "param_names": [n for n, _ in self._trainable],
                    "optimizer": structure,
                    "saved_at": time.time(),
                }
                (tmp / _STATE_FILE).write_text(json.dumps(state, indent=1))
            logger.info("saved training state %s (step %d) at %s", name, self._step, dest)
            return str(dest)

    def load_state(self, path: str) -> None:
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
        from safetensors.torch import load_file

        root = Path(path)
        try:
            state = json.loads((root / _STATE_FILE).read_text())
        except (OSError, ValueError) as exc:
            msg = f"{root} is not a training state written by save_state ({_STATE_FILE}: {exc})"
            raise AdapterError(msg) from exc
        if state.get("format") != STATE_FORMAT:
            msg = f"Training state format {state.get('format')!r} is not supported (expected {STATE_FORMAT})"
            raise AdapterError(msg)
        if state.get("lora") != self._lora_meta():
            msg = f"Training state at {root} has LoRA config {state.get('lora')}, this backend {self._lora_meta()}"
            raise AdapterError(msg)
        names = [n for n, _ in self._trainable]
        if state.get("param_names") != names:
            msg = f"Training state at {root} was saved for different trainable parameters"
            raise AdapterError(msg)
        with self._lock:
            self._check_open()
            weights = load_file(str(root / _ADAPTER_FILE), device=str(self.device))
            expected = set(get_peft_model_state_dict(self.model, save_embedding_layers=False))
            if set(weights) != expected:
                msg = (
                    f"Adapter weights at {root} do not match the model: missing {sorted(expected - set(weights))[:3]}, "
                    f"unexpected {sorted(set(weights) - expected)[:3]}"
                )
                raise AdapterError(msg)
            result = set_peft_model_state_dict(self.model, weights, adapter_name="default")
            if getattr(result, "unexpected_keys", None):
                msg = f"Adapter weights at {root} have unexpected keys {result.unexpected_keys[:3]}"
                raise AdapterError(msg)
            tensors = load_file(str(root / _OPTIMIZER_FILE))
            self._optimizer.load_state_dict(_unflatten_state(state["optimizer"], tensors))
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

    def _collate(self, data: list[Datum], *, with_inputs: bool) -> dict[str, torch.Tensor]:
        """Right-pad a micro-batch to its longest datum (pad positions have attention 0 and weight 0)."""
        import torch

        rows, longest = len(data), max(d.length for d in data)
        ids = torch.zeros((rows, longest), dtype=torch.long)
        mask = torch.zeros((rows, longest), dtype=torch.long)
        targets = torch.zeros((rows, longest), dtype=torch.long)
        floats: dict[str, torch.Tensor] = {}
        keys = ["weights"]
        if with_inputs:
            keys += sorted(
                {k for d in data for k in d.loss_fn_inputs if k not in ("target_tokens", "weights")}
            )
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
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _logits(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        )
        return out.logits

    def _save_adapter(self, directory: Path, name: str) -> None:
        with _quiet_transformers():
            self.model.save_pretrained(
                str(directory),
                safe_serialization=True,
                selected_adapters=["default"],
                save_embedding_layers=False,
            )
        readme = directory / "README.md"
        if readme.exists():  # peft's model card template; not needed to load the adapter
            readme.unlink()
        meta = {"name": name, "step": self._step, "base_model": self.base_model, "lora": self._lora_meta()}
        (directory / _META_FILE).write_text(json.dumps(meta, indent=1))
        for required in (_ADAPTER_CONFIG, _ADAPTER_FILE):
            if not (directory / required).is_file():
                msg = f"peft did not write {required} into {directory}"
                raise TrainingError(msg)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' deprecation notice that peft 0.21 triggers (``is_gradient_checkpointing``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from langchain_metaclaw.training.losses import token_logprobs

    return token_logprobs(logits, targets)


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
