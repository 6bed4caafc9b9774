"""langchain-metaclaw: LangChain / LangGraph agents that learn from their own conversations.

Importing this package is cheap: every public name is resolved on first use (the pattern of
``langchain_core.tracers``), so ``import langchain_metaclaw`` never imports torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from langchain_metaclaw.adapters import AdapterRegistry
    from langchain_metaclaw.capture import (
        CaptureStats,
        MetaClawCallbackHandler,
        disable_global_capture,
        enable_global_capture,
    )
    from langchain_metaclaw.chat_model import MetaClawChatModel
    from langchain_metaclaw.config import MetaClawSettings
    from langchain_metaclaw.store import TraceStore

__version__ = "0.1.0"

_dynamic_imports = {
    "AdapterRegistry": "adapters",
    "MetaClawChatModel": "chat_model",
    "CaptureStats": "capture",
    "MetaClawCallbackHandler": "capture",
    "enable_global_capture": "capture",
    "disable_global_capture": "capture",
    "MetaClawSettings": "config",
    "TraceStore": "store",
}

__all__ = [
    "AdapterRegistry",
    "CaptureStats",
    "MetaClawCallbackHandler",
    "MetaClawChatModel",
    "MetaClawSettings",
    "TraceStore",
    "disable_global_capture",
    "enable_global_capture",
]


def __getattr__(name: str) -> Any:
    module = _dynamic_imports.get(name)
    if module is None:
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return list(__all__)
