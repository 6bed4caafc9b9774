"""Checkpoint files of the local backend: safetensors + JSON only, never pickle, published atomically.

``save_weights_for_sampler`` writes a peft adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``); ``save_state`` writes the same plus ``optimizer.safetensors`` (AdamW state
tensors, flattened) and ``trainer_state.json`` (the optimizer state's structure, the step, the LoRA config).
Both are written to a temporary sibling directory and renamed into place, so a run killed mid-save leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_metaclaw.adapters.validate import CONFIG_FILE, WEIGHTS_FILE
from langchain_metaclaw.errors import AdapterError, ConfigurationError, TrainingError

if TYPE_CHECKING:
    import torch

__all__ = [
    "META_FILE",
    "STATE_FORMAT",
    "atomic_dir",
    "check_name",
    "load_adapter_weights",
    "quiet_transformers",
    "read_optimizer_state",
    "read_state",
    "save_adapter",
    "write_state",
]

STATE_FORMAT = 1
_STATE_FILE = "trainer_state.json"
_OPTIMIZER_FILE = "optimizer.safetensors"
META_FILE = "metaclaw_adapter.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        msg = f"Checkpoint name {name!r} must match {_NAME_RE.pattern} (it becomes a directory name)"
        raise ConfigurationError(msg)


def _fsync_dir_files(path: Path) -> None:
    for file in path.iterdir():
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``dest``; on success, publish it at ``dest`` with a rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_dir_files(tmp)
        old = None
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(dest, old)
        os.rename(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- optimizer state <-> (safetensors, JSON) -------------------------------------------------------------


def _flatten_state(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested state dict by ``{"__tensor__": key}``; JSON-encode the rest."""
    import torch

    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, Mapping):
        return {"__dict__": [[k, _flatten_state(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    msg = f"Cannot store optimizer state value of type {type(obj).__name__} at {prefix!r} as JSON"
    raise TrainingError(msg)


def _unflatten_state(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _unflatten_state(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_unflatten_state(v, tensors) for v in obj["__tuple__"])
        msg = f"Unrecognised optimizer state node {sorted(obj)}"
        raise AdapterError(msg)
    if isinstance(obj, list):
        return [_unflatten_state(v, tensors) for v in obj]
    return obj


def write_state(directory: Path, optimizer: Any, meta: Mapping[str, Any]) -> None:
    """Write the optimizer state (tensors to safetensors, structure to JSON) and ``meta`` into ``directory``."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten_state(optimizer.state_dict(), "optimizer", tensors)
    save_file(tensors, str(directory / _OPTIMIZER_FILE), metadata={"format": str(STATE_FORMAT)})
    state = {"format": STATE_FORMAT, **meta, "optimizer": structure, "saved_at": time.time()}
    (directory / _STATE_FILE).write_text(json.dumps(state, indent=1))


def read_state(root: Path, lora: Mapping[str, Any], param_names: list[str]) -> dict[str, Any]:
    """The ``trainer_state.json`` at ``root``, checked against this backend's LoRA config and parameters.

    Raises:
        AdapterError: not a state written by ``save_state``, another format, LoRA config or parameters.
    """
    try:
        state = json.loads((root / _STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        msg = f"{root} is not a training state written by save_state ({_STATE_FILE}: {exc})"
        raise AdapterError(msg) from exc
    if state.get("format") != STATE_FORMAT:
        msg = f"Training state format {state.get('format')!r} is not supported (expected {STATE_FORMAT})"
        raise AdapterError(msg)
    if state.get("lora") != lora:
        msg = f"Training state at {root} has LoRA config {state.get('lora')}, this backend {lora}"
        raise AdapterError(msg)
    if state.get("param_names") != param_names:
        msg = f"Training state at {root} was saved for different trainable parameters"
        raise AdapterError(msg)
    return state


def read_optimizer_state(root: Path, state: Mapping[str, Any]) -> Any:
    """The optimizer ``state_dict`` saved next to ``state`` (tensors on the CPU)."""
    from safetensors.torch import load_file

    return _unflatten_state(state["optimizer"], load_file(str(root / _OPTIMIZER_FILE)))


def save_adapter(model: Any, directory: Path, meta: Mapping[str, Any]) -> None:
    """Write ``model``'s ``default`` LoRA adapter as a peft safetensors directory, with ``meta`` beside it."""
    with quiet_transformers():
        model.save_pretrained(
            str(directory),
            safe_serialization=True,
            selected_adapters=["default"],
            save_embedding_layers=False,
        )
    readme = directory / "README.md"
    if readme.exists():  # peft's model card template; not needed to load the adapter
        readme.unlink()
    (directory / META_FILE).write_text(json.dumps(dict(meta), indent=1))
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / required).is_file():
            msg = f"peft did not write {required} into {directory}"
            raise TrainingError(msg)


def load_adapter_weights(model: Any, root: Path, device: Any) -> None:
    """Load the adapter weights saved at ``root`` into ``model``'s ``default`` adapter, keys checked first.

    Raises:
        AdapterError: the saved keys are not exactly the model's adapter keys.
    """
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(root / WEIGHTS_FILE), device=str(device))
    expected = set(get_peft_model_state_dict(model, save_embedding_layers=False))
    if set(weights) != expected:
        msg = (
            f"Adapter weights at {root} do not match the model: missing {sorted(expected - set(weights))[:3]}, "
            f"unexpected {sorted(set(weights) - expected)[:3]}"
        )
        raise AdapterError(msg)
    result = set_peft_model_state_dict(model, weights, adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        msg = f"Adapter weights at {root} have unexpected keys {result.unexpected_keys[:3]}"
        raise AdapterError(msg)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' deprecation notice that peft 0.21 triggers (``is_gradient_checkpointing``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
