"""JSON-schema constrained decoding with xgrammar: one compiler per tokenizer, one matcher per row.

A schema is compiled once per engine (~10 ms, under a lock); each request row gets its own
``GrammarMatcher``, which says after every accepted token which next tokens keep the output valid. The
decode loop fills a bitmask from the matcher and sets every other logit to ``-inf`` *before* the behaviour
log-probabilities are taken, so the recorded logprobs are of the masked distribution (``sampling["constrained"]``).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from langchain_metaclaw._compat import require
from langchain_metaclaw.errors import ConfigurationError

if TYPE_CHECKING:
    import torch

__all__ = ["JsonGrammar"]


def _xgrammar() -> Any:
    return require("xgrammar", backend="local (json_schema)", extra="local")


class JsonGrammar:
    """Compiles JSON schemas for one tokenizer and hands out matchers and masks for them.

    Args:
        tokenizer: the HuggingFace tokenizer the model decodes with.
        vocab_size (`int`): the model's vocabulary size (logit rows are this wide, often more than the tokenizer's).
        stop_token_ids: the token ids that end a completion (the grammar allows them once the JSON is complete).
        tokenizer_lock (`threading.Lock`): the lock every use of ``tokenizer`` takes (a fast tokenizer's Rust
            object raises "Already borrowed" when two threads use it at once).
    """

    def __init__(
        self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int], tokenizer_lock: threading.Lock
    ) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = sorted(stop_token_ids)
        self._tokenizer_lock = tokenizer_lock
        self._lock = threading.Lock()
        self._compiler: Any = None
        self._compiled: dict[str, Any] = {}

    def matcher(self, json_schema: dict[str, Any]) -> Any:
        """A fresh matcher for ``json_schema`` (compiled on first use).

        Raises:
            ConfigurationError: xgrammar cannot compile the schema.
        """
        xgr = _xgrammar()
        # not sort_keys: xgrammar emits properties in the schema's order ("name" before "arguments", a joke's
        # "setup" before its "punchline"), and a 135M model fills them far better in that order
        key = json.dumps(json_schema)
        with self._lock:
            if self._compiler is None:
                with self._tokenizer_lock:
                    info = xgr.TokenizerInfo.from_huggingface(
                        self._tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._stop_token_ids
                    )
                self._compiler = xgr.GrammarCompiler(info, max_threads=2)
            compiled = self._compiled.get(key)
            if compiled is None:
                try:
                    compiled = self._compiler.compile_json_schema(key, any_whitespace=False)
                except Exception as exc:
                    msg = f"json_schema could not be compiled into a grammar: {exc}"
                    raise ConfigurationError(msg) from exc
                self._compiled[key] = compiled
        return xgr.GrammarMatcher(compiled)

    def allocate_bitmask(self) -> Any:
        """A one-row token bitmask, reused for every masked row of a decode."""
        return _xgrammar().allocate_token_bitmask(1, self._vocab_size)

    def apply_mask(self, matcher: Any, bitmask: Any, logits: torch.Tensor) -> None:
        """Set the logits (shape ``[1, vocab]``, in place) of every token ``matcher`` does not allow to ``-inf``."""
        matcher.fill_next_token_bitmask(bitmask)
        _xgrammar().apply_token_bitmask_inplace(logits, bitmask, vocab_size=self._vocab_size)
