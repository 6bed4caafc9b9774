"""Capture: a LangChain callback handler that records agent turns into the trace store."""

from langchain_metaclaw.capture.handler import (
    MetaClawCallbackHandler,
    disable_global_capture,
    enable_global_capture,
)
from langchain_metaclaw.capture.writer import CaptureStats

__all__ = ["CaptureStats", "MetaClawCallbackHandler", "disable_global_capture", "enable_global_capture"]
