"""In-process serving of a base model and any number of LoRA adapters, with exact token-level records.

:class:`LocalEngine` wraps the base model in a peft model once and serves every request with the adapter the
request names, pinned per request (DESIGN decision 6). It writes its own decoding loop over the KV cache
rather than calling ``model.generate``, because that is the only way to know exactly:

- the log-probability of each sampled token under the distribution it was *sampled from* (the behaviour
  policy the trainer needs: ``softmax(logits / T)`` after top-k/top-p truncation and any grammar mask; for
  greedy decoding, ``log_softmax`` of the raw, possibly masked, logits);
- which tokens were generated up to a stop string (the text is trimmed, the ids are kept);
- where a grammar mask (``json_schema``, compiled by xgrammar) removed tokens.

:class:`GenerationResult` carries all of it; :meth:`LocalEngine.logprobs_of` recomputes the same numbers
teacher-forced (for re-tokenized samples, and to check the sampler).

Batched decoding: :meth:`LocalEngine.sample_group` (G completions of one prompt: prefilled once, KV cache
repeated to G rows) and :meth:`LocalEngine.generate_batch` (different prompts, left-padded) decode many rows
per forward. Decoding a 135M model one row at a time is bound by reading the weights; G rows per forward
cost about twice one row, so a group of 8 is 2.4-4x faster on 2 shared cores (``benchmarks/sampling.py``).
Each row keeps its own generator, grammar matcher and stop handling, and leaves the batch when it finishes
(its KV rows are dropped), so every row's :class:`GenerationResult` is what :meth:`LocalEngine.generate`
records for the same request and seed.

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
schema takes ``_grammar_lock`` once per schema (~10 ms); load/unload are serialised by ``_admin_lock``,
which no generating request takes. Measured on SmolLM2 (2 cores): peft's hook-based ``adapter_names`` gave
the wrong adapter's tokens in 5 of 12 concurrent generations; this engine 0 of 38 while adapters were
loaded and unloaded alongside.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import json
import logging
import math
import random
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


@dataclass(frozen=True)
class _Sampling:
    temperature: float
    top_p: float
    top_k: int

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(eq=False)
class _Row:
    """Decoding state of one row of a batched decode (see :meth:`LocalEngine._advance`)."""

    prompt: list[int]
    generator: Any
    matcher: Any
    record: dict[str, Any]
    max_new_tokens: int
    completion: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish: Literal["stop", "length"] = "length"
    stop_hit: str | None = None
    done: bool = False
    decode_s: float = 0.0


def _pin_hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook on every LoRA layer: pass this request's ``adapter_names`` to peft's mixed-batch path."""
    names = _PINNED.get()
    if names is None:
        return None
    kwargs["adapter_names"] = names
    return args, kwargs


def _behaviour_logprobs(logits: torch.Tensor, sampling: _Sampling) -> torch.Tensor:
    """Log-probabilities (float32, ``-inf`` for excluded tokens) of the distribution tokens are drawn from.

    ``logits`` is one row of (already grammar-masked) logits. Greedy: ``log_softmax(logits)``. Sampling:
    ``log_softmax(logits / T)`` after top-k then top-p truncation (renormalised over the kept tokens).
    """
    torch = require("torch", backend="local", extra="local")
    logits = logits.float()
    if sampling.greedy:
        return torch.log_softmax(logits, dim=-1)
    scaled = logits / sampling.temperature
    if sampling.top_k > 0 and sampling.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, sampling.top_k).values[..., -1, None]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already cover top_p (the top token is always kept)
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= sampling.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return torch.log_softmax(scaled, dim=-1)


def _pick(logprobs: torch.Tensor, sampling: _Sampling, generator: torch.Generator) -> int:
    torch = require("torch", backend="local", extra="local")
    if sampling.greedy:
        return int(torch.argmax(logprobs))
    return int(torch.multinomial(logprobs.exp(), 1, generator=generator))


class LocalEngine:
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
        self.base_model_name: str = base_model or EMBEDDED_MODEL_ID
        """The base model this engine serves (as given; the embedded model's name when ``None``)."""
        self.tokenizer = tokenizer
        self._tokenizer_lock = threading.Lock()
        self._admin_lock = threading.Lock()  # serialises load/unload (never held by a generating request)
        self._state = threading.Condition()  # guards _adapters and their reference counts
        self._adapters: dict[str, _Adapter] = {}
        self._base_modules = {name: module for name, module in model.named_modules()}
        self.vocab_size = int(model.config.vocab_size)
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0)

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

        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            eos.add(gen_eos)
        elif gen_eos:
            eos.update(gen_eos)
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        """Token ids that end a completion."""
        self._grammar_lock = threading.Lock()
        self._drop_finished = True
        """Batched decoding drops finished rows from the batch (False: keeps decoding them, masked; slower)."""
        self._grammar_compiler: Any = None
        self._compiled_grammars: dict[str, Any] = {}

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

    # ------------------------------------------------------------------ prompts and grammars

    def encode_prompt(
        self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """Token ids of ``messages`` rendered with the chat template and the generation prompt."""
        with self._tokenizer_lock:
            kwargs = {"tools": tools} if tools else {}
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False, **kwargs
            )
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _decode(self, ids: Sequence[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _grammar_matcher(self, json_schema: dict[str, Any]) -> Any:
        """A fresh xgrammar matcher for ``json_schema`` (compiled once per schema, per engine)."""
        xgr = require("xgrammar", backend="local (json_schema)", extra="local")
        # not sort_keys: xgrammar emits properties in the schema's order ("name" before "arguments", a joke's
        # "setup" before its "punchline"), and a 135M model fills them far better in that order
        key = json.dumps(json_schema)
        with self._grammar_lock:
            if self._grammar_compiler is None:
                with self._tokenizer_lock:
                    info = xgr.TokenizerInfo.from_huggingface(
                        self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=sorted(self.eos_token_ids)
                    )
                self._grammar_compiler = xgr.GrammarCompiler(info, max_threads=2)
            compiled = self._compiled_grammars.get(key)
            if compiled is None:
                try:
                    compiled = self._grammar_compiler.compile_json_schema(key, any_whitespace=False)
                except Exception as exc:
                    msg = f"json_schema could not be compiled into a grammar: {exc}"
                    raise ConfigurationError(msg) from exc
                self._compiled_grammars[key] = compiled
        return xgr.GrammarMatcher(compiled)

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        messages: list[dict[str, Any]] | None = None,
        *,
        prompt_token_ids: Sequence[int] | None = None,
        tools: list[dict[str, Any]] | None = None,
        adapter: str | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: list[str] | None = None,
        seed: int | None = None,
        json_schema: dict[str, Any] | None = None,
    ) -> GenerationResult:
        """Generate one completion for ``messages`` (or for ready ``prompt_token_ids``).

        Args:
            adapter (`str`, *optional*): name of a loaded adapter, pinned for this request; `None` for the base.
            max_new_tokens (`int`, defaults to 128): at most this many tokens (then ``finish_reason="length"``).
            temperature (`float`, defaults to 0.0): 0 is greedy; otherwise sample from ``softmax(logits / T)``.
            top_p, top_k: optional truncation (off by default); the logprobs are of the truncated distribution.
            stop (`list[str]`, *optional*): stop strings; the text is trimmed before the first match.
            seed (`int`, *optional*): seeds this request's own generator (recorded in ``sampling`` either way).
            json_schema (`dict`, *optional*): constrain the output to JSON matching this schema (xgrammar).
        """
        result = None
        for _, final in self.stream(
            messages,
            prompt_token_ids=prompt_token_ids,
            tools=tools,
            adapter=adapter,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop=stop,
            seed=seed,
            json_schema=json_schema,
        ):
            result = final or result
        assert result is not None
        return result

    def stream(
        self,
        messages: list[dict[str, Any]] | None = None,
        *,
        prompt_token_ids: Sequence[int] | None = None,
        tools: list[dict[str, Any]] | None = None,
        adapter: str | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: list[str] | None = None,
        seed: int | None = None,
        json_schema: dict[str, Any] | None = None,
    ) -> Iterator[tuple[str, GenerationResult | None]]:
        """Like :meth:`generate`, yielding ``(text_delta, None)`` as text becomes final, then ``("", result)``.

        Text that could still turn out to be the start of a stop string, or an incomplete UTF-8 character,
        is held back until it cannot; the deltas always add up to ``result.text``.
        """
        sampling = self._check_sampling(temperature, top_p, top_k, max_new_tokens)
        stop = [s for s in (stop or []) if s]
        prompt = self._resolve_prompt(messages, prompt_token_ids, tools)
        if self.max_positions and len(prompt) + 1 > self.max_positions:
            msg = f"The prompt has {len(prompt)} tokens; {self.base_model_name} takes at most {self.max_positions}."
            raise ConfigurationError(msg)
        if self.max_positions:
            max_new_tokens = min(max_new_tokens, self.max_positions - len(prompt))
        matcher = self._grammar_matcher(json_schema) if json_schema is not None else None
        generator, record = self._seeded(sampling, seed, max_new_tokens, json_schema)
        if adapter is not None and adapter not in self.adapters:  # fail now, not at the first next()
            raise AdapterError(UNKNOWN_ADAPTER_MSG.format(name=adapter, loaded=self.adapters))
        return self._run(prompt, adapter, sampling, generator, matcher, stop, max_new_tokens, record)

    def _seeded(
        self, sampling: _Sampling, seed: int | None, max_new_tokens: int, json_schema: dict[str, Any] | None
    ) -> tuple[torch.Generator, dict[str, Any]]:
        """A request's own generator (seeded with ``seed``, or randomly) and its ``sampling`` record."""
        torch = require("torch", backend="local", extra="local")
        generator = torch.Generator(device="cpu")
        used_seed = generator.manual_seed(seed).initial_seed() if seed is not None else generator.seed()
        record = {
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
            "greedy": sampling.greedy,
            "constrained": json_schema is not None,
            "seed": int(used_seed),
            "max_new_tokens": int(max_new_tokens),
        }
        if json_schema is not None:
            record["json_schema"] = json_schema
        return generator, record

    def _run(
        self,
        prompt: list[int],
        adapter: str | None,
        sampling: _Sampling,
        generator: torch.Generator,
        matcher: Any,
        stop: list[str],
        max_new_tokens: int,
        record: dict[str, Any],
    ) -> Iterator[tuple[str, GenerationResult | None]]:
        """The decoding loop behind :meth:`stream` (a generator: the adapter is held only while it runs)."""
        torch = require("torch", backend="local", extra="local")
        holdback = max((len(s) for s in stop), default=1) - 1
        completion: list[int] = []
        logprobs: list[float] = []
        text, emitted, finish, stop_hit = "", 0, "length", None
        bitmask = self._allocate_bitmask() if matcher is not None else None
        timings: dict[str, float] = {}
        with self._hold(adapter) as pin, torch.inference_mode():
            started = time.perf_counter()
            logits, cache = self._forward(pin, torch.tensor([prompt], dtype=torch.long))
            timings["prompt_s"] = time.perf_counter() - started
            logits = logits[0, -1:].float()
            for _ in range(max_new_tokens):
                if matcher is not None:
                    self._apply_mask(matcher, bitmask, logits)
                row = _behaviour_logprobs(logits[0], sampling)
                token = _pick(row, sampling, generator)
                completion.append(token)
                logprobs.append(float(row[token]))
                if matcher is not None and not matcher.accept_token(token):
                    msg = f"grammar matcher rejected token {token} it allowed (xgrammar bug?)"
                    raise RuntimeError(msg)
                if token in self.eos_token_ids:
                    finish = "stop"
                    break
                previous, text = text, self._decode(completion)
                if stop:
                    hit = self._find_stop(text, stop, max(0, len(previous) - holdback))
                    if hit is not None:
                        text, stop_hit, finish = text[: hit[0]], hit[1], "stop"
                        break
                if matcher is not None and matcher.is_terminated():
                    finish = "stop"
                    break
                safe = len(text) - holdback
                while safe > emitted and text[safe - 1] == "\ufffd":
                    safe -= 1
                if safe > emitted:
                    yield text[emitted:safe], None
                    emitted = safe
                if len(completion) >= max_new_tokens:
                    break
                logits, cache = self._forward(pin, torch.tensor([[token]], dtype=torch.long), cache)
                logits = logits[0, -1:].float()
            timings["decode_s"] = time.perf_counter() - started - timings["prompt_s"]
        if finish == "stop" and stop_hit is None and completion and completion[-1] in self.eos_token_ids:
            text = self._decode(completion)
        if len(text) > emitted:
            yield text[emitted:], None
        result = GenerationResult(
            text=text,
            prompt_token_ids=list(prompt),
            completion_token_ids=completion,
            logprobs=logprobs,
            finish_reason=finish,
            adapter=adapter,
            sampling=record,
            stop_sequence=stop_hit,
            timings=timings,
        )
        yield "", result

    # ------------------------------------------------------------------ batched generation

    def sample_group(
        self,
        messages: list[dict[str, Any]] | None = None,
        *,
        prompt_token_ids: Sequence[int] | None = None,
        n: int,
        tools: list[dict[str, Any]] | None = None,
        adapter: str | None = None,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: list[str] | None = None,
        seed: int | Sequence[int] | None = None,
        json_schema: dict[str, Any] | None = None,
    ) -> list[GenerationResult]:
        """``n`` completions of one prompt in one batched decode (an on-policy group).

        The prompt is prefilled once and its KV cache repeated to ``n`` rows; all rows then decode together,
        each stopping at its own EOS / stop string / grammar end / ``max_new_tokens``, and a finished row is
        dropped from the batch (its KV rows with it). Row ``i`` draws from its own generator, exactly as
        :meth:`generate` does, so each result records what :meth:`generate` would: the ids, the behaviour
        logprobs (``logprobs_of`` reproduces them), ``finish_reason``, ``stop_sequence``, and in ``sampling``
        its own ``seed``. ``generate(..., seed=result.sampling["seed"])`` draws the same row, up to float
        noise between a batch of ``n`` and a batch of 1 (a token can differ only where the draw falls within
        ~1e-6 of a boundary between two tokens).

        Args:
            n (`int`): group size (>= 1).
            seed (`int` or `list[int]`, *optional*): an int seeds the group: row seeds are drawn from
                ``random.Random(seed)`` (63-bit), so the same seed gives the same group; a list gives each row
                its seed; `None`: random seeds (recorded).
            json_schema (`dict`, *optional*): every row gets its own grammar matcher.

        The other arguments are :meth:`generate`'s (``temperature`` defaults to 1.0 here). The whole group is
        pinned to ``adapter``, held for the duration of the call.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            msg = f"n must be an int >= 1, got {n!r}"
            raise ConfigurationError(msg)
        sampling = self._check_sampling(temperature, top_p, top_k, max_new_tokens)
        prompt = self._resolve_prompt(messages, prompt_token_ids, tools)
        seeds = self._row_seeds(seed, n)
        rows = [self._new_row(prompt, sampling, s, max_new_tokens, json_schema) for s in seeds]
        if adapter is not None and adapter not in self.adapters:
            raise AdapterError(UNKNOWN_ADAPTER_MSG.format(name=adapter, loaded=self.adapters))
        return self._decode_rows(rows, adapter, sampling, [s for s in (stop or []) if s], shared_prompt=True)

    def generate_batch(
        self,
        prompts: Sequence[list[dict[str, Any]]] | None = None,
        *,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        tools: list[dict[str, Any]] | None = None,
        adapter: str | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: list[str] | None = None,
        seed: int | Sequence[int] | None = None,
        json_schema: dict[str, Any] | None = None,
        batch_size: int = 8,
    ) -> list[GenerationResult]:
        """One completion per prompt (default greedy), ``batch_size`` different prompts decoded together.

        Prompts are sorted by length, left-padded within a batch (attention mask and position ids set), and
        decoded together; a finished row leaves the batch. Results come back in the order of ``prompts``,
        each as :meth:`generate` records it. ``seed`` is as in :meth:`sample_group` (one per prompt).

        Batching changes the float rounding of the logits (~1e-6), so a greedy token can in principle differ
        from :meth:`generate`'s where two tokens tie to that precision; on the test prompts the outputs are
        identical (``test_generate_batch_equals_generate_one_by_one``).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            msg = f"batch_size must be an int >= 1, got {batch_size!r}"
            raise ConfigurationError(msg)
        if (prompts is None) == (prompt_token_ids is None):
            msg = "Pass exactly one of prompts or prompt_token_ids."
            raise ConfigurationError(msg)
        sampling = self._check_sampling(temperature, top_p, top_k, max_new_tokens)
        if prompts is not None:
            encoded = [self._resolve_prompt(list(p), None, tools) for p in prompts]
        else:
            encoded = [self._resolve_prompt(None, ids, None) for ids in prompt_token_ids]  # type: ignore[union-attr]
        if not encoded:
            return []
        seeds = self._row_seeds(seed, len(encoded))
        rows = [
            self._new_row(p, sampling, s, max_new_tokens, json_schema)
            for p, s in zip(encoded, seeds, strict=True)
        ]
        if adapter is not None and adapter not in self.adapters:
            raise AdapterError(UNKNOWN_ADAPTER_MSG.format(name=adapter, loaded=self.adapters))
        stop = [s for s in (stop or []) if s]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].prompt))
        results: list[GenerationResult | None] = [None] * len(rows)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            # one prompt (or copies of one): prefill it once, no padding
            shared = len({tuple(rows[i].prompt) for i in chunk}) == 1
            done = self._decode_rows([rows[i] for i in chunk], adapter, sampling, stop, shared_prompt=shared)
            for i, result in zip(chunk, done, strict=True):
                results[i] = result
        return results  # type: ignore[return-value]

    @staticmethod
    def _row_seeds(seed: int | Sequence[int] | None, n: int) -> list[int | None]:
        if seed is None:
            return [None] * n
        if isinstance(seed, int) and not isinstance(seed, bool):
            rng = random.Random(seed)
            return [rng.getrandbits(63) for _ in range(n)]
        seeds = [int(s) for s in seed]
        if len(seeds) != n:
            msg = f"seed: got {len(seeds)} seeds for {n} rows"
            raise ConfigurationError(msg)
        return seeds  # type: ignore[return-value]

    def _new_row(
        self,
        prompt: list[int],
        sampling: _Sampling,
        seed: int | None,
        max_new_tokens: int,
        json_schema: dict[str, Any] | None,
    ) -> _Row:
        """One row's generator, matcher, ``sampling`` record and token budget, exactly as :meth:`stream` sets them."""
        if self.max_positions and len(prompt) + 1 > self.max_positions:
            msg = f"The prompt has {len(prompt)} tokens; {self.base_model_name} takes at most {self.max_positions}."
            raise ConfigurationError(msg)
        if self.max_positions:
            max_new_tokens = min(max_new_tokens, self.max_positions - len(prompt))
        matcher = self._grammar_matcher(json_schema) if json_schema is not None else None
        generator, record = self._seeded(sampling, seed, max_new_tokens, json_schema)
        return _Row(
            prompt=prompt, generator=generator, matcher=matcher, record=record, max_new_tokens=max_new_tokens
        )

    def _advance(self, row: _Row, token: int, logprob: float, stop: list[str], holdback: int) -> None:
        """Append one sampled token to ``row``; the same per-token rules as :meth:`_run`, in the same order."""
        row.completion.append(token)
        row.logprobs.append(logprob)
        if row.matcher is not None and not row.matcher.accept_token(token):
            msg = f"grammar matcher rejected token {token} it allowed (xgrammar bug?)"
            raise RuntimeError(msg)
        if token in self.eos_token_ids:
            row.finish, row.done = "stop", True
            return
        if stop:
            previous, row.text = row.text, self._decode(row.completion)
            hit = self._find_stop(row.text, stop, max(0, len(previous) - holdback))
            if hit is not None:
                row.text, row.stop_hit, row.finish, row.done = row.text[: hit[0]], hit[1], "stop", True
                return
        if row.matcher is not None and row.matcher.is_terminated():
            row.finish, row.done = "stop", True
            return
        if len(row.completion) >= row.max_new_tokens:
            row.done = True

    def _decode_rows(
        self,
        rows: list[_Row],
        adapter: str | None,
        sampling: _Sampling,
        stop: list[str],
        *,
        shared_prompt: bool,
    ) -> list[GenerationResult]:
        """Decode ``rows`` together under one adapter pin; ``shared_prompt``: they all have ``rows[0].prompt``."""
        torch = require("torch", backend="local", extra="local")
        holdback = max((len(s) for s in stop), default=1) - 1
        drop_finished = self._drop_finished
        bitmask = self._allocate_bitmask() if any(r.matcher is not None for r in rows) else None
        mask = positions = None
        with self._hold(adapter) as pin, torch.inference_mode():
            started = time.perf_counter()
            if shared_prompt:
                logits, cache = self._forward(pin, torch.tensor([rows[0].prompt], dtype=torch.long))
                logits = logits[:, -1].float().repeat(len(rows), 1)
                if len(rows) > 1:
                    cache.batch_repeat_interleave(len(rows))
            else:
                width = max(len(r.prompt) for r in rows)
                pad = self.tokenizer.pad_token_id
                pad = pad if pad is not None else min(self.eos_token_ids, default=0)
                ids = torch.tensor(
                    [[pad] * (width - len(r.prompt)) + r.prompt for r in rows], dtype=torch.long
                )
                mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in rows])
                position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
                logits, cache = self._forward(pin, ids, attention_mask=mask, position_ids=position_ids)
                logits = logits[:, -1].float()
                positions = position_ids[:, -1]
            prompt_s = time.perf_counter() - started
            batch = list(rows)  # the rows in the KV cache, in batch order (finished ones too when masking)
            while True:
                live = [i for i, row in enumerate(batch) if not row.done]
                if bitmask is not None:
                    for i in live:
                        if batch[i].matcher is not None:
                            self._apply_mask(batch[i].matcher, bitmask, logits[i : i + 1])
                lp = _behaviour_logprobs(logits, sampling)
                tokens = [self._pad_token(row) for row in batch]
                for i in live:
                    row = batch[i]
                    token = _pick(lp[i], sampling, row.generator)
                    tokens[i] = token
                    self._advance(row, token, float(lp[i, token]), stop, holdback)
                    if row.done:
                        row.decode_s = time.perf_counter() - started - prompt_s
                keep = [i for i, row in enumerate(batch) if not row.done]
                if not keep:
                    break
                if drop_finished and len(keep) < len(batch):
                    index = torch.tensor(keep, dtype=torch.long)
                    cache.batch_select_indices(index)
                    batch, tokens = [batch[i] for i in keep], [tokens[i] for i in keep]
                    if mask is not None:
                        mask, positions = mask[index], positions[index]
                extra: dict[str, Any] = {}
                if mask is not None:
                    mask = torch.cat([mask, mask.new_ones(len(batch), 1)], dim=1)
                    positions = positions + 1
                    extra = {"attention_mask": mask, "position_ids": positions[:, None]}
                logits, cache = self._forward(
                    pin, torch.tensor(tokens, dtype=torch.long)[:, None], cache, **extra
                )
                logits = logits[:, -1].float()
        results = []
        for row in rows:
            text = row.text if row.stop_hit is not None else self._decode(row.completion)
            results.append(
                GenerationResult(
                    text=text,
                    prompt_token_ids=list(row.prompt),
                    completion_token_ids=row.completion,
                    logprobs=row.logprobs,
                    finish_reason=row.finish,
                    adapter=adapter,
                    sampling=row.record,
                    stop_sequence=row.stop_hit,
                    timings={"prompt_s": prompt_s, "decode_s": row.decode_s, "batch_rows": float(len(rows))},
                )
            )
        return results

    @staticmethod
    def _pad_token(row: _Row) -> int:
        """The input fed for a finished row that stays in the batch (masking mode): its last token."""
        return row.completion[-1] if row.completion else row.prompt[-1]

    def logprobs_of(
        self,
        prompt: list[dict[str, Any]] | Sequence[int],
        completion_token_ids: Sequence[int],
        *,
        tools: list[dict[str, Any]] | None = None,
        adapter: str | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        json_schema: dict[str, Any] | None = None,
    ) -> list[float]:
        """Teacher-forced log-probabilities of ``completion_token_ids`` after ``prompt`` (messages or token ids).

        Computed under the same distribution :meth:`generate` samples from with the same arguments
        (``temperature=0`` gives the greedy record, ``log_softmax`` of the raw logits; ``json_schema`` replays
        the grammar mask), so for a :class:`GenerationResult` ``r``,
        ``logprobs_of(r.prompt_token_ids, r.completion_token_ids, adapter=r.adapter, **sampling)`` equals
        ``r.logprobs`` to float precision. A token the distribution excludes gets ``-inf``.
        """
        torch = require("torch", backend="local", extra="local")
        sampling = self._check_sampling(temperature, top_p, top_k, 1)
        if prompt and isinstance(prompt[0], dict):
            prompt_ids = self.encode_prompt(list(prompt), tools=tools)  # type: ignore[arg-type]
        else:
            prompt_ids = [int(t) for t in prompt]  # type: ignore[union-attr]
        completion = [int(t) for t in completion_token_ids]
        if not prompt_ids:
            msg = "logprobs_of needs a non-empty prompt."
            raise ConfigurationError(msg)
        if not completion:
            return []
        matcher = self._grammar_matcher(json_schema) if json_schema is not None else None
        bitmask = self._allocate_bitmask() if matcher is not None else None
        with self._hold(adapter) as pin, torch.inference_mode():
            ids = torch.tensor([prompt_ids + completion], dtype=torch.long)
            logits, _ = self._forward(pin, ids, logits_to_keep=len(completion) + 1)
            logits = logits[0, :-1].float()
        result = []
        for step, token in enumerate(completion):
            row = logits[step : step + 1].clone()
            if matcher is not None:
                if matcher.is_terminated():
                    result.append(float("-inf"))
                    continue
                self._apply_mask(matcher, bitmask, row)
            lp = _behaviour_logprobs(row[0], sampling)
            result.append(float(lp[token]))
            if matcher is not None and not matcher.accept_token(token):
                matcher = None  # off-grammar token: later positions are not constrained
        return result

    # ------------------------------------------------------------------ helpers

    def _resolve_prompt(
        self,
        messages: list[dict[str, Any]] | None,
        prompt_token_ids: Sequence[int] | None,
        tools: list[dict] | None,
    ) -> list[int]:
        if (messages is None) == (prompt_token_ids is None):
            msg = "Pass exactly one of messages or prompt_token_ids."
            raise ConfigurationError(msg)
        if prompt_token_ids is not None:
            ids = [int(t) for t in prompt_token_ids]
        else:
            ids = self.encode_prompt(messages, tools=tools)  # type: ignore[arg-type]
        if not ids:
            msg = "The prompt is empty."
            raise ConfigurationError(msg)
        return ids

    @staticmethod
    def _check_sampling(temperature: float, top_p: float, top_k: int, max_new_tokens: int) -> _Sampling:
        if not (temperature >= 0.0 and math.isfinite(temperature)):
            msg = f"temperature must be >= 0 (0 is greedy), got {temperature}"
            raise ConfigurationError(msg)
        if not 0.0 < top_p <= 1.0:
            msg = f"top_p must be in (0, 1], got {top_p}"
            raise ConfigurationError(msg)
        if top_k < 0:
            msg = f"top_k must be >= 0 (0 disables it), got {top_k}"
            raise ConfigurationError(msg)
        if max_new_tokens < 1:
            msg = f"max_new_tokens must be >= 1, got {max_new_tokens}"
            raise ConfigurationError(msg)
        return _Sampling(float(temperature), float(top_p), int(top_k))

    @staticmethod
    def _find_stop(text: str, stop: list[str], start: int) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for s in stop:
            idx = text.find(s, start)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        return best

    def _allocate_bitmask(self) -> Any:
        xgr = require("xgrammar", backend="local (json_schema)", extra="local")
        return xgr.allocate_token_bitmask(1, self.vocab_size)

    def _apply_mask(self, matcher: Any, bitmask: Any, logits: torch.Tensor) -> None:
        """Fill the matcher's next-token bitmask and set disallowed logits (shape ``[1, vocab]``) to ``-inf``."""
        xgr = require("xgrammar", backend="local (json_schema)", extra="local")
        matcher.fill_next_token_bitmask(bitmask)
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size)
