"""Training: the records a backend takes, the ``TrainingBackend`` protocol, and its backends.

Importing this package is cheap (no torch, no tinker): backends and losses load on first use.

>>> from langchain_metaclaw.training import AdamParams, datum_from_tokens, get_backend
>>> backend = get_backend("local")
>>> datum = datum_from_tokens(prompt_ids, completion_ids, sampler_logprobs, advantage=0.7)
>>> out = backend.forward_backward([datum], "importance_sampling")
>>> backend.optim_step(AdamParams(learning_rate=2e-4))
>>> saved = backend.save_weights_for_sampler("v3")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from langchain_metaclaw._compat import lazy_exports
from langchain_metaclaw.training.sampler import SampledCompletion, Sampler
from langchain_metaclaw.training.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    LossFnName,
    Metrics,
    OptimStepResult,
    SavedWeights,
    TokenSeq,
    datum_from_tokens,
)

if TYPE_CHECKING:
    from langchain_metaclaw.training.backends import (
        LocalTrainingBackend,
        TinkerTrainingBackend,
        TrainingBackend,
        available_backends,
        get_backend,
        register_backend,
    )

_dynamic_imports = {
    "TrainingBackend": "backends",
    "LocalTrainingBackend": "backends",
    "TinkerTrainingBackend": "backends",
    "available_backends": "backends",
    "get_backend": "backends",
    "register_backend": "backends",
}

__all__ = [
    "AdamParams",
    "Datum",
    "ForwardBackwardOutput",
    "LocalTrainingBackend",
    "LossFnName",
    "Metrics",
    "OptimStepResult",
    "SampledCompletion",
    "Sampler",
    "SavedWeights",
    "TinkerTrainingBackend",
    "TokenSeq",
    "TrainingBackend",
    "available_backends",
    "datum_from_tokens",
    "get_backend",
    "register_backend",
]


__getattr__, __dir__ = lazy_exports(__name__, _dynamic_imports)
