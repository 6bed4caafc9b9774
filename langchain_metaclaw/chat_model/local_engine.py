"""In-process serving of a base model and any number of LoRA adapters, with exact token-level records.

:class:`LocalEngine` wraps the base model in a peft model once and serves every request with the adapter the
request names, pinned per request (DESIGN decision 6). Generation (sampling parameters, the decode loop,
the per-token rules, grammars, batched decoding) is inherited from
:class:`~langchain_metaclaw.engine.generation.GenerationEngine`; this class supplies the model to it: one
forward pinned to an adapter, adapters held per request, and the :class:`GenerationResult` each finished
completion becomes. :meth:`LocalEngine.logprobs_of` recomputes a
result's numbers teacher-forced (for re-tokenized samples, and to check the sampler).

How adapters are pinned, and why not peft's own ``adapter_names=`` forward argument as is
------------------------------------------------------------------------------------------------
Each LoRA layer of peft accepts ``adapter_names=[...]`` in ``forward`` (its "mixed batch" path) and then
applies exactly the named adapters, or none for ``"__base__"``. ``PeftModel.forward(adapter_names=...)``
delivers that argument by *registering forward pre-hooks on every LoRA layer for the duration of the call*.
Those hooks are shared by every thread using the model, so two concurrent calls each run the other's hook
too, and the one registered last decides the adapter of both (the hook registry is also mutated while other
threads iterate it). This engine instead registers one permanent pre-hook per LoRA layer at construction;
it reads the names from a :class:`contextvars.ContextVar` set by the calling request, so every forward gets
its own request's ``adapter_names`` and no lock is needed around forward. ``set_adapter`` /
``hotswap_adapter`` are never called: the active adapter stays an all-zero placeholder, so a forward
without a pin computes the base model.

Every LoRA-capable module (``target_modules="all-linear"``) is wrapped at construction by that
placeholder, so loading an adapter later never replaces a module that a running request is passing through;
an adapter that targets anything else is refused.

On the request path only tokenizer calls take a lock (``_tokenizer_lock``, held for microseconds): a fast
tokenizer's Rust object raises "Already borrowed" when two threads use it at once. Compiling a new JSON
schema takes the grammar compiler's lock once per schema (~10 ms); load/unload are serialised by
``_admin_lock``, which no generating request takes. Measured on SmolLM2 (2 cores): peft's hook-based ``adapter_names`` gave
the wrong adapter's tokens in 5 of 12 concurrent generations; this engine 0 of 38 while adapters were
loaded and unloaded alongside.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import json
import logging
import re
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from langchain_metaclaw._compat import require
from langchain_metaclaw.engine.decoding import Row
from langchain_metaclaw.engine.generation import GenerationEngine
from langchain_metaclaw.errors import AdapterError, ConfigurationError
from langchain_metaclaw.models.embedded import EMBEDDED_MODEL_ID, copy_sharing_weights, load_base_model

if TYPE_CHECKING:
    import torch


__all__ = ["BASE_ADAPTER", "GenerationResult", "LocalEngine"]

logger = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"
"""peft's name for "no adapter" in ``adapter_names``; what a request with ``adapter=None`` is pinned to."""

_PLACEHOLDER = "__metaclaw_wrap__"
"""Zero LoRA (B = 0) on every linear layer: wraps the model once and stays the (never used) active adapter."""

_ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-:@+]*$")
_REJECTED_FILES = ("adapter_model.bin", "pytorch_model.bin", "adapter_model.pt", "adapter_model.pth")

# The adapter names pinned by the request running in this thread / context (read by the LoRA pre-hooks).
_PINNED: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "metaclaw_pinned_adapter", default=None
)

NOT_SAFETENSORS_MSG = (
    "Adapter {name!r} at {path} has no adapter_model.safetensors{found}; only safetensors adapters are loaded "
    "(pickled .bin/.pt weights can run code when unpickled). Re-save it with save_pretrained(safe_serialization=True)."
)
UNKNOWN_ADAPTER_MSG = "No adapter named {name!r} is loaded (loaded: {loaded}); load_adapter() it first."


@dataclass(frozen=True)
class GenerationResult:
    """One completion, with the exact tokens and behaviour log-probabilities that produced it."""

    text: str
    """Completion text: special tokens skipped, trimmed before a matched stop string."""
    prompt_token_ids: list[int]
    """Token ids of the rendered prompt (chat template with the generation prompt)."""
    completion_token_ids: list[int]
    """Every generated token id, including a final EOS and the tokens that completed a stop string."""
    logprobs: list[float]
    """Log-probability of each completion token under the distribution it was drawn from (see ``sampling``)."""
    finish_reason: Literal["stop", "length"]
    """``"stop"``: EOS or a stop string; ``"length"``: ``max_new_tokens`` reached."""
    adapter: str | None
    """Adapter the request was pinned to; ``None`` for the base model."""
    sampling: dict[str, Any]
    """How to reproduce the behaviour distribution: ``temperature``, ``top_p``, ``top_k``, ``greedy`` (logprobs
    are of the raw logits), ``constrained`` (a grammar mask was applied), ``seed``, ``json_schema``."""
    stop_sequence: str | None = None
    """The stop string that ended generation; the text is trimmed before it, the token ids are not."""
    timings: dict[str, float] = field(default_factory=dict, compare=False)
    """``prompt_s`` (prefill) and ``decode_s`` wall seconds; informational."""

    @property
    def usage(self) -> dict[str, int]:
        return {
            "input_tokens": len(self.prompt_token_ids),
            "output_tokens": len(self.completion_token_ids),
            "total_tokens": len(self.prompt_token_ids) + len(self.completion_token_ids),
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Adapter:
    path: Path
    config: Any
    refs: int = 0
    unloading: bool = False


def _pin_hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook on every LoRA layer: pass this request's ``adapter_names`` to peft's mixed-batch path."""
    names = _PINNED.get()
    if names is None:
        return None
    kwargs["adapter_names"] = names
    return args, kwargs


def _normalise_model_name(name: str | None) -> str | None:
    """``"HuggingFaceTB/SmolLM2-135M-Instruct"`` and ``"/x/SmolLM2-135M-Instruct"`` -> ``"smollm2-135m-instruct"``."""
    if not name:
        return None
    tail = str(name).rstrip("/\\").replace("\\", "/").split("/")[-1]
    tail = re.sub(r"(\.[Qq]\d\w*)?\.gguf$", "", tail)
    return tail.lower()


def _eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The tokenizer's EOS plus the generation config's (chat models often end turns with their own token)."""
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        eos.add(gen_eos)
    elif gen_eos:
        eos.update(gen_eos)
    return frozenset(eos)


class LocalEngine(GenerationEngine[GenerationResult]):
    """A base causal LM plus named LoRA adapters, served concurrently with per-request adapter pinning.

    Args:
        base_model (`str`, *optional*, defaults to `None`):
            `None` for the embedded SmolLM2-135M-Instruct, or a HuggingFace id / local safetensors directory.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`).

    The model and tokenizer come from :func:`~langchain_metaclaw.models.load_base_model` (shared per
    process); the engine wraps a copy of the module tree that shares the weights, so several engines and a
    trainer can use the same base weights.

    >>> engine = LocalEngine()
    >>> engine.load_adapter("v3", "/path/to/adapter")          # validated, not activated
    >>> result = engine.generate([{"role": "user", "content": "Hi"}], adapter="v3", max_new_tokens=16)
    >>> result.completion_token_ids, result.logprobs, result.sampling
    """

    def __init__(self, base_model: str | None = None, *, dtype: torch.dtype | None = None) -> None:
        torch = require("torch", backend="local", extra="local")
        peft = require("peft", backend="local", extra="local")
        model, tokenizer = load_base_model(base_model, dtype=dtype)
        super().__init__(
            tokenizer,
            model_name=base_model or EMBEDDED_MODEL_ID,
            eos_token_ids=_eos_token_ids(model, tokenizer),
            vocab_size=int(model.config.vocab_size),
            max_positions=int(getattr(model.config, "max_position_embeddings", 0) or 0),
        )
        self._admin_lock = threading.Lock()  # serialises load/unload (never held by a generating request)
        self._state = threading.Condition()  # guards _adapters and their reference counts
        self._adapters: dict[str, _Adapter] = {}
        self._base_modules = {name: module for name, module in model.named_modules()}

        tree = copy_sharing_weights(model)
        wrap = peft.LoraConfig(
            r=1, lora_alpha=1, target_modules="all-linear", init_lora_weights=True, lora_dropout=0.0
        )
        with warnings.catch_warnings():
            # peft still calls transformers' renamed is_gradient_checkpointing
            warnings.simplefilter("ignore", FutureWarning)
            self._peft = peft.get_peft_model(tree, wrap, adapter_name=_PLACEHOLDER)
        self._peft.eval()
        self._model = self._peft.get_base_model()  # the transformers model, with LoRA layers inside
        # transformers 5.2x renamed forward's past_key_values to cache (the old name warns); take what it has
        params = inspect.signature(self._model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        lora_layer = peft.tuners.lora.LoraLayer
        self._wrapped: set[str] = set()
        for name, module in self._model.named_modules():
            if isinstance(module, lora_layer):
                module.register_forward_pre_hook(_pin_hook, with_kwargs=True)
                self._wrapped.add(name)
        with torch.no_grad():  # the placeholder must be exactly zero (init_lora_weights=True zeroes B)
            for name, param in self._peft.named_parameters():
                if f"lora_B.{_PLACEHOLDER}" in name:
                    param.zero_()

    # ------------------------------------------------------------------ adapters

    @property
    def adapters(self) -> list[str]:
        """Names of the loaded adapters, in load order (adapters being unloaded are left out)."""
        with self._state:
            return [name for name, entry in self._adapters.items() if not entry.unloading]

    def load_adapter(
        self, name: str, path: str | Path, *, check_base_model: Literal["error", "warn", "ignore"] = "error"
    ) -> None:
        """Validate the peft LoRA adapter at ``path`` and load it under ``name``. It is not activated: a request
        uses it only by naming it (``generate(..., adapter=name)``).

        Args:
            name (`str`): a new name (letters, digits, ``_-:@+``); give each adapter version its own name.
            path (`str` or `Path`): directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
            check_base_model (`"error" | "warn" | "ignore"`, *optional*, defaults to `"error"`): what to do when
                the adapter records another ``base_model_name_or_path`` (compared by its last path component,
                case-insensitively). Keys and shapes are always checked.

        Raises:
            AdapterError: the name is taken or invalid; the directory is not a LoRA adapter in safetensors
                format; the file does not parse; it was trained on another base model; its target modules,
                keys or shapes (rank) do not fit this base model. Nothing changes when it raises.
        """
        if check_base_model not in ("error", "warn", "ignore"):
            msg = f"check_base_model must be 'error', 'warn' or 'ignore', got {check_base_model!r}"
            raise ConfigurationError(msg)
        path = Path(path)
        with self._admin_lock:
            with self._state:
                if name in self._adapters:
                    msg = f"An adapter named {name!r} is already loaded; give each version its own name."
                    raise AdapterError(msg)
            config, _ = self._validate_adapter(name, path, check_base_model)
            started = time.perf_counter()
            try:
                self._peft.load_adapter(str(path), adapter_name=name, is_trainable=False)
            except Exception as exc:
                with contextlib.suppress(Exception):
                    if name in self._peft.peft_config:
                        self._peft.delete_adapter(name)
                msg = f"peft could not load adapter {name!r} from {path}: {exc}"
                raise AdapterError(msg) from exc
            self._peft.eval()
            with self._state:
                self._adapters[name] = _Adapter(path=path, config=config)
            logger.info(
                "loaded adapter %r from %s in %.0f ms", name, path, 1000 * (time.perf_counter() - started)
            )

    def unload_adapter(self, name: str, *, timeout: float | None = 60.0) -> None:
        """Unload adapter ``name`` once no request holds it; new requests for it are refused from now on.

        Raises:
            AdapterError: no such adapter, or requests still held it after ``timeout`` seconds (it then stays
                loaded and usable).
        """
        with self._admin_lock:
            with self._state:
                entry = self._adapters.get(name)
                if entry is None or entry.unloading:
                    raise AdapterError(UNKNOWN_ADAPTER_MSG.format(name=name, loaded=self.adapters))
                entry.unloading = True
                if not self._state.wait_for(lambda: entry.refs == 0, timeout=timeout):
                    entry.unloading = False
                    msg = f"Adapter {name!r} is still used by {entry.refs} request(s) after {timeout} s; not unloaded."
                    raise AdapterError(msg)
            self._peft.delete_adapter(name)
            with self._state:
                del self._adapters[name]

    def _validate_adapter(
        self, name: str, path: Path, check_base_model: str = "error"
    ) -> tuple[Any, dict[str, Any]]:
        """Every check that can be made without touching the model (peft's hotswap "dry run" idea)."""
        peft = require("peft", backend="local", extra="local")
        safetensors_torch = require("safetensors.torch", backend="local", extra="local")
        if not _ADAPTER_NAME_RE.match(name) or name in (BASE_ADAPTER, _PLACEHOLDER):
            msg = f"Invalid adapter name {name!r}: use letters, digits and _-:@+ (and not {BASE_ADAPTER!r})."
            raise AdapterError(msg)
        if not path.is_dir():
            msg = f"Adapter {name!r}: {path} is not a directory (expected a peft adapter saved with save_pretrained)."
            raise AdapterError(msg)
        weights = path / "adapter_model.safetensors"
        if not weights.is_file():
            found = [f for f in _REJECTED_FILES if (path / f).exists()]
            found_msg = f" (found {', '.join(found)})" if found else ""
            raise AdapterError(NOT_SAFETENSORS_MSG.format(name=name, path=path, found=found_msg))
        config_file = path / "adapter_config.json"
        try:
            raw_config = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            msg = f"Adapter {name!r}: cannot read {config_file}: {exc}"
            raise AdapterError(msg) from exc
        if raw_config.get("peft_type") != "LORA":
            msg = f"Adapter {name!r}: only LoRA adapters are served, but {path} is {raw_config.get('peft_type')!r}."
            raise AdapterError(msg)
        try:
            config = peft.LoraConfig.from_pretrained(str(path))
        except Exception as exc:
            msg = f"Adapter {name!r}: invalid LoRA config in {config_file}: {exc}"
            raise AdapterError(msg) from exc
        unsupported = {
            "use_dora": bool(getattr(config, "use_dora", False)),
            "modules_to_save": bool(getattr(config, "modules_to_save", None)),
            "bias": getattr(config, "bias", "none") != "none",
            "layer_replication": bool(getattr(config, "layer_replication", None)),
            "trainable_token_indices": bool(getattr(config, "trainable_token_indices", None)),
            "alora_invocation_tokens": bool(getattr(config, "alora_invocation_tokens", None)),
            "target_parameters": bool(getattr(config, "target_parameters", None)),
        }
        bad = sorted(key for key, used in unsupported.items() if used)
        if bad:
            msg = (
                f"Adapter {name!r} uses {', '.join(bad)}, which per-request adapter pinning cannot serve "
                "(they change shared weights or are not supported by peft's mixed-batch forward); "
                "train a plain LoRA adapter."
            )
            raise AdapterError(msg)
        trained_on = _normalise_model_name(config.base_model_name_or_path)
        serving = _normalise_model_name(self.base_model_name)
        if trained_on is not None and trained_on != serving and check_base_model != "ignore":
            msg = (
                f"Adapter {name!r} was trained on base model {config.base_model_name_or_path!r}, but this engine "
                f"serves {self.base_model_name!r}."
            )
            if check_base_model == "error":
                raise AdapterError(msg + " Pass check_base_model='warn' if they are the same model.")
            warnings.warn(msg, stacklevel=3)
        try:
            state_dict = safetensors_torch.load_file(str(weights), device="cpu")
        except Exception as exc:  # SafetensorsError, OSError, ...
            msg = (
                f"Adapter {name!r}: {weights} is not a valid safetensors file ({type(exc).__name__}: {exc})."
            )
            raise AdapterError(msg) from exc
        self._dry_run(name, config, state_dict)
        return config, state_dict

    def _dry_run(self, name: str, config: Any, state_dict: dict[str, Any]) -> None:
        """Expected keys and shapes from the config and this base model, compared with the file's tensors."""
        torch = require("torch", backend="local", extra="local")
        get_pattern_key = require("peft.utils.other", backend="local", extra="local").get_pattern_key
        check_target = require(
            "peft.tuners.tuners_utils", backend="local", extra="local"
        ).check_target_module_exists
        if config.target_modules == "all-linear":
            targets = set(self._wrapped)
        else:
            # check_target_module_exists returns True, a re.Match, or a falsy value (None, False, excluded)
            targets = {key for key in self._base_modules if key and bool(check_target(config, key))}
        if not targets:
            msg = f"Adapter {name!r}: its target_modules {config.target_modules!r} match no module of {self.base_model_name!r}."
            raise AdapterError(msg)
        not_served = sorted(targets - self._wrapped)
        if not_served:
            msg = (
                f"Adapter {name!r} targets modules that are not linear projections of {self.base_model_name!r} "
                f"(this engine serves LoRA on linear layers only): {', '.join(not_served[:5])}"
            )
            raise AdapterError(msg)
        expected: dict[str, tuple[int, ...]] = {}
        rank_keys = list((config.rank_pattern or {}).keys())
        lora_bias = bool(getattr(config, "lora_bias", False))
        for key in sorted(targets):
            module = self._base_modules[key]
            rank = (
                config.rank_pattern.get(get_pattern_key(rank_keys, key), config.r) if rank_keys else config.r
            )
            prefix = f"base_model.model.{key}"
            expected[f"{prefix}.lora_A.weight"] = (rank, module.in_features)
            expected[f"{prefix}.lora_B.weight"] = (module.out_features, rank)
            if lora_bias:
                expected[f"{prefix}.lora_B.bias"] = (module.out_features,)
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        wrong_shape = [
            f"{key}: file {tuple(state_dict[key].shape)}, expected {expected[key]}"
            for key in sorted(set(expected) & set(state_dict))
            if tuple(state_dict[key].shape) != expected[key]
        ]
        problems = []
        if wrong_shape:
            problems.append(
                f"{len(wrong_shape)} tensor(s) with the wrong shape (rank r={config.r} in the config), e.g. {wrong_shape[0]}"
            )
        if missing:
            problems.append(f"{len(missing)} missing tensor(s), e.g. {missing[0]}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]}")
        not_float = [
            key for key, t in state_dict.items() if key in expected and not torch.is_floating_point(t)
        ]
        if not_float:
            problems.append(f"non-float tensor(s), e.g. {not_float[0]}")
        non_finite = [
            key
            for key, t in state_dict.items()
            if key in expected and torch.is_floating_point(t) and not torch.isfinite(t).all()
        ]
        if non_finite:
            problems.append(f"NaN/inf values, e.g. in {non_finite[0]}")
        if problems:
            msg = (
                f"Adapter {name!r} does not fit base model {self.base_model_name!r}: "
                + "; ".join(problems)
                + ". Was it trained on another base model, or is its adapter_config.json out of date?"
            )
            raise AdapterError(msg)

    @contextlib.contextmanager
    def _hold(self, adapter: str | None) -> Iterator[str]:
        """Reference the adapter for the duration of a request; yields the name to pin."""
        if adapter is None:
            yield BASE_ADAPTER
            return
        with self._state:
            entry = self._adapters.get(adapter)
            if entry is None or entry.unloading:
                raise AdapterError(UNKNOWN_ADAPTER_MSG.format(name=adapter, loaded=self.adapters))
            entry.refs += 1
        try:
            yield adapter
        finally:
            with self._state:
                entry.refs -= 1
                self._state.notify_all()

    def _forward(
        self,
        pin: str,
        input_ids: torch.Tensor,
        cache: Any = None,
        logits_to_keep: int = 1,
        **extra: Any,
    ) -> tuple[Any, Any]:
        """One forward pinned to adapter ``pin`` (every row of the batch); returns ``(logits, cache)``.

        ``extra``: ``attention_mask`` / ``position_ids`` for left-padded batches.
        """
        token = _PINNED.set([pin] * int(input_ids.shape[0]))  # peft wants one name per row
        try:
            out = self._model(
                input_ids=input_ids,
                use_cache=True,
                logits_to_keep=logits_to_keep,
                **{self._cache_arg: cache},
                **extra,
            )
        finally:
            _PINNED.reset(token)
        return out.logits, getattr(out, self._cache_arg)

    def _check_adapter(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.adapters:
            raise AdapterError(UNKNOWN_ADAPTER_MSG.format(name=adapter, loaded=self.adapters))

    def _result(self, row: Row, adapter: str | None) -> GenerationResult:
        return GenerationResult(
            text=row.text,
            prompt_token_ids=list(row.prompt),
            completion_token_ids=row.completion,
            logprobs=row.logprobs,
            finish_reason=row.finish,
            adapter=adapter,
            sampling=row.record,
            stop_sequence=row.stop_hit,
            timings={"prompt_s": row.prompt_s, "decode_s": row.decode_s, "batch_rows": float(row.batch_rows)},
        )
