"""The public surface, and that importing it stays light (no torch, transformers or peft)."""

import importlib
import subprocess
import sys

import pytest

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


LAZY_PACKAGES = [
    "langchain_metaclaw",
    "langchain_metaclaw.chat_model",
    "langchain_metaclaw.schedule",
    "langchain_metaclaw.scoring",
    "langchain_metaclaw.training",
]


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_lazy_exports_resolve_to_their_modules_and_are_cached(package: str) -> None:
    module = importlib.import_module(package)
    lazy = module._dynamic_imports
    assert set(lazy) <= set(module.__all__)
    assert dir(module) == sorted(module.__all__)
    for name, submodule in lazy.items():
        value = getattr(module, name)
        assert value is getattr(importlib.import_module(f"{package}.{submodule}"), name)
        assert vars(module)[name] is value  # cached: the next read is a plain attribute read


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_unknown_names_are_attribute_errors(package: str) -> None:
    module = importlib.import_module(package)
    with pytest.raises(AttributeError, match=f"module {package!r} has no attribute 'no_such_name'"):
        module.no_such_name  # noqa: B018
    assert not hasattr(module, "no_such_name")
