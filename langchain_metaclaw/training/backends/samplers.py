"""The two :class:`~langchain_metaclaw.training.sampler.Sampler` implementations backends hand out.

:class:`LocalSampler` samples with this process's :class:`LocalEngine` (through its public API only: the
adapter is loaded under its own name and every request names it). :class:`TinkerSampler` samples with a
tinker / MinT ``SamplingClient``; nothing of a ``tinker://`` checkpoint is ever loaded locally.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from langchain_metaclaw._tinker import resolve
from langchain_metaclaw.errors import TrainingError
from langchain_metaclaw.messages import chat_prompt_ids
from langchain_metaclaw.training.sampler import ChatPrompt, SampledCompletion

__all__ = ["LocalSampler", "TinkerSampler"]


class LocalSampler:
    """Samples from ``version`` on a :class:`LocalEngine` (``None``: the base model).

    Args:
        engine: the engine (the process's shared one for the base model, so serving and training share
            one copy of the weights).
        version: adapter name to pin requests to; loaded from ``path`` unless the engine has it already.
        path: the adapter directory (needed when ``version`` is not loaded yet).
        owned: unload ``version`` on :meth:`close`. Only for names private to one training run (its step
            checkpoints): a registry version may be served by a chat model of the same process, which must
            not lose it under a request.
    """

    def __init__(self, engine: Any, version: str | None, path: str | None = None, *, owned: bool = False) -> None:
        if version is not None and version not in engine.adapters:
            if path is None:
                msg = f"Adapter {version!r} is not loaded and no path to load it from was given"
                raise TrainingError(msg)
            engine.load_adapter(version, path)
        self.engine = engine
        self.version = version
        self._owned = owned and version is not None

    def sample(self, prompts: Sequence[ChatPrompt], n: int, *, max_tokens: int, temperature: float = 1.0,
               seed: int | None = None) -> list[list[SampledCompletion]]:
        groups = []
        for i, prompt in enumerate(prompts):
            # one batched decode per group: the prompt is prefilled once, the n rows decode together
            results = self.engine.sample_group(
                prompt,
                n=n,
                adapter=self.version,
                max_new_tokens=max_tokens,
                temperature=temperature,
                seed=None if seed is None else seed + i,
            )
            groups.append([_completion(r) for r in results])
        return groups

    def greedy(self, prompts: Sequence[ChatPrompt], *, max_tokens: int) -> list[str]:
        # several prompts per batched decode (the same tokens as generate() one prompt at a time)
        results = self.engine.generate_batch(list(prompts), adapter=self.version, max_new_tokens=max_tokens)
        return [r.text for r in results]

    def close(self) -> None:
        if self._owned and self.version in self.engine.adapters:
            self.engine.unload_adapter(self.version)
        self._owned = False


def _completion(result: Any) -> SampledCompletion:
    return SampledCompletion(
        prompt_token_ids=list(result.prompt_token_ids),
        completion_token_ids=list(result.completion_token_ids),
        logprobs=list(result.logprobs),
        text=result.text,
    )


class TinkerSampler:
    """Samples from a tinker / MinT ``SamplingClient`` (the base model, a saved path, or a step's weights).

    Prompts are rendered with :func:`~langchain_metaclaw.messages.chat_prompt_ids` (as the serving backend
    does) and sent together: every ``sample`` request is submitted before the first is awaited, so a group
    of prompts costs one round trip. ``stop`` is left to the service (its implicit EOS stop).

    Args:
        client: the ``SamplingClient``.
        types: the SDK's ``types`` module (``ModelInput``, ``SamplingParams``).
        tokenizer: a zero-argument callable returning the base model's HF tokenizer (called on first use).
        version: what the client samples from, for the records (``None``: the base model).
    """

    def __init__(self, client: Any, types: Any, tokenizer: Callable[[], Any], version: str | None) -> None:
        self.client = client
        self.types = types
        self.version = version
        self._get_tokenizer = tokenizer
        self._tokenizer_lock = threading.Lock()

    def sample(self, prompts: Sequence[ChatPrompt], n: int, *, max_tokens: int, temperature: float = 1.0,
               seed: int | None = None) -> list[list[SampledCompletion]]:
        tokenizer = self._get_tokenizer()
        with self._tokenizer_lock:
            encoded = [chat_prompt_ids(tokenizer, p) for p in prompts]
        futures = [
            self.client.sample(
                prompt=self.types.ModelInput.from_ints(ids),
                num_samples=n,
                sampling_params=self.types.SamplingParams(
                    max_tokens=int(max_tokens),
                    temperature=float(temperature),
                    seed=None if seed is None else seed + i,
                ),
            )
            for i, ids in enumerate(encoded)
        ]
        groups = []
        for ids, future in zip(encoded, futures, strict=True):
            sequences = resolve(future).sequences
            groups.append([self._completion(ids, s, tokenizer) for s in sequences])
        return groups

    def greedy(self, prompts: Sequence[ChatPrompt], *, max_tokens: int) -> list[str]:
        groups = self.sample(prompts, 1, max_tokens=max_tokens, temperature=0.0)
        return [group[0].text for group in groups]

    def close(self) -> None:
        self.client = None

    def _completion(self, prompt_ids: list[int], sequence: Any, tokenizer: Any) -> SampledCompletion:
        tokens = [int(t) for t in sequence.tokens]
        logprobs = getattr(sequence, "logprobs", None)
        if logprobs is None or len(logprobs) != len(tokens):
            msg = "The sampling client returned no logprob for some sampled tokens; on-policy training needs them"
            raise TrainingError(msg)
        with self._tokenizer_lock:
            text = tokenizer.decode(tokens, skip_special_tokens=True)
        return SampledCompletion(prompt_ids, tokens, [float(x) for x in logprobs], text)
