"""Glue to the tinker SDK (and MinT, its drop-in): the one place that imports it and unwraps its futures.

Both the training backend (``training/backends/tinker.py``) and the serving backend
(``chat_model/backends/tinker.py``) build their clients here, so neither imports the other.

MinT (``mindlab-toolkit``) re-exports tinker's names as the same objects and maps ``MINT_API_KEY`` /
``MINT_BASE_URL`` onto ``TINKER_*`` in its ``sync_env()``. That function is the only place environment
variables are handled: :func:`import_sdk` calls it again before a MinT client is built (so variables set
after ``import mint`` count), and explicit ``api_key=`` / ``base_url=`` arguments go to ``ServiceClient`` and
win over the environment. ``sync_env`` changes ``os.environ`` for the whole process (that is how MinT works).

The code targets the tinker 0.22 surface (the version MinT pins) and runs on 0.38: client factories return
futures on 0.38 and clients on 0.22, request methods return futures on both, so every result goes through
:func:`resolve`.
"""

from __future__ import annotations

import inspect
from types import ModuleType
from typing import Any, Literal

from langchain_metaclaw._compat import require
from langchain_metaclaw.errors import ConfigurationError

__all__ = [
    "SdkName",
    "import_sdk",
    "make_service_client",
    "resolve",
    "save_weights_and_get_sampling_client",
]

SdkName = Literal["tinker", "mint"]


def resolve(value: Any) -> Any:
    """Unwrap an SDK future (0.38 client factories, every request) or pass a plain value through (0.22)."""
    return value.result() if hasattr(value, "result") else value


def import_sdk(sdk: SdkName) -> ModuleType:
    """Import ``tinker`` or ``mint`` (raising ``BackendUnavailableError`` naming the extra if missing).

    For ``mint``, re-run MinT's own ``sync_env()`` (``MINT_API_KEY`` -> ``TINKER_API_KEY``, ``MINT_BASE_URL``
    -> ``TINKER_BASE_URL``, default base URL MinT's) so variables set after the first import count too.
    """
    if sdk not in ("tinker", "mint"):
        msg = f"sdk must be 'tinker' or 'mint', got {sdk!r}"
        raise ConfigurationError(msg)
    module = require(sdk, backend=sdk, extra=sdk)
    if sdk == "mint":
        sync_env = getattr(getattr(module, "mint", None), "sync_env", None)
        if callable(sync_env):
            sync_env()
    return module


def make_service_client(module: ModuleType, *, api_key: str | None = None, base_url: str | None = None) -> Any:
    """A ``ServiceClient``; ``api_key`` / ``base_url`` win over the environment when given."""
    kwargs = {k: v for k, v in {"api_key": api_key, "base_url": base_url}.items() if v}
    return module.ServiceClient(**kwargs)


def save_weights_and_get_sampling_client(training_client: Any, name: str) -> Any:
    """A ``SamplingClient`` on the training client's current weights (tinker-cookbook's per-step hand-off).

    tinker 0.22 requires ``name``; 0.38 deprecated it (a warning, no effect), so it is passed only where the
    SDK's signature has no default for it.
    """
    method = training_client.save_weights_and_get_sampling_client
    try:
        param = inspect.signature(method).parameters.get("name")
    except (TypeError, ValueError):  # pragma: no cover - a C-implemented or odd callable
        param = None
    needs_name = param is not None and param.default is inspect.Parameter.empty
    return resolve(method(name) if needs_name else method())

