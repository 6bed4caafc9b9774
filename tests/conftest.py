"""Test-session wiring: isolated state per test, shared heavy fixtures loaded once per session."""

from __future__ import annotations

import logging
import os

import pytest

# Offline always: code that would reach a hub must fail loudly here, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LANGSMITH_TRACING", "false")

# Tests point LangSmith's tracer at a closed port on purpose; its retry warnings are noise.
logging.getLogger("langsmith").setLevel(logging.CRITICAL)

pytest_plugins = ["tests.fixtures.postgres", "tests.fixtures.model"]


@pytest.fixture(autouse=True)
def metaclaw_home(tmp_path, monkeypatch):
    """Point all mutable state at a per-test directory (the model cache stays shared)."""
    home = tmp_path / "metaclaw-home"
    monkeypatch.setenv("METACLAW_HOME", str(home))
    return home
