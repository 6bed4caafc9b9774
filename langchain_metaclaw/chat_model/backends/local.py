"""The ``local`` serving backend: :class:`LocalEngine` (transformers + peft, CPU or GPU) in this process.

Engines are shared per base model within a process, so several chat models (and the demo's evaluator)
serve from one copy of the weights; each adapter version is loaded once under its own name. Who holds a
loaded version, and when it is unloaded, is counted in one place: the process's
:class:`~langchain_metaclaw.adapters.follower.AdapterFollower` for the engine, which calls this backend's
``load_adapter`` / ``unload_adapter``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from langchain_metaclaw.chat_model.backends.base import Completion, CompletionRequest
from langchain_metaclaw.engine.local import shared_engine
from langchain_metaclaw.errors import AdapterError


class LocalServingBackend:
    """Serves from the process-wide engine; several backends (chat models, the server) share its adapters.

    ``load_adapter`` is idempotent for a name already loaded from the same directory (a name is bound to one
    directory: another path is refused); holders are counted by the process's ``AdapterFollower``.
    """

    name = "local"

    def __init__(self, base_model: str | None = None) -> None:
        self.engine = shared_engine(base_model)

    @property
    def model_name(self) -> str:
        return self.engine.base_model_name

    def _kwargs(self, request: CompletionRequest, adapter: str | None) -> dict[str, Any]:
        return {
            "messages": request.messages,
            "adapter": adapter,
            "max_new_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stop": request.stop,
            "seed": request.seed,
            "json_schema": request.json_schema,
        }

    def _completion(self, result: Any, adapter: str | None) -> Completion:
        return Completion(
            text=result.text,
            finish_reason=result.finish_reason,
            prompt_token_ids=list(result.prompt_token_ids),
            completion_token_ids=list(result.completion_token_ids),
            logprobs=list(result.logprobs),
            adapter_version=adapter,
            model_name=self.model_name,
            sampling=dict(result.sampling),
            usage=result.usage,
        )

    def complete(self, request: CompletionRequest, adapter: str | None) -> Completion:
        return self._completion(self.engine.generate(**self._kwargs(request, adapter)), adapter)

    def stream(self, request: CompletionRequest, adapter: str | None) -> Iterator[tuple[str, Completion | None]]:
        for delta, final in self.engine.stream(**self._kwargs(request, adapter)):
            yield delta, (self._completion(final, adapter) if final is not None else None)

    def load_adapter(self, version: str, uri: str) -> None:
        """Load ``uri`` as ``version`` (validated; ``AdapterError`` and nothing changes when refused)."""
        loaded_from = self.engine.adapter_path(version)
        if loaded_from is not None:
            if Path(loaded_from).resolve() != Path(uri).resolve():
                msg = (f"adapter name {version!r} is already loaded from {loaded_from}, not {uri}; "
                       "give each adapter its own name")
                raise AdapterError(msg)
            return
        self.engine.load_adapter(version, uri)

    def unload_adapter(self, version: str) -> None:
        """Unload ``version`` once no request uses it (nothing when it is not loaded)."""
        if self.engine.adapter_path(version) is not None:
            self.engine.unload_adapter(version)  # waits for requests still pinned to it
