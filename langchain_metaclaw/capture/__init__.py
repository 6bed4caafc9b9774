"""Capture: LangChain callback handlers that record agent turns (into the trace store, or a list for tests)."""

from langchain_metaclaw.capture.collector import TurnCollector
from langchain_metaclaw.capture.handler import (
    MetaClawCallbackHandler,
    disable_global_capture,
    enable_global_capture,
)
from langchain_metaclaw.capture.writer import CaptureStats

__all__ = ["CaptureStats", "MetaClawCallbackHandler", "TurnCollector", "disable_global_capture",
           "enable_global_capture"]
