"""The local inference engine: a base model plus LoRA adapters pinned per request, and its generation machinery.

- :mod:`~langchain_metaclaw.engine.local`: :class:`LocalEngine` (the model, adapters loaded through the one
  validator, per-request pinning) and :func:`shared_engine` (one engine per base model and process);
- :mod:`~langchain_metaclaw.engine.sampling`: :class:`SamplingParams` (one validated type for every entry
  point) and the behaviour distribution tokens are drawn from;
- :mod:`~langchain_metaclaw.engine.grammar`: xgrammar JSON-schema matchers and masks;
- :mod:`~langchain_metaclaw.engine.decoding`: rows, the per-token rules and the one decode loop;
- :mod:`~langchain_metaclaw.engine.generation`: :class:`GenerationEngine`, the entry points (``generate``,
  ``stream``, ``sample_group``, ``generate_batch``, ``logprobs_of``) over a model a subclass serves.

torch and xgrammar are imported when first used, so importing this package costs nothing.
"""

from typing import TYPE_CHECKING

from langchain_metaclaw._compat import lazy_exports
from langchain_metaclaw.engine.generation import GenerationEngine
from langchain_metaclaw.engine.sampling import SamplingArgs, SamplingParams

if TYPE_CHECKING:
    from langchain_metaclaw.engine.local import BASE_ADAPTER, GenerationResult, LocalEngine, shared_engine

_dynamic_imports = {
    "BASE_ADAPTER": "local",
    "GenerationResult": "local",
    "LocalEngine": "local",
    "shared_engine": "local",
}

__all__ = [
    "BASE_ADAPTER",
    "GenerationEngine",
    "GenerationResult",
    "LocalEngine",
    "SamplingArgs",
    "SamplingParams",
    "shared_engine",
]

__getattr__, __dir__ = lazy_exports(__name__, _dynamic_imports)
