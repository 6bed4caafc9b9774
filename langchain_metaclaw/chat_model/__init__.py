"""MetaClawChatModel and its serving backends (heavy imports stay lazy)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from langchain_metaclaw.chat_model.base import MetaClawChatModel

__all__ = ["MetaClawChatModel"]


def __getattr__(name: str) -> Any:
    if name == "MetaClawChatModel":
        from langchain_metaclaw.chat_model.base import MetaClawChatModel

        return MetaClawChatModel
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
