"""Cheap, cached checks for optional dependencies (the ``peft.import_utils`` pattern).

Heavy packages (torch, transformers, peft, tinker) are imported only inside the code that needs them, so
``import langchain_metaclaw`` stays light. :func:`require` turns a missing module into a
:class:`~langchain_metaclaw.errors.BackendUnavailableError` that names the extra to install.
"""

from __future__ import annotations

import importlib
import importlib.util
from functools import lru_cache
from types import ModuleType

from langchain_metaclaw.errors import BackendUnavailableError


@lru_cache
def is_available(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    return importlib.util.find_spec(module) is not None


def is_torch_available() -> bool:
    return is_available("torch")


def is_peft_available() -> bool:
    return is_available("peft") and is_available("transformers") and is_torch_available()


def is_tinker_available() -> bool:
    return is_available("tinker")


def is_mint_available() -> bool:
    return is_available("mint")


def is_apscheduler_available() -> bool:
    return is_available("apscheduler")


def require(module: str, *, backend: str, extra: str) -> ModuleType:
    """Import ``module`` or raise :class:`BackendUnavailableError` naming ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailableError(backend, extra, missing=module) from exc
