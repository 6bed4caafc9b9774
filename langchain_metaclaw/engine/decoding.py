"""The decode loop over the KV cache, and the per-token rules every completion ends by.

One loop serves every request shape: a single streamed request is a batch of one row; ``sample_group``
prefills one prompt once and repeats its KV cache to ``n`` rows; ``generate_batch`` left-pads different
prompts (attention mask and position ids set). Each step masks each row's logits with its own grammar
matcher, takes the behaviour log-probabilities of the whole batch, draws each live row's token from its own
generator, and applies :class:`TokenRules` to it; a finished row leaves the batch (its KV rows are dropped),
so every row records exactly what a one-row decode of the same request and seed records. Decoding a 135M
model one row at a time is bound by reading the weights; G rows per forward cost about twice one row, so a
group of 8 is 2.4-4x faster on 2 shared cores (``benchmarks/sampling.py``).

The loop is a generator that yields after every step that leaves a row unfinished, so the streaming path
can release text between tokens and a caller that stops iterating stops the decode.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from langchain_metaclaw._compat import require
from langchain_metaclaw.engine.sampling import SamplingParams, behaviour_logprobs, pick

if TYPE_CHECKING:
    import torch

    from langchain_metaclaw.engine.grammar import JsonGrammar

__all__ = ["Forward", "Row", "TokenRules", "decode", "find_stop", "replay_logprobs"]

Forward = Callable[..., tuple[Any, Any]]
"""``forward(input_ids, cache=None, logits_to_keep=1, **extra) -> (logits, cache)``, pinned to one adapter;
``extra`` is ``attention_mask`` / ``position_ids`` for left-padded batches."""


@dataclass(eq=False)
class Row:
    """Decoding state of one completion: its prompt, generator, grammar matcher, budget and what it produced."""

    prompt: list[int]
    generator: Any
    matcher: Any
    record: dict[str, Any]
    """The result's ``sampling`` record (:meth:`SamplingParams.record`)."""
    max_new_tokens: int
    completion: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    """Decoded so far (when tracked); trimmed before the stop string that ended the row."""
    finish: Literal["stop", "length"] = "length"
    stop_hit: str | None = None
    done: bool = False
    prompt_s: float = 0.0
    decode_s: float = 0.0
    batch_rows: int = 1


def find_stop(text: str, stop: Sequence[str], start: int) -> tuple[int, str] | None:
    """The earliest match of any stop string in ``text[start:]``: ``(index, stop string)``, or ``None``."""
    best: tuple[int, str] | None = None
    for s in stop:
        idx = text.find(s, start)
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, s)
    return best


@dataclass(frozen=True)
class TokenRules:
    """What one sampled token does to its row, the same for every decode.

    In this order: the grammar matcher accepts it; EOS ends the row (``"stop"``, EOS kept in the ids, not in
    the text); a stop string ends it (``"stop"``, text trimmed before the match, ids kept; only the last
    ``holdback`` characters plus the new text are searched); a complete grammar ends it (``"stop"``);
    ``max_new_tokens`` ends it (``"length"``).
    """

    eos_token_ids: frozenset[int]
    stop: tuple[str, ...]
    decode: Callable[[Sequence[int]], str]
    """Token ids to text (special tokens skipped)."""
    track_text: bool = False
    """Keep ``row.text`` current after every token (streaming), not only when there are stop strings."""
    holdback: int = field(init=False)
    """Characters at the end of the text that could still be the start of a stop string."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "holdback", max((len(s) for s in self.stop), default=1) - 1)

    def advance(self, row: Row, token: int, logprob: float) -> None:
        """Append ``token`` (drawn with ``logprob``) to ``row`` and end the row if a rule says so."""
        row.completion.append(token)
        row.logprobs.append(logprob)
        if row.matcher is not None and not row.matcher.accept_token(token):
            msg = f"grammar matcher rejected token {token} it allowed (xgrammar bug?)"
            raise RuntimeError(msg)
        if token in self.eos_token_ids:
            row.finish, row.done = "stop", True
            return
        if self.stop or self.track_text:
            previous, row.text = row.text, self.decode(row.completion)
            hit = find_stop(row.text, self.stop, max(0, len(previous) - self.holdback)) if self.stop else None
            if hit is not None:
                row.text, row.stop_hit, row.finish, row.done = row.text[: hit[0]], hit[1], "stop", True
                return
        if row.matcher is not None and row.matcher.is_terminated():
            row.finish, row.done = "stop", True
            return
        if len(row.completion) >= row.max_new_tokens:
            row.done = True

    def final_text(self, row: Row) -> str:
        """The finished row's text: trimmed at its stop string, else all of its tokens decoded."""
        return row.text if row.stop_hit is not None else self.decode(row.completion)


class _Batch:
    """The rows in the KV cache, in batch order, with the cache and, for left-padded prompts, mask and positions."""

    def __init__(self, forward: Forward, rows: list[Row], pad_token_id: int) -> None:
        self.forward = forward
        self.rows = list(rows)
        self.pad_token_id = pad_token_id
        self.cache: Any = None
        self.mask: Any = None
        self.positions: Any = None

    def prefill(self) -> torch.Tensor:
        """Run the prompts; returns the last position's logits, one row per row."""
        torch = require("torch", backend="local", extra="local")
        rows = self.rows
        if len({tuple(r.prompt) for r in rows}) == 1:  # one prompt (or copies of one): prefill once, no padding
            logits, self.cache = self.forward(torch.tensor([rows[0].prompt], dtype=torch.long))
            logits = logits[:, -1].float()
            if len(rows) == 1:
                return logits
            self.cache.batch_repeat_interleave(len(rows))
            return logits.repeat(len(rows), 1)  # a copy per row: grammar masks write into their row
        width = max(len(r.prompt) for r in rows)
        pad = self.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r.prompt)) + r.prompt for r in rows], dtype=torch.long)
        self.mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in rows])
        position_ids = (self.mask.cumsum(-1) - 1).clamp(min=0)
        logits, self.cache = self.forward(ids, attention_mask=self.mask, position_ids=position_ids)
        self.positions = position_ids[:, -1]
        return logits[:, -1].float()

    def keep(self, keep: list[int]) -> None:
        """Drop every row not in ``keep`` (indices into ``rows``) from the batch and the KV cache."""
        torch = require("torch", backend="local", extra="local")
        index = torch.tensor(keep, dtype=torch.long)
        self.cache.batch_select_indices(index)
        self.rows = [self.rows[i] for i in keep]
        if self.mask is not None:
            self.mask, self.positions = self.mask[index], self.positions[index]

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row; returns the next logits, one row per row."""
        torch = require("torch", backend="local", extra="local")
        extra: dict[str, Any] = {}
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
            self.positions = self.positions + 1
            extra = {"attention_mask": self.mask, "position_ids": self.positions[:, None]}
        ids = torch.tensor(tokens, dtype=torch.long)[:, None]
        logits, self.cache = self.forward(ids, self.cache, **extra)
        return logits[:, -1].float()


def _sample(
    rows: list[Row],
    logits: torch.Tensor,
    params: SamplingParams,
    rules: TokenRules,
    grammar: JsonGrammar | None,
    bitmask: Any,
) -> list[int]:
    """Draw and apply one token for every unfinished row; returns the next input of every row of the batch."""
    live = [i for i, row in enumerate(rows) if not row.done]
    if bitmask is not None:
        for i in live:
            if rows[i].matcher is not None:
                grammar.apply_mask(rows[i].matcher, bitmask, logits[i : i + 1])  # type: ignore[union-attr]
    lp = behaviour_logprobs(logits, params)
    # a finished row kept in the batch (drop_finished=False) is fed its last token again, its output unused
    tokens = [row.completion[-1] if row.completion else row.prompt[-1] for row in rows]
    for i in live:
        token = pick(lp[i], params, rows[i].generator)
        tokens[i] = token
        rules.advance(rows[i], token, float(lp[i, token]))
    return tokens


def decode(
    forward: Forward,
    rows: list[Row],
    params: SamplingParams,
    rules: TokenRules,
    grammar: JsonGrammar | None,
    *,
    pad_token_id: int,
    drop_finished: bool = True,
) -> Iterator[None]:
    """Decode ``rows`` together until each is done; yields after every step that leaves a row unfinished.

    ``drop_finished=False`` keeps finished rows in the batch, masked (slower; for ``benchmarks/sampling.py``).
    """
    bitmask = grammar.allocate_bitmask() if grammar is not None and any(r.matcher is not None for r in rows) else None
    started = time.perf_counter()
    batch = _Batch(forward, rows, pad_token_id)
    logits = batch.prefill()
    prompt_s = time.perf_counter() - started
    for row in rows:
        row.prompt_s, row.batch_rows = prompt_s, len(rows)
    while True:
        tokens = _sample(batch.rows, logits, params, rules, grammar, bitmask)
        now = time.perf_counter()
        for row in batch.rows:
            if row.done and not row.decode_s:
                row.decode_s = now - started - prompt_s
        keep = [i for i, row in enumerate(batch.rows) if not row.done]
        if not keep:
            return
        yield
        if drop_finished and len(keep) < len(batch.rows):
            batch.keep(keep)
            tokens = [tokens[i] for i in keep]
        logits = batch.step(tokens)


def replay_logprobs(
    logits: torch.Tensor,
    completion: Sequence[int],
    params: SamplingParams,
    matcher: Any,
    grammar: JsonGrammar | None,
) -> list[float]:
    """Behaviour log-probabilities of ``completion`` from teacher-forced ``logits`` (one row per token).

    The grammar mask is replayed token by token; a token the distribution excludes gets ``-inf``, and after
    an off-grammar token the rest is unconstrained.
    """
    bitmask = grammar.allocate_bitmask() if matcher is not None and grammar is not None else None
    result = []
    for step, token in enumerate(completion):
        row = logits[step : step + 1].clone()
        if matcher is not None:
            if matcher.is_terminated():
                result.append(float("-inf"))
                continue
            grammar.apply_mask(matcher, bitmask, row)  # type: ignore[union-attr]
        lp = behaviour_logprobs(row[0], params)
        result.append(float(lp[token]))
        if matcher is not None and not matcher.accept_token(token):
            matcher = None  # off-grammar token: later positions are not constrained
    return result
