"""The local inference engine's generation machinery: sampling parameters, grammars, the decode loop.

- :mod:`~langchain_metaclaw.engine.sampling`: :class:`SamplingParams` (one validated type for every entry
  point) and the behaviour distribution tokens are drawn from;
- :mod:`~langchain_metaclaw.engine.grammar`: xgrammar JSON-schema matchers and masks;
- :mod:`~langchain_metaclaw.engine.decoding`: rows, the per-token rules and the one decode loop;
- :mod:`~langchain_metaclaw.engine.generation`: :class:`GenerationEngine`, the entry points (``generate``,
  ``stream``, ``sample_group``, ``generate_batch``, ``logprobs_of``) over a model a subclass serves.

torch and xgrammar are imported when first used, so importing this package costs nothing.
"""

from langchain_metaclaw.engine.generation import GenerationEngine
from langchain_metaclaw.engine.sampling import SamplingArgs, SamplingParams

__all__ = ["GenerationEngine", "SamplingArgs", "SamplingParams"]
