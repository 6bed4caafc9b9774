"""The ``tinker`` serving backend: sampling from Tinker (or MinT) ``SamplingClient``\\ s, one per adapter version.

Written against the tinker 0.22 surface (the version MinT pins) and run on 0.38 too: client factories return
clients on 0.22 and futures on 0.38, ``sample`` returns a future on both, so every result is unwrapped with
``.result()`` when it has one.

A request is rendered with the base model's chat template (the tokenizer from the base
``SamplingClient.get_tokenizer()``, or ``tokenizer=``) exactly as :class:`LocalEngine` does
(``apply_chat_template(add_generation_prompt=True, tokenize=False)`` then encoding without special tokens),
sent as ``sample(prompt=ModelInput.from_ints(ids), num_samples=1, sampling_params=SamplingParams(max_tokens,
temperature, top_p, seed, stop))``, and the ``SampledSequence``'s tokens and logprobs are the engine tokens of
the answer. ``stop``: ``None`` without stop strings (tinker's implicit EOS stop; ``stop_token_ids=`` makes it
explicit), else the stop strings plus the tokenizer's EOS text (a list cannot mix strings and ids); the text is
decoded without special tokens and trimmed before the first stop string, the ids are kept.

Tinker has no constrained decoding: a ``json_schema`` request (a forced tool, structured output) is sampled
unconstrained, recorded as ``sampling["constrained"] = False`` with ``json_schema_ignored = True``, and the
chat model parses (or reports as invalid) what comes back.

Adapters (DESIGN decision 6): ``load_adapter(version, "tinker://<run>/sampler_weights/<name>")`` builds a new
``SamplingClient`` with ``create_sampling_client(model_path=uri)``, checks it samples from this base model, and
keeps it under ``version``; a request pinned to a version takes that client once and keeps it, so publishing a
new version never touches a request in flight. ``unload_adapter`` drops the reference.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from langchain_metaclaw._tinker import import_sdk, make_service_client, resolve
from langchain_metaclaw.chat_model.backends.base import Completion, CompletionRequest
from langchain_metaclaw.errors import AdapterError, ConfigurationError
from langchain_metaclaw.messages import chat_prompt_ids

__all__ = ["TinkerServingBackend"]

logger = logging.getLogger(__name__)


class TinkerServingBackend:
    """Serve a Tinker / MinT base model and its LoRA sampler checkpoints.

    Args:
        base_model (`str`): a model the service samples from, e.g. ``"Qwen/Qwen3-4B-Instruct-2507"``.
        service_client (*optional*): an existing ``ServiceClient``; built from ``api_key`` / ``base_url`` /
            the environment (``TINKER_API_KEY``, or ``MINT_API_KEY`` with ``sdk="mint"``) otherwise.
        sdk (`"tinker" | "mint"`, defaults to `"tinker"`): which SDK to import (``BackendUnavailableError``
            naming the extra when it is missing).
        tokenizer (*optional*): a HuggingFace tokenizer of the base model; default: the base sampling client's
            ``get_tokenizer()``.
        stop_token_ids (`list[int]`, *optional*): explicit stop tokens for requests without stop strings.
        api_key, base_url (`str`, *optional*): passed to ``ServiceClient``.
    """

    name = "tinker"

    def __init__(
        self,
        base_model: str | None,
        *,
        service_client: Any = None,
        sdk: Literal["tinker", "mint"] = "tinker",
        tokenizer: Any = None,
        stop_token_ids: Sequence[int] | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> None:
        if not base_model:
            msg = "backend='tinker' needs the base model the service samples from (model=...)"
            raise ConfigurationError(msg)
        self.sdk = sdk
        self._sdk = import_sdk(sdk)  # BackendUnavailableError naming the extra when missing
        self.types = self._sdk.types
        self.base_model = base_model
        if service_client is None:
            service_client = make_service_client(self._sdk, api_key=api_key, base_url=base_url)
        self.service_client = service_client
        self._tokenizer = tokenizer
        self._stop_token_ids = [int(t) for t in stop_token_ids] if stop_token_ids else None
        self._base: Any = None
        self._clients: dict[str, Any] = {}
        self._uris: dict[str, str] = {}
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()

    @property
    def model_name(self) -> str:
        return self.base_model

    # ------------------------------------------------------------------ clients

    @property
    def base_client(self) -> Any:
        """The base model's ``SamplingClient`` (built on first use)."""
        if self._base is None:
            with self._lock:
                if self._base is None:
                    self._base = resolve(self.service_client.create_sampling_client(base_model=self.base_model))
        return self._base

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            tokenizer = self.base_client.get_tokenizer()
            with self._lock:
                self._tokenizer = self._tokenizer or tokenizer
        return self._tokenizer

    def _client(self, adapter: str | None) -> Any:
        if adapter is None:
            return self.base_client
        client = self._clients.get(adapter)  # one read: the request keeps this client
        if client is None:
            msg = f"No adapter named {adapter!r} is loaded (loaded: {sorted(self._clients)}); load_adapter() it first."
            raise AdapterError(msg)
        return client

    @property
    def adapters(self) -> list[str]:
        return list(self._clients)

    def load_adapter(self, version: str, uri: str) -> None:
        """A new ``SamplingClient`` for the sampler checkpoint ``uri``, kept as ``version``.

        Raises:
            AdapterError: ``uri`` is not a ``tinker://`` (or, with ``sdk="mint"``, ``mint://``) path, the
                service refuses it, or it samples from another base model. Nothing changes then.
        """
        uri = str(uri)
        schemes = ("tinker://", "mint://") if self.sdk == "mint" else ("tinker://",)
        if not uri.startswith(schemes):
            msg = (
                f"Adapter {version!r}: the {self.sdk} backend serves checkpoints saved on the service "
                f"({' or '.join(s + '<run>/sampler_weights/<name>' for s in schemes)}), not {uri!r}; "
                "save with save_weights_for_sampler()."
            )
            raise AdapterError(msg)
        with self._lock:
            if self._uris.get(version) == uri:
                return
            if version in self._clients:
                msg = f"An adapter named {version!r} is already loaded from {self._uris[version]}; give each version its own name."
                raise AdapterError(msg)
        try:
            client = resolve(self.service_client.create_sampling_client(model_path=uri))
        except Exception as exc:
            msg = f"The {self.sdk} service refused adapter {version!r} at {uri}: {exc}"
            raise AdapterError(msg) from exc
        self._check_base(version, uri, client)
        with self._lock:
            self._clients[version] = client  # publish: one reference
            self._uris[version] = uri
        logger.info("tinker adapter %r ready from %s", version, uri)

    def _check_base(self, version: str, uri: str, client: Any) -> None:
        get_base = getattr(client, "get_base_model", None)
        if not callable(get_base):
            return
        try:
            base = resolve(get_base())
        except Exception as exc:  # noqa: BLE001 - the check is best effort; sampling would fail anyway
            logger.warning("could not ask the base model of adapter %r: %s", version, exc)
            return
        if isinstance(base, str) and base and base != self.base_model:
            msg = f"Adapter {version!r} at {uri} samples from base model {base!r}, but this backend serves {self.base_model!r}."
            raise AdapterError(msg)

    def unload_adapter(self, version: str) -> None:
        """Drop ``version`` (requests already holding its client finish with it)."""
        with self._lock:
            self._clients.pop(version, None)
            self._uris.pop(version, None)

    # ------------------------------------------------------------------ sampling

    def encode_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of ``messages`` with the base model's chat template and the generation prompt."""
        tokenizer = self.tokenizer
        with self._tokenizer_lock:
            return chat_prompt_ids(tokenizer, messages)

    def _stop(self, request: CompletionRequest) -> list[str] | list[int] | None:
        stops = [s for s in (request.stop or []) if s]
        if not stops:
            return list(self._stop_token_ids) if self._stop_token_ids else None
        eos = getattr(self.tokenizer, "eos_token", None)
        if isinstance(eos, str) and eos and eos not in stops:
            stops.append(eos)
        return stops

    def _decode(self, ids: list[int], stops: list[str]) -> tuple[str, bool]:
        with self._tokenizer_lock:
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in stops) if i != -1), default=-1)
        return (text[:cut], True) if cut != -1 else (text, False)

    def complete(self, request: CompletionRequest, adapter: str | None) -> Completion:
        client = self._client(adapter)
        prompt = self.encode_prompt(request.messages)
        stop = self._stop(request)
        params = self.types.SamplingParams(
            max_tokens=int(request.max_tokens),
            temperature=float(request.temperature),
            top_p=float(request.top_p),
            seed=request.seed,
            stop=stop,
        )
        response = resolve(client.sample(
            prompt=self.types.ModelInput.from_ints(prompt), num_samples=1, sampling_params=params,
        ))
        sequence = response.sequences[0]
        tokens = [int(t) for t in sequence.tokens]
        logprobs = [float(x) for x in sequence.logprobs] if getattr(sequence, "logprobs", None) is not None else None
        if logprobs is not None and len(logprobs) != len(tokens):
            logger.warning("tinker returned %d tokens but %d logprobs; dropping the logprobs", len(tokens), len(logprobs))
            logprobs = None
        text, trimmed = self._decode(tokens, [s for s in (request.stop or []) if s])
        finish = "stop" if trimmed or getattr(sequence, "stop_reason", "stop") == "stop" else "length"
        sampling: dict[str, Any] = {
            "temperature": float(request.temperature),
            "top_p": float(request.top_p),
            "top_k": -1,
            "greedy": request.temperature == 0,
            "constrained": False,
            "seed": request.seed,
            "max_new_tokens": int(request.max_tokens),
            "stop": stop,
        }
        if request.json_schema is not None:
            sampling["json_schema_ignored"] = True
        return Completion(
            text=text,
            finish_reason=finish,  # type: ignore[arg-type]
            prompt_token_ids=prompt,
            completion_token_ids=tokens,
            logprobs=logprobs,
            adapter_version=adapter,
            model_name=self.base_model,
            sampling=sampling,
            usage={"input_tokens": len(prompt), "output_tokens": len(tokens),
                   "total_tokens": len(prompt) + len(tokens)},
        )

    def stream(self, request: CompletionRequest, adapter: str | None) -> Iterator[tuple[str, Completion | None]]:
        """Tinker samples whole sequences: the full text comes as one delta, then the completion."""
        completion = self.complete(request, adapter)
        if completion.text:
            yield completion.text, None
        yield "", completion
