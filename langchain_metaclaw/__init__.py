"""langchain-metaclaw: LangChain / LangGraph agents that learn from their own conversations.

Importing this package is cheap: every public name is resolved on first use (the pattern of
``langchain_core.tracers``), so ``import langchain_metaclaw`` never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from langchain_metaclaw._compat import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _dynamic_imports)
