"""The public surface, and that importing it stays light (no torch, transformers or peft)."""

import subprocess
import sys

import langchain_metaclaw

EXPECTED_ALL = [
    "AdapterRegistry",
    "CaptureStats",
    "MetaClawCallbackHandler",
    "MetaClawChatModel",
    "MetaClawSettings",
    "TraceStore",
    "disable_global_capture",
    "enable_global_capture",
]


def test_all():
    assert sorted(langchain_metaclaw.__all__) == sorted(EXPECTED_ALL)
    for name in EXPECTED_ALL:
        assert getattr(langchain_metaclaw, name) is not None


def test_import_does_not_load_heavy_packages():
    code = (
        "import sys, langchain_metaclaw\n"
        "from langchain_metaclaw import MetaClawCallbackHandler, TraceStore, MetaClawChatModel, AdapterRegistry\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'tinker') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
