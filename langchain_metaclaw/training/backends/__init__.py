"""Training backends, chosen by name (the ``renderers.get_renderer`` / ``register_renderer`` pattern).

>>> backend = get_backend("local", token_budget=2048)                  # peft + transformers
>>> backend = get_backend("tinker", base_model="Qwen/Qwen3-4B-Instruct-2507")
>>> backend = get_backend("mint", base_model="Qwen/Qwen3-4B-Instruct-2507")   # MinT, same code path

Factories import their heavy dependencies only when called, so importing this module loads neither torch
nor tinker.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from langchain_metaclaw.errors import ConfigurationError
from langchain_metaclaw.training.backends.base import LOSS_FNS, LogprobModel, TrainingBackend

if TYPE_CHECKING:
    from langchain_metaclaw.training.backends.local import LocalTrainingBackend
    from langchain_metaclaw.training.backends.tinker import TinkerTrainingBackend

__all__ = [
    "LOSS_FNS",
    "LocalTrainingBackend",
    "LogprobModel",
    "TinkerTrainingBackend",
    "TrainingBackend",
    "available_backends",
    "get_backend",
    "register_backend",
]

BackendFactory = Callable[..., TrainingBackend]


def _local(**kwargs: Any) -> TrainingBackend:
    from langchain_metaclaw.training.backends.local import LocalTrainingBackend

    return LocalTrainingBackend(**kwargs)


def _tinker(**kwargs: Any) -> TrainingBackend:
    from langchain_metaclaw.training.backends.tinker import TinkerTrainingBackend

    return TinkerTrainingBackend(**kwargs, sdk="tinker")


def _mint(**kwargs: Any) -> TrainingBackend:
    from langchain_metaclaw.training.backends.tinker import TinkerTrainingBackend

    return TinkerTrainingBackend(**kwargs, sdk="mint")


_REGISTRY: dict[str, BackendFactory] = {"local": _local, "tinker": _tinker, "mint": _mint}
_LOCK = threading.Lock()


def register_backend(name: str, factory: BackendFactory, *, overwrite: bool = False) -> None:
    """Make ``get_backend(name, **kw)`` call ``factory(**kw)``.

    Raises:
        ConfigurationError: ``name`` is taken and ``overwrite`` is false.
    """
    with _LOCK:
        if name in _REGISTRY and not overwrite:
            msg = f"A training backend named {name!r} already exists; pass overwrite=True to replace it"
            raise ConfigurationError(msg)
        _REGISTRY[name] = factory


def available_backends() -> list[str]:
    """Registered backend names (registered, not necessarily installed)."""
    with _LOCK:
        return sorted(_REGISTRY)


def get_backend(name: str, **kwargs: Any) -> TrainingBackend:
    """Build the backend registered as ``name`` with ``kwargs``.

    Raises:
        ConfigurationError: no backend has that name.
        BackendUnavailableError: its optional dependencies are not installed (names the extra).
    """
    with _LOCK:
        factory = _REGISTRY.get(name)
    if factory is None:
        msg = f"Unknown training backend {name!r}; registered: {available_backends()}"
        raise ConfigurationError(msg)
    return factory(**kwargs)


def __getattr__(name: str) -> Any:
    if name == "LocalTrainingBackend":
        from langchain_metaclaw.training.backends.local import LocalTrainingBackend

        return LocalTrainingBackend
    if name == "TinkerTrainingBackend":
        from langchain_metaclaw.training.backends.tinker import TinkerTrainingBackend

        return TinkerTrainingBackend
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
