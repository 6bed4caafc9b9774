"""MetaClawChatModel and its serving backends (heavy imports stay lazy)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from langchain_metaclaw._compat import lazy_exports

if TYPE_CHECKING:
    from langchain_metaclaw.chat_model.base import MetaClawChatModel

_dynamic_imports = {"MetaClawChatModel": "base"}

__all__ = ["MetaClawChatModel"]


__getattr__, __dir__ = lazy_exports(__name__, _dynamic_imports)
