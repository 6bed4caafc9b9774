"""The one adapter validator: every path that can make a LoRA version serve runs these checks.

Three layers, cheapest first, each refusing with a message that says what is wrong and what to do
(the order of peft's hotswap "dry run": every check before any change):

1. **Files** (:func:`validate_adapter_dir`): a directory holding ``adapter_model.safetensors`` and a readable
   ``adapter_config.json``. Pickled weights (:data:`REFUSED_PICKLE_SUFFIXES`, the one list, shared with the
   Tinker checkpoint extractor) are never loaded: unpickling can run code.
2. **LoRA config** (:func:`read_lora_config`): a peft ``LoraConfig`` that per-request adapter pinning can serve
   (no DoRA, no ``modules_to_save``, no bias training...), trained on the base model that will serve it.
3. **Dry run** (:func:`dry_run`): the tensor keys and shapes the config implies on the base model, compared
   with the file's tensors (rank, hidden size, target modules), plus finite float values.

The serving engine passes its loaded model (:meth:`BaseStructure.of_model`); the registry, which has no
model loaded (the CLI), builds the base's module tree on torch's ``meta`` device from its ``config.json``
(:func:`base_structure`, ~50 ms, no weights read; the embedded model's config is in its safetensors cache,
offline). Remote ``tinker://`` / ``mint://`` URIs (:func:`is_remote`) have no local files: the service that
trained them checks them, so they skip these checks.

Importing this module does not import torch; the checks import it (and peft, safetensors) when they run.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from langchain_metaclaw._compat import require
from langchain_metaclaw.errors import AdapterError, ConfigurationError

__all__ = [
    "REFUSED_PICKLE_SUFFIXES",
    "REMOTE_SCHEMES",
    "BaseStructure",
    "CheckBaseModel",
    "base_structure",
    "dry_run",
    "is_pickle_file",
    "is_remote",
    "read_lora_config",
    "validate_adapter",
    "validate_adapter_dir",
]

REMOTE_SCHEMES = ("tinker://", "mint://")
"""Adapter URIs held by a training service, not on this disk (the service validates them)."""

REFUSED_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
"""Weight files in pickle format: never loaded, in an adapter directory or a downloaded checkpoint archive."""

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"

CheckBaseModel = Literal["error", "warn", "ignore"]

_UNSUPPORTED = {
    "use_dora": lambda c: bool(getattr(c, "use_dora", False)),
    "modules_to_save": lambda c: bool(getattr(c, "modules_to_save", None)),
    "bias": lambda c: getattr(c, "bias", "none") != "none",
    "layer_replication": lambda c: bool(getattr(c, "layer_replication", None)),
    "trainable_token_indices": lambda c: bool(getattr(c, "trainable_token_indices", None)),
    "alora_invocation_tokens": lambda c: bool(getattr(c, "alora_invocation_tokens", None)),
    "target_parameters": lambda c: bool(getattr(c, "target_parameters", None)),
}
"""LoRA options that change shared weights or that peft's mixed-batch forward (per-request pinning) cannot serve."""


def is_remote(uri: str | Path) -> bool:
    """Whether ``uri`` names weights held by a training service (``tinker://``, ``mint://``)."""
    return str(uri).startswith(REMOTE_SCHEMES)


def is_pickle_file(name: str) -> bool:
    """Whether a file name is a pickle-format weight file (refused everywhere)."""
    return name.lower().endswith(REFUSED_PICKLE_SUFFIXES)


def _subject(path: Path, name: str | None) -> str:
    return f"Adapter {name!r} at {path}" if name else f"Adapter at {path}"


# ------------------------------------------------------------------------------------------------ files


def validate_adapter_dir(path: str | Path, *, name: str | None = None) -> dict[str, Any]:
    """File-level checks of a peft LoRA directory; returns its ``adapter_config.json`` as a dict.

    Refuses a missing directory, pickled weights without safetensors, an unreadable config, a non-LoRA
    ``peft_type`` and a safetensors file that does not parse or holds no tensor. Reads only the file header.
    """
    safe_open = require("safetensors", backend="local", extra="local").safe_open
    path = Path(path)
    subject = _subject(path, name)
    if not path.is_dir():
        msg = f"{subject}: the directory does not exist (expected a peft adapter saved with save_pretrained)."
        raise AdapterError(msg)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        pickles = sorted(p.name for p in path.iterdir() if is_pickle_file(p.name))
        found = f" (found pickled weights: {', '.join(pickles)})" if pickles else ""
        msg = (f"{subject} has no {WEIGHTS_FILE}{found}; only safetensors adapters are loaded (pickled .bin/.pt "
               "weights can run code when unpickled). Re-save it with save_pretrained(safe_serialization=True).")
        raise AdapterError(msg)
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        msg = f"{subject} has no readable {CONFIG_FILE}: {exc}"
        raise AdapterError(msg) from exc
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else config
        msg = f"{subject} is {kind!r}; only LoRA adapters can be served. Train a LoRA adapter (peft LoraConfig)."
        raise AdapterError(msg)
    try:
        with safe_open(str(weights), framework="pt") as f:
            empty = not list(f.keys())
    except Exception as exc:  # SafetensorsError, OSError, ...
        msg = (f"{subject}: adapter weights at {weights} are corrupt: not a valid safetensors file "
               f"({type(exc).__name__}: {exc}). Save the adapter again.")
        raise AdapterError(msg) from exc
    if empty:
        msg = f"{subject}: {weights} has no tensors."
        raise AdapterError(msg)
    return config


# ------------------------------------------------------------------------------------------------ LoRA config


def _normalise_model_name(name: str | None) -> str | None:
    """``"HuggingFaceTB/SmolLM2-135M-Instruct"`` and ``"/x/SmolLM2-135M-Instruct"`` -> ``"smollm2-135m-instruct"``."""
    if not name:
        return None
    tail = str(name).rstrip("/\\").replace("\\", "/").split("/")[-1]
    tail = re.sub(r"(\.[Qq]\d\w*)?\.gguf$", "", tail)
    return tail.lower()


def read_lora_config(
    path: str | Path, base_model: str, *, name: str | None = None, check_base_model: CheckBaseModel = "error"
) -> Any:
    """The adapter's peft ``LoraConfig``, refused when pinning cannot serve it or it was trained on another base.

    ``check_base_model``: what to do when the config records another ``base_model_name_or_path`` than
    ``base_model`` (compared by its last path component, case-insensitively): refuse, warn, or ignore.
    """
    peft = require("peft", backend="local", extra="local")
    path = Path(path)
    subject = _subject(path, name)
    try:
        config = peft.LoraConfig.from_pretrained(str(path))
    except Exception as exc:
        msg = f"{subject}: invalid LoRA config in {path / CONFIG_FILE}: {exc}"
        raise AdapterError(msg) from exc
    bad = sorted(key for key, used in _UNSUPPORTED.items() if used(config))
    if bad:
        msg = (f"{subject} uses {', '.join(bad)}, which per-request adapter pinning cannot serve (they change "
               "shared weights or are not supported by peft's mixed-batch forward); train a plain LoRA adapter.")
        raise AdapterError(msg)
    trained_on = _normalise_model_name(config.base_model_name_or_path)
    if trained_on is not None and trained_on != _normalise_model_name(base_model) and check_base_model != "ignore":
        msg = (f"{subject} was trained on base model {config.base_model_name_or_path!r}, but this engine "
               f"serves {base_model!r}.")
        if check_base_model == "error":
            raise AdapterError(msg + " Pass check_base_model='warn' if they are the same model.")
        warnings.warn(msg, stacklevel=3)
    return config


# ------------------------------------------------------------------------------------------------ dry run


@dataclass(frozen=True)
class BaseStructure:
    """What the dry run needs of a base model: its modules (for their shapes) and those LoRA may target."""

    name: str
    """The base model's name, as the engine and the registry report it."""
    modules: Mapping[str, Any]
    """Module name -> module (only ``in_features`` / ``out_features`` of the targeted ones are read)."""
    lora_targets: frozenset[str]
    """Module names an adapter may target (the linear projections the serving engine wraps)."""

    @classmethod
    def of_model(cls, model: Any, name: str, lora_targets: set[str] | frozenset[str] | None = None) -> BaseStructure:
        """The structure of a loaded (or meta) model; ``lora_targets`` defaults to peft's ``all-linear`` set:
        every ``torch.nn.Linear`` but the output embedding."""
        modules = dict(model.named_modules())
        if lora_targets is None:
            torch = require("torch", backend="local", extra="local")
            output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            lora_targets = {key for key, module in modules.items()
                            if isinstance(module, torch.nn.Linear) and module is not output}
        return cls(name=name, modules=modules, lora_targets=frozenset(lora_targets))


@functools.lru_cache(maxsize=4)
def base_structure(base_model: str | None = None) -> BaseStructure:
    """The module tree of ``base_model`` built on the ``meta`` device from its config (no weights read).

    ``None`` (or the embedded model's name) reads the embedded model's config from its safetensors cache,
    offline; when that cache does not exist yet it is built once, as the first serving model would. Another
    base is read with transformers' ``AutoConfig`` (a local directory, or the Hub cache).
    """
    torch = require("torch", backend="local", extra="local")
    transformers = require("transformers", backend="local", extra="local")
    from langchain_metaclaw.models.embedded import EMBEDDED_MODEL_ID, embedded_cache_path, load_base_model

    name = base_model or EMBEDDED_MODEL_ID
    try:
        if name == EMBEDDED_MODEL_ID:
            cached = embedded_cache_path()
            if (cached / "config.json").is_file():
                config = transformers.AutoConfig.from_pretrained(str(cached))
            else:
                config = load_base_model(None)[0].config  # builds the cache, once per machine
        else:
            config = transformers.AutoConfig.from_pretrained(name)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
    except Exception as exc:
        msg = (f"Cannot read the structure of base model {name!r} to check adapters against it "
               f"({type(exc).__name__}: {exc}). Make its config.json available (a local directory or the "
               "Hugging Face cache), or register the adapter with the base_model it serves on.")
        raise ConfigurationError(msg) from exc  # the environment's problem, not the adapter's
    return BaseStructure.of_model(model, name)


def _expected_tensors(config: Any, base: BaseStructure, subject: str) -> dict[str, tuple[int, ...]]:
    """Tensor key -> shape that ``config`` implies on ``base`` (peft's key naming)."""
    get_pattern_key = require("peft.utils.other", backend="local", extra="local").get_pattern_key
    check_target = require("peft.tuners.tuners_utils", backend="local", extra="local").check_target_module_exists
    if config.target_modules == "all-linear":
        targets = set(base.lora_targets)
    else:
        # check_target_module_exists returns True, a re.Match, or a falsy value (None, False, excluded)
        targets = {key for key in base.modules if key and bool(check_target(config, key))}
    if not targets:
        msg = (f"{subject}: its target_modules {config.target_modules!r} match no module of {base.name!r}. "
               "Was it trained on another model family?")
        raise AdapterError(msg)
    not_served = sorted(targets - base.lora_targets)
    if not_served:
        msg = (f"{subject} targets modules that are not linear projections of {base.name!r} (LoRA is served on "
               f"linear layers only): {', '.join(not_served[:5])}")
        raise AdapterError(msg)
    expected: dict[str, tuple[int, ...]] = {}
    rank_keys = list((config.rank_pattern or {}).keys())
    lora_bias = bool(getattr(config, "lora_bias", False))
    for key in sorted(targets):
        module = base.modules[key]
        rank = config.rank_pattern.get(get_pattern_key(rank_keys, key), config.r) if rank_keys else config.r
        prefix = f"base_model.model.{key}"
        expected[f"{prefix}.lora_A.weight"] = (rank, module.in_features)
        expected[f"{prefix}.lora_B.weight"] = (module.out_features, rank)
        if lora_bias:
            expected[f"{prefix}.lora_B.bias"] = (module.out_features,)
    return expected


def dry_run(config: Any, tensors: Mapping[str, Any], base: BaseStructure, *, subject: str = "Adapter") -> None:
    """Compare the file's tensors (name -> tensor, or anything with ``.shape``/``.dtype``) with what ``config``
    implies on ``base``: missing, unexpected and wrong-shape keys, non-float or non-finite values."""
    torch = require("torch", backend="local", extra="local")
    expected = _expected_tensors(config, base, subject)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = [f"{key}: file {tuple(tensors[key].shape)}, expected {expected[key]}"
                   for key in sorted(set(expected) & set(tensors)) if tuple(tensors[key].shape) != expected[key]]
    problems = []
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} tensor(s) with the wrong shape (rank r={config.r} in the config), "
                        f"e.g. {wrong_shape[0]}")
    if missing:
        problems.append(f"{len(missing)} missing tensor(s), e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]}")
    kept = {key: t for key, t in tensors.items() if key in expected}
    not_float = [key for key, t in kept.items() if not torch.is_floating_point(t)]
    if not_float:
        problems.append(f"non-float tensor(s), e.g. {not_float[0]}")
    non_finite = [key for key, t in kept.items() if torch.is_floating_point(t) and not torch.isfinite(t).all()]
    if non_finite:
        problems.append(f"NaN/inf values, e.g. in {non_finite[0]}")
    if problems:
        msg = (f"{subject} does not fit base model {base.name!r}: " + "; ".join(problems)
               + ". Was it trained on another base model, or is its adapter_config.json out of date?")
        raise AdapterError(msg)


# ------------------------------------------------------------------------------------------------ all of it


def validate_adapter(
    path: str | Path,
    base: BaseStructure,
    *,
    name: str | None = None,
    check_base_model: CheckBaseModel = "error",
) -> Any:
    """Files, LoRA config, then the dry run against ``base``; returns the adapter's ``LoraConfig``.

    Raises:
        AdapterError: the first problem found, saying what is wrong and what to do.
    """
    path = Path(path)
    validate_adapter_dir(path, name=name)
    config = read_lora_config(path, base.name, name=name, check_base_model=check_base_model)
    safetensors_torch = require("safetensors.torch", backend="local", extra="local")
    weights = path / WEIGHTS_FILE
    try:
        tensors = safetensors_torch.load_file(str(weights), device="cpu")
    except Exception as exc:  # SafetensorsError, OSError, ...
        msg = (f"{_subject(path, name)}: adapter weights at {weights} are corrupt: not a valid safetensors file "
               f"({type(exc).__name__}: {exc}). Save the adapter again.")
        raise AdapterError(msg) from exc
    dry_run(config, tensors, base, subject=_subject(path, name))
    return config
