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
import logging
import re
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from langchain_metaclaw._compat import require
from langchain_metaclaw.adapters.validate import BaseStructure, validate_adapter
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

# The adapter names pinned by the request running in this thread / context (read by the LoRA pre-hooks).
_PINNED: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "metaclaw_pinned_adapter", default=None
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

    def adapter_path(self, name: str) -> Path | None:
        """The directory adapter ``name`` was loaded from (``None``: not loaded, or being unloaded)."""
        with self._state:
            entry = self._adapters.get(name)
            return None if entry is None or entry.unloading else entry.path

    def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        """Each token id decoded on its own (under the tokenizer lock: safe from any thread)."""
        with self._tokenizer_lock:
            return [self.tokenizer.decode([t]) for t in token_ids]

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
            if not _ADAPTER_NAME_RE.match(name) or name in (BASE_ADAPTER, _PLACEHOLDER):
                msg = f"Invalid adapter name {name!r}: use letters, digits and _-:@+ (and not {BASE_ADAPTER!r})."
                raise AdapterError(msg)
            base = BaseStructure(self.base_model_name, self._base_modules, frozenset(self._wrapped))
            config = validate_adapter(path, base, name=name, check_base_model=check_base_model)
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


_ENGINES: dict[str | None, LocalEngine] = {}
_ENGINES_LOCK = threading.Lock()


def shared_engine(base_model: str | None = None) -> LocalEngine:
    """The process-wide :class:`LocalEngine` for ``base_model`` (``None``: the embedded SmolLM2).

    Chat models, the server and the local trainer's sampler of one process share it, so the weights are in
    memory once; which adapter versions it holds is counted by the process's adapter follower.
    """
    with _ENGINES_LOCK:
        engine = _ENGINES.get(base_model)
        if engine is None:
            engine = _ENGINES[base_model] = LocalEngine(base_model)
        return engine
