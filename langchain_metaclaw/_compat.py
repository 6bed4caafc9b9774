"""Cheap, cached checks for optional dependencies (the ``peft.import_utils`` pattern), and lazy exports.

Heavy packages (torch, transformers, peft, tinker) are imported only inside the code that needs them, so
``import langchain_metaclaw`` stays light. :func:`require` turns a missing module into a
:class:`~langchain_metaclaw.errors.BackendUnavailableError` that names the extra to install;
:func:`lazy_exports` lets a package export names whose modules load on first use.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from functools import lru_cache
from types import ModuleType
from typing import Any

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


def lazy_exports(
    package: str, dynamic_imports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The PEP 562 ``__getattr__`` and ``__dir__`` of a package whose exports load on first use.

    ``dynamic_imports`` maps each lazy name to the submodule of ``package`` that defines it. The first
    access imports that submodule and caches the value in the package's namespace, so later reads are
    plain attribute reads; ``dir()`` lists the package's ``__all__``. This is langchain-core's
    ``_dynamic_imports`` + ``_import_utils.import_attr`` pattern, written once instead of in every package::

        _dynamic_imports = {"TraceStore": "store"}
        __getattr__, __dir__ = lazy_exports(__name__, _dynamic_imports)
    """

    def __getattr__(name: str) -> Any:
        module = dynamic_imports.get(name)
        if module is None:
            msg = f"module {package!r} has no attribute {name!r}"
            raise AttributeError(msg)
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return list(getattr(sys.modules[package], "__all__", dynamic_imports))

    return __getattr__, __dir__


def accepts_keyword(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` can be called with keyword ``name`` (it names it, or takes ``**kwargs``).

    User callables (reward rules, scoring functions, trainers) get optional arguments only when they take
    them; a callable whose signature cannot be read (some builtins) is called without.
    """
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
