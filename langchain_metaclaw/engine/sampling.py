"""How a request samples: one validated :class:`SamplingParams`, and the behaviour distribution it defines.

Every entry point of the engine (``generate``, ``stream``, ``sample_group``, ``generate_batch``,
``logprobs_of``) takes the same keyword arguments (:class:`SamplingArgs`) and turns them into one
:class:`SamplingParams` before anything else happens, so a bad value is refused the same way everywhere and
the decoding code below never re-checks it.

The behaviour log-probabilities are those of the distribution a token is *drawn from*: ``softmax(logits / T)``
after top-k then top-p truncation (renormalised over the kept tokens) and after any grammar mask; for greedy
decoding (``T = 0``), ``log_softmax`` of the raw, possibly masked, logits. The trainer needs exactly these
(importance ratios), and :meth:`LocalEngine.logprobs_of` recomputes them teacher-forced with the same code.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict

from langchain_metaclaw._compat import require
from langchain_metaclaw.errors import ConfigurationError

if TYPE_CHECKING:
    import torch

__all__ = ["SamplingArgs", "SamplingParams", "behaviour_logprobs", "pick"]


class SamplingArgs(TypedDict, total=False):
    """The sampling keyword arguments every generation method of the engine accepts (all optional)."""

    max_new_tokens: int
    """At most this many new tokens (then ``finish_reason="length"``); 128 by default."""
    temperature: float
    """0 is greedy; otherwise sample from ``softmax(logits / T)``. 0.0 by default (1.0 for ``sample_group``)."""
    top_p: float
    """Nucleus truncation, 1.0 (off) by default; the logprobs are of the truncated distribution."""
    top_k: int
    """Top-k truncation, 0 (off) by default."""
    stop: list[str] | None
    """Stop strings: the text is trimmed before the first match, the token ids keep the tokens that made it."""
    seed: int | Sequence[int] | None
    """Seeds the request's own generator (recorded in ``sampling`` either way). ``sample_group`` and
    ``generate_batch`` also take one seed per row, or derive the row seeds from one int."""
    json_schema: dict[str, Any] | None
    """Constrain the output to JSON matching this schema (an xgrammar mask on every step)."""


@dataclass(frozen=True)
class SamplingParams:
    """One request's validated sampling settings (see :class:`SamplingArgs` for what each one means).

    Raises:
        ConfigurationError: a value out of range (``temperature < 0``, ``top_p`` outside ``(0, 1]``,
            ``top_k < 0``, ``max_new_tokens < 1``).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    seed: int | tuple[int, ...] | None = None
    json_schema: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        checks = (
            (self.temperature >= 0.0 and math.isfinite(self.temperature), "temperature must be >= 0 (0 is greedy)",
             self.temperature),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]", self.top_p),
            (self.top_k >= 0, "top_k must be >= 0 (0 disables it)", self.top_k),
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1", self.max_new_tokens),
        )
        for ok, rule, value in checks:
            if not ok:
                msg = f"{rule}, got {value}"
                raise ConfigurationError(msg)
        seed = self.seed
        if seed is not None and not isinstance(seed, int):
            seed = tuple(int(s) for s in seed)
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "stop", tuple(s for s in (self.stop or ()) if s))
        object.__setattr__(self, "seed", seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def holdback(self) -> int:
        """Characters of decoded text that could still be the start of a stop string."""
        return max((len(s) for s in self.stop), default=1) - 1

    def row_seeds(self, n: int) -> list[int | None]:
        """One seed per row of a batched decode: ``None`` (random), drawn from ``random.Random(seed)``, or given."""
        if self.seed is None:
            return [None] * n
        if isinstance(self.seed, int):
            rng = random.Random(self.seed)
            return [rng.getrandbits(63) for _ in range(n)]
        if len(self.seed) != n:
            msg = f"seed: got {len(self.seed)} seeds for {n} rows"
            raise ConfigurationError(msg)
        return list(self.seed)

    def record(self, seed: int, max_new_tokens: int) -> dict[str, Any]:
        """The ``GenerationResult.sampling`` record: what reproduces a row's behaviour distribution."""
        record = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "greedy": self.greedy,
            "constrained": self.json_schema is not None,
            "seed": int(seed),
            "max_new_tokens": int(max_new_tokens),
        }
        if self.json_schema is not None:
            record["json_schema"] = self.json_schema
        return record


def behaviour_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probabilities (float32, ``-inf`` for excluded tokens) of the distribution tokens are drawn from.

    ``logits``: one row (``[vocab]``) or a batch of rows (``[rows, vocab]``) of already grammar-masked logits.
    """
    torch = require("torch", backend="local", extra="local")
    logits = logits.float()
    if params.greedy:
        return torch.log_softmax(logits, dim=-1)
    scaled = logits / params.temperature
    if params.top_k > 0 and params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k).values[..., -1, None]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already cover top_p (the top token is always kept)
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return torch.log_softmax(scaled, dim=-1)


def pick(logprobs: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The next token of one row: the argmax when greedy, else a draw from the row's own ``generator``."""
    torch = require("torch", backend="local", extra="local")
    if params.greedy:
        return int(torch.argmax(logprobs))
    return int(torch.multinomial(logprobs.exp(), 1, generator=generator))
