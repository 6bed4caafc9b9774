"""The generation half of the local engine: prompts in, exactly recorded completions out.

:class:`GenerationEngine` owns the tokenizer, the grammars and every generation entry point; a subclass
(``LocalEngine``) supplies the model: ``_forward`` (one forward pass pinned to an adapter), ``_hold`` (an
adapter referenced for the duration of a request), ``_check_adapter`` and ``_result`` (the record a finished
row becomes). The engine writes its own decoding loop over the KV cache rather than calling
``model.generate``, because that is the only way to know exactly:

- the log-probability of each sampled token under the distribution it was *sampled from* (see
  :mod:`langchain_metaclaw.engine.sampling`);
- which tokens were generated up to a stop string (the text is trimmed, the ids are kept);
- where a grammar mask (``json_schema``, compiled by xgrammar) removed tokens.

Every entry point turns its keyword arguments into one :class:`SamplingParams`, builds one
:class:`~langchain_metaclaw.engine.decoding.Row` per completion and runs the one decode loop
(:func:`~langchain_metaclaw.engine.decoding.decode`) with the one set of per-token rules, so a row of a
batched decode records what :meth:`GenerationEngine.generate` records for the same request and seed.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar, Unpack

from langchain_metaclaw._compat import require
from langchain_metaclaw.engine.decoding import Row, TokenRules, decode, replay_logprobs
from langchain_metaclaw.engine.grammar import JsonGrammar
from langchain_metaclaw.engine.sampling import SamplingArgs, SamplingParams
from langchain_metaclaw.errors import ConfigurationError
from langchain_metaclaw.messages import chat_prompt_ids

if TYPE_CHECKING:
    import torch

__all__ = ["GenerationEngine", "RequestArgs"]

R = TypeVar("R")
"""The record of one finished completion (``LocalEngine``: ``GenerationResult``)."""

Messages = list[dict[str, Any]]


class RequestArgs(SamplingArgs, total=False):
    """:meth:`GenerationEngine.generate`'s keyword arguments: the prompt as ids, tools, adapter and sampling."""

    prompt_token_ids: Sequence[int] | None
    """A ready prompt (instead of ``messages``)."""
    tools: list[dict[str, Any]] | None
    """OpenAI tool schemas, rendered by the chat template."""
    adapter: str | None
    """A loaded adapter's name, pinned for the request; ``None`` for the base model."""


class GenerationEngine(Generic[R]):
    """Generation over a causal LM served by a subclass (see the module docstring for the split).

    Args:
        tokenizer: the model's HuggingFace tokenizer (with a chat template).
        model_name (`str`): the base model's name, for messages.
        eos_token_ids: token ids that end a completion.
        vocab_size (`int`): width of a logit row.
        max_positions (`int`): the model's context length (0: unknown, not checked).
    """

    def __init__(
        self, tokenizer: Any, *, model_name: str, eos_token_ids: frozenset[int], vocab_size: int, max_positions: int
    ) -> None:
        self.tokenizer = tokenizer
        self.base_model_name: str = model_name
        """The base model this engine serves (as given; the embedded model's name when ``None``)."""
        self.eos_token_ids: frozenset[int] = eos_token_ids
        """Token ids that end a completion."""
        self.vocab_size = vocab_size
        self.max_positions = max_positions
        self._tokenizer_lock = threading.Lock()
        self._grammar = JsonGrammar(tokenizer, vocab_size, eos_token_ids, self._tokenizer_lock)
        self._drop_finished = True
        """Batched decoding drops finished rows from the batch (False: keeps decoding them, masked; slower)."""
        pad = tokenizer.pad_token_id
        self._pad_token_id: int = pad if pad is not None else min(eos_token_ids, default=0)

    # ------------------------------------------------------------------ served by the subclass

    def _forward(
        self, pin: str, input_ids: torch.Tensor, cache: Any = None, logits_to_keep: int = 1, **extra: Any
    ) -> tuple[Any, Any]:
        """One forward pinned to adapter ``pin`` (every row of the batch); returns ``(logits, cache)``."""
        raise NotImplementedError

    def _hold(self, adapter: str | None) -> contextlib.AbstractContextManager[str]:
        """Reference ``adapter`` for the duration of a request; yields the name to pin."""
        raise NotImplementedError

    def _check_adapter(self, adapter: str | None) -> None:
        """Raise ``AdapterError`` now when ``adapter`` is not loaded (not at the first step of a stream)."""
        raise NotImplementedError

    def _result(self, row: Row, adapter: str | None) -> R:
        """The record of finished ``row`` (its ``text`` final), decoded under ``adapter``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ prompts

    def encode_prompt(self, messages: Messages, *, tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of ``messages`` rendered with the chat template and the generation prompt."""
        with self._tokenizer_lock:
            return chat_prompt_ids(self.tokenizer, messages, tools=tools)

    def _decode(self, ids: Sequence[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _resolve_prompt(
        self, messages: Messages | None, prompt_token_ids: Sequence[int] | None, tools: list[dict] | None
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

    # ------------------------------------------------------------------ generation

    def generate(self, messages: Messages | None = None, **request: Unpack[RequestArgs]) -> R:
        """Generate one completion for ``messages`` (or for ready ``prompt_token_ids``).

        Args:
            **request: :meth:`stream`'s arguments (:class:`RequestArgs`): ``prompt_token_ids``, ``tools``,
                ``adapter`` (a loaded adapter's name, pinned for this request; `None` for the base) and the
                sampling arguments (:class:`~langchain_metaclaw.engine.sampling.SamplingArgs`; greedy by default,
                ``seed`` is one int).
        """
        result = None
        for _, final in self.stream(messages, **request):
            result = final or result
        assert result is not None
        return result

    def stream(
        self,
        messages: Messages | None = None,
        *,
        prompt_token_ids: Sequence[int] | None = None,
        tools: list[dict[str, Any]] | None = None,
        adapter: str | None = None,
        **sampling: Unpack[SamplingArgs],
    ) -> Iterator[tuple[str, R | None]]:
        """Like :meth:`generate`, yielding ``(text_delta, None)`` as text becomes final, then ``("", result)``.

        Text that could still turn out to be the start of a stop string, or an incomplete UTF-8 character,
        is held back until it cannot; the deltas always add up to ``result.text``. Arguments are checked
        before the first ``next()``; the adapter is held only while the stream runs.
        """
        params = SamplingParams(**sampling)
        if params.seed is not None and not isinstance(params.seed, int):
            msg = f"generate() and stream() take one int seed, got {sampling.get('seed')!r}"
            raise ConfigurationError(msg)
        prompt = self._resolve_prompt(messages, prompt_token_ids, tools)
        row = self._new_row(prompt, params, params.seed)  # type: ignore[arg-type]
        self._check_adapter(adapter)
        return self._stream_row(row, adapter, params)

    def sample_group(
        self,
        messages: Messages | None = None,
        *,
        prompt_token_ids: Sequence[int] | None = None,
        n: int,
        tools: list[dict[str, Any]] | None = None,
        adapter: str | None = None,
        **sampling: Unpack[SamplingArgs],
    ) -> list[R]:
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
            **sampling: as :meth:`generate` (``temperature`` defaults to 1.0 here). ``seed``: an int seeds the
                group (row seeds drawn from ``random.Random(seed)``, 63-bit), a list gives each row its seed,
                `None` draws random seeds (recorded). With ``json_schema`` every row gets its own matcher.

        The whole group is pinned to ``adapter``, held for the duration of the call.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            msg = f"n must be an int >= 1, got {n!r}"
            raise ConfigurationError(msg)
        params = SamplingParams(**{"temperature": 1.0, **sampling})
        prompt = self._resolve_prompt(messages, prompt_token_ids, tools)
        rows = [self._new_row(prompt, params, seed) for seed in params.row_seeds(n)]
        self._check_adapter(adapter)
        return self._decode_rows(rows, adapter, params)

    def generate_batch(
        self,
        prompts: Sequence[Messages] | None = None,
        *,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        tools: list[dict[str, Any]] | None = None,
        adapter: str | None = None,
        batch_size: int = 8,
        **sampling: Unpack[SamplingArgs],
    ) -> list[R]:
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
        params = SamplingParams(**sampling)
        if prompts is not None:
            encoded = [self._resolve_prompt(list(p), None, tools) for p in prompts]
        else:
            encoded = [self._resolve_prompt(None, ids, None) for ids in prompt_token_ids]  # type: ignore[union-attr]
        if not encoded:
            return []
        seeds = params.row_seeds(len(encoded))
        rows = [self._new_row(p, params, s) for p, s in zip(encoded, seeds, strict=True)]
        self._check_adapter(adapter)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].prompt))
        results: list[Any] = [None] * len(rows)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            done = self._decode_rows([rows[i] for i in chunk], adapter, params)
            for i, result in zip(chunk, done, strict=True):
                results[i] = result
        return results

    def logprobs_of(
        self,
        prompt: Messages | Sequence[int],
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
        the grammar mask), so for a result ``r``, ``logprobs_of(r.prompt_token_ids, r.completion_token_ids,
        adapter=r.adapter, temperature=..., top_p=..., top_k=..., json_schema=...)`` with ``r.sampling``'s
        values equals ``r.logprobs`` to float precision. A token the distribution excludes gets ``-inf``.
        """
        torch = require("torch", backend="local", extra="local")
        params = SamplingParams(
            temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=1, json_schema=json_schema
        )
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
        matcher = self._grammar.matcher(json_schema) if json_schema is not None else None
        with self._hold(adapter) as pin, torch.inference_mode():
            ids = torch.tensor([prompt_ids + completion], dtype=torch.long)
            logits, _ = self._forward(pin, ids, logits_to_keep=len(completion) + 1)
            logits = logits[0, :-1].float()
        return replay_logprobs(logits, completion, params, matcher, self._grammar)

    # ------------------------------------------------------------------ rows

    def _new_row(self, prompt: list[int], params: SamplingParams, seed: int | None) -> Row:
        """One completion's generator (seeded with ``seed``, or randomly), matcher, record and token budget."""
        torch = require("torch", backend="local", extra="local")
        if self.max_positions and len(prompt) + 1 > self.max_positions:
            msg = f"The prompt has {len(prompt)} tokens; {self.base_model_name} takes at most {self.max_positions}."
            raise ConfigurationError(msg)
        budget = params.max_new_tokens
        if self.max_positions:
            budget = min(budget, self.max_positions - len(prompt))
        matcher = self._grammar.matcher(params.json_schema) if params.json_schema is not None else None
        generator = torch.Generator(device="cpu")
        used_seed = generator.manual_seed(seed).initial_seed() if seed is not None else generator.seed()
        record = params.record(used_seed, budget)
        return Row(prompt=prompt, generator=generator, matcher=matcher, record=record, max_new_tokens=budget)

    def _rules(self, params: SamplingParams, *, track_text: bool = False) -> TokenRules:
        return TokenRules(self.eos_token_ids, params.stop, self._decode, track_text=track_text)

    def _steps(self, rows: list[Row], adapter: str | None, rules: TokenRules, params: SamplingParams) -> Iterator[None]:
        """The decode of ``rows`` under one adapter pin (a generator: the adapter is held only while it runs)."""
        torch = require("torch", backend="local", extra="local")
        with self._hold(adapter) as pin, torch.inference_mode():
            forward = functools.partial(self._forward, pin)
            yield from decode(
                forward, rows, params, rules, self._grammar,
                pad_token_id=self._pad_token_id, drop_finished=self._drop_finished,
            )

    def _decode_rows(self, rows: list[Row], adapter: str | None, params: SamplingParams) -> list[R]:
        """Decode ``rows`` together under one adapter pin; their results, in order."""
        rules = self._rules(params)
        for _ in self._steps(rows, adapter, rules, params):
            pass
        for row in rows:
            row.text = rules.final_text(row)
        return [self._result(row, adapter) for row in rows]

    def _stream_row(self, row: Row, adapter: str | None, params: SamplingParams) -> Iterator[tuple[str, R | None]]:
        """Decode one row, yielding its text as it becomes final (see :meth:`stream`), then its result."""
        rules = self._rules(params, track_text=True)
        emitted = 0
        with contextlib.closing(self._steps([row], adapter, rules, params)) as steps:
            for _ in steps:
                safe = len(row.text) - rules.holdback
                while safe > emitted and row.text[safe - 1] == "\ufffd":
                    safe -= 1
                if safe > emitted:
                    yield row.text[emitted:safe], None
                    emitted = safe
        row.text = rules.final_text(row)
        if len(row.text) > emitted:
            yield row.text[emitted:], None
        yield "", self._result(row, adapter)
