"""The ``local`` serving backend: :class:`LocalEngine` (transformers + peft, CPU or GPU) in this process.

Engines are shared per base model within a process, so several chat models (and the demo's evaluator)
serve from one copy of the weights; each adapter version is loaded once under its own name, and stays loaded
while any backend of the process holds it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from langchain_metaclaw.chat_model.backends.base import Completion, CompletionRequest
from langchain_metaclaw.errors import AdapterError

_ENGINES: dict[str | None, Any] = {}
_ENGINES_LOCK = threading.Lock()

_SHARES: weakref.WeakKeyDictionary[Any, dict[str, int]] = weakref.WeakKeyDictionary()
"""Per shared engine: adapter name -> how many backends hold it (the last one to let go unloads it)."""
_SHARES_LOCK = threading.Lock()


def shared_engine(base_model: str | None = None):
    """The process-wide :class:`LocalEngine` for ``base_model`` (``None``: the embedded SmolLM2)."""
    with _ENGINES_LOCK:
        engine = _ENGINES.get(base_model)
        if engine is None:
            from langchain_metaclaw.chat_model.local_engine import LocalEngine

            engine = _ENGINES[base_model] = LocalEngine(base_model)
        return engine


class LocalServingBackend:
    """Serves from the process-wide engine; several backends (chat models) may share its adapters.

    An adapter name loaded by several backends stays loaded until the last of them unloads it, so one chat
    model retiring a version never pulls it from under another that still serves it. A name is bound to one
    directory: loading the same name from another path is refused.
    """

    name = "local"

    def __init__(self, base_model: str | None = None) -> None:
        self.engine = shared_engine(base_model)
        self._lock = threading.Lock()
        self._held: set[str] = set()

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
        with self._lock:
            with _SHARES_LOCK:
                shares = _SHARES.setdefault(self.engine, {})
                if version in self._held:
                    if version in self.engine.adapters:
                        return
                    # unloaded behind our back (the server's unload endpoint talks to the engine directly)
                    self._held.discard(version)
                    shares.pop(version, None)
                if version in self.engine.adapters:
                    loaded = getattr(self.engine, "_adapters", {}).get(version)
                    path = getattr(loaded, "path", None)
                    if path is not None and Path(path).resolve() != Path(uri).resolve():
                        msg = (f"adapter name {version!r} is already loaded from {path}, not {uri}; "
                               "give each adapter its own name")
                        raise AdapterError(msg)
                    # loaded by someone outside the share count (a test, the server): never unloaded by us
                    shares.setdefault(version, 1)
                else:
                    self.engine.load_adapter(version, uri)
                    shares[version] = 0
                shares[version] += 1
            self._held.add(version)

    def unload_adapter(self, version: str) -> None:
        """Let go of ``version``; the engine unloads it (after its in-flight requests) when no backend holds it."""
        with self._lock:
            if version not in self._held:
                return
            self._held.discard(version)
            with _SHARES_LOCK:
                shares = _SHARES.setdefault(self.engine, {})
                left = shares.get(version, 1) - 1
                if left > 0:
                    shares[version] = left
                    return
                shares.pop(version, None)
                if version in self.engine.adapters:  # under the lock: no backend can take it meanwhile
                    self.engine.unload_adapter(version)  # waits for requests still pinned to it
