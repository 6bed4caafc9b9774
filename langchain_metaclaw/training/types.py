"""Records exchanged with a training backend, shaped like the tinker SDK's so one datum fits every backend.

Abstractions (all frozen dataclasses, plain Python, no torch or tinker import):

- :class:`Datum`: one training sequence with tinker's next-token alignment (``model_input = seq[:-1]``,
  ``target_tokens = seq[1:]``) and per-position loss inputs. :func:`datum_from_tokens` builds one from a
  prompt and a sampled completion.
- :class:`AdamParams`: the hyper-parameters of one optimizer step (tinker's ``AdamParams`` fields, strict).
- :class:`ForwardBackwardOutput`, :class:`OptimStepResult`: what the two training calls return.
- :class:`SavedWeights`: a handle to sampler weights (a local adapter directory or a ``tinker://`` path).

Type aliases: ``TokenSeq`` (tinker's ``ModelInput`` restricted to text tokens), ``Metrics`` (numbers that
get aggregated; display-only information never goes there), ``LossFnName``.

Metric keys follow tinker's ``"name:reduction"`` convention: ``loss:sum``, ``tokens:sum``,
``entropy:mean``, ``kl_sampler_trainer:mean``, ...
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from langchain_metaclaw.errors import ConfigurationError

__all__ = [
    "FLOAT_INPUT_KEYS",
    "LOSS_FN_CONFIG_KEYS",
    "LOSS_FN_INPUT_KEYS",
    "AdamParams",
    "Datum",
    "ForwardBackwardOutput",
    "LossFnName",
    "Metrics",
    "OptimStepResult",
    "SavedWeights",
    "TokenSeq",
    "check_loss_config",
    "datum_from_tokens",
]

TokenSeq: TypeAlias = list[int]
"""Token ids fed to the model: the equivalent of tinker's ``ModelInput`` with text chunks only."""

Metrics: TypeAlias = dict[str, float]
"""Numbers that get aggregated across steps, keyed ``"name:reduction"`` (``loss:sum``, ``entropy:mean``)."""

LossFnName: TypeAlias = Literal["importance_sampling", "cross_entropy", "ppo"]
"""Loss functions every backend implements, with tinker's definitions (sums over tokens)."""

FLOAT_INPUT_KEYS: frozenset[str] = frozenset({"logprobs", "advantages", "weights", "ref_logprobs"})
"""``loss_fn_inputs`` keys holding floats (sent to tinker as float32)."""

LOSS_FN_INPUT_KEYS: frozenset[str] = FLOAT_INPUT_KEYS | {"target_tokens"}
"""Every ``loss_fn_inputs`` key a :class:`Datum` may carry."""

LOSS_FN_CONFIG_KEYS: dict[str, frozenset[str]] = {
    "cross_entropy": frozenset({"kl_coef"}),
    "importance_sampling": frozenset({"kl_coef"}),
    "ppo": frozenset({"kl_coef", "clip_low_threshold", "clip_high_threshold"}),
}
"""``loss_fn_config`` keys each loss accepts (``kl_coef``: KL penalty against ``ref_logprobs``;
``clip_*_threshold``: ppo's ratio bounds); anything else is a typo and is refused."""


def check_loss_config(loss_fn: str, config: Mapping[str, float] | None) -> dict[str, float]:
    """``config`` as a dict, after checking that ``loss_fn`` exists and understands every key.

    The one check shared by every backend's request validation and the loss itself.

    Raises:
        ConfigurationError: an unknown loss, or a key it does not understand (a ``ValueError`` too).
    """
    config = dict(config or {})
    allowed = LOSS_FN_CONFIG_KEYS.get(loss_fn)
    if allowed is None:
        msg = f"Unknown loss_fn {loss_fn!r}; expected one of {sorted(LOSS_FN_CONFIG_KEYS)}"
        raise ConfigurationError(msg)
    unknown = set(config) - allowed
    if unknown:
        msg = f"loss_fn_config keys {sorted(unknown)} are not understood by {loss_fn!r} (allowed: {sorted(allowed)})"
        raise ConfigurationError(msg)
    return config

_REQUIRED_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens",),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
}


@dataclass(frozen=True)
class Datum:
    """One training sequence, aligned for next-token prediction exactly as tinker aligns it.

    For a full sequence ``seq = prompt + completion``, ``model_input = seq[:-1]`` and every list in
    ``loss_fn_inputs`` has ``len(model_input)`` entries, position ``i`` describing the prediction of
    ``seq[i + 1]``. Prompt positions carry ``advantages = 0``, ``weights = 0`` and ``logprobs = 0``.
    """

    model_input: TokenSeq
    """Token ids the model reads (``seq[:-1]``)."""

    loss_fn_inputs: Mapping[str, Sequence[float] | Sequence[int]] = field(default_factory=dict)
    """Per-position inputs of the loss, each as long as ``model_input``:

    - ``target_tokens`` (int): the token to predict at each position (``seq[1:]``). Always required.
    - ``weights`` (float): per-token weight; 0 masks a position out of the loss and the metrics. Optional
      (all ones); tinker's ``cross_entropy`` uses it, the RL losses multiply their advantages by it.
    - ``logprobs`` (float): the behaviour (sampler) policy's log-probability of each target token, as
      recorded by the serving engine or recomputed with ``TrainingBackend.compute_logprobs``. RL losses.
    - ``advantages`` (float): per-token advantage (0 on prompt positions). RL losses.
    - ``ref_logprobs`` (float): a reference policy's log-probabilities, for the KL penalty
      (``loss_fn_config["kl_coef"]``). Optional: backends compute them against the base model when absent.
    """

    def __post_init__(self) -> None:
        n = len(self.model_input)
        if n == 0:
            msg = "Datum.model_input is empty: a datum needs at least two tokens in its full sequence"
            raise ValueError(msg)
        if "target_tokens" not in self.loss_fn_inputs:
            msg = "Datum.loss_fn_inputs needs 'target_tokens' (the input shifted left by one)"
            raise ValueError(msg)
        for key, values in self.loss_fn_inputs.items():
            if key not in LOSS_FN_INPUT_KEYS:
                msg = f"Unknown loss_fn_inputs key {key!r}; expected one of {sorted(LOSS_FN_INPUT_KEYS)}"
                raise ValueError(msg)
            if len(values) != n:
                msg = (
                    f"loss_fn_inputs[{key!r}] has {len(values)} entries but model_input has {n}: every "
                    "input is aligned with model_input (input = seq[:-1], target = seq[1:])"
                )
                raise ValueError(msg)

    @property
    def length(self) -> int:
        """Number of positions (tinker's ``ModelInput.length``)."""
        return len(self.model_input)

    @property
    def target_tokens(self) -> list[int]:
        return [int(t) for t in self.loss_fn_inputs["target_tokens"]]

    def weights(self) -> list[float]:
        """``loss_fn_inputs["weights"]``, or all ones when absent."""
        w = self.loss_fn_inputs.get("weights")
        return [1.0] * self.length if w is None else [float(x) for x in w]

    def full_sequence(self) -> list[int]:
        """The unshifted sequence ``model_input + [target_tokens[-1]]``."""
        return [int(t) for t in self.model_input] + [int(self.loss_fn_inputs["target_tokens"][-1])]

    def with_inputs(self, **updates: Sequence[float] | Sequence[int] | None) -> Datum:
        """A copy with some ``loss_fn_inputs`` replaced (``None`` removes a key)."""
        inputs = dict(self.loss_fn_inputs)
        for key, value in updates.items():
            if value is None:
                inputs.pop(key, None)
            else:
                inputs[key] = list(value)
        return Datum(model_input=list(self.model_input), loss_fn_inputs=inputs)

    def check_for(self, loss_fn: str) -> None:
        """Raise ``ValueError`` if this datum lacks an input ``loss_fn`` needs."""
        required = _REQUIRED_INPUTS.get(loss_fn)
        if required is None:
            msg = f"Unknown loss_fn {loss_fn!r}; expected one of {sorted(_REQUIRED_INPUTS)}"
            raise ValueError(msg)
        missing = [k for k in required if k not in self.loss_fn_inputs]
        if missing:
            msg = f"loss_fn={loss_fn!r} needs loss_fn_inputs {list(required)}; this datum lacks {missing}"
            raise ValueError(msg)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for the trace store or a batch file)."""
        return {
            "model_input": list(self.model_input),
            "loss_fn_inputs": {k: list(v) for k, v in self.loss_fn_inputs.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Datum:
        return cls(model_input=list(data["model_input"]), loss_fn_inputs=dict(data["loss_fn_inputs"]))


def datum_from_tokens(
    prompt_ids: Sequence[int],
    completion_ids: Sequence[int],
    completion_logprobs: Sequence[float] | None,
    advantage: float | Sequence[float],
    weights: Sequence[float] | None = None,
) -> Datum:
    """Build the shifted RL datum for one sampled completion (tinker-cookbook's ``trajectory_to_data``).

    Args:
        prompt_ids (`Sequence[int]`): the prompt tokens exactly as the engine saw them (at least one).
        completion_ids (`Sequence[int]`): the sampled tokens (at least one).
        completion_logprobs (`Sequence[float]`, *optional*): the sampler's log-probability of each
            completion token. `None` puts zeros as a placeholder: recompute them with
            ``TrainingBackend.compute_logprobs`` (``tokens_source="retokenized"`` samples) before an RL loss.
        advantage (`float` or `Sequence[float]`): one advantage for every completion token, or one per token.
        weights (`Sequence[float]`, *optional*, defaults to ones): per completion-token weights.

    Returns:
        A :class:`Datum` with ``model_input = seq[:-1]`` and ``target_tokens``, ``logprobs``, ``advantages``,
        ``weights`` aligned to ``seq[1:]``; prompt positions (all but the last prompt token, whose
        prediction is the first completion token) carry 0 in ``logprobs``, ``advantages`` and ``weights``.

    >>> d = datum_from_tokens([1, 2], [3, 4], [-0.5, -0.25], 2.0)
    >>> d.model_input, d.loss_fn_inputs["target_tokens"], d.loss_fn_inputs["advantages"]
    ([1, 2, 3], [2, 3, 4], [0.0, 2.0, 2.0])
    """
    prompt = [int(t) for t in prompt_ids]
    completion = [int(t) for t in completion_ids]
    n_prompt, n_completion = len(prompt), len(completion)
    if n_prompt == 0 or n_completion == 0:
        msg = f"datum_from_tokens needs a non-empty prompt and completion (got {n_prompt} and {n_completion})"
        raise ValueError(msg)

    def per_completion(name: str, values: float | Sequence[float] | None, default: float) -> list[float]:
        if values is None:
            return [default] * n_completion
        if isinstance(values, int | float):
            return [float(values)] * n_completion
        out = [float(v) for v in values]
        if len(out) != n_completion:
            msg = f"{name} has {len(out)} entries for {n_completion} completion tokens"
            raise ValueError(msg)
        return out

    logprobs_c = per_completion("completion_logprobs", completion_logprobs, 0.0)
    advantages_c = per_completion("advantage", advantage, 0.0)
    weights_c = per_completion("weights", weights, 1.0)

    seq = prompt + completion
    # Per position of the full sequence, then drop the first position (it is never a target).
    zeros = [0.0] * n_prompt
    return Datum(
        model_input=seq[:-1],
        loss_fn_inputs={
            "target_tokens": seq[1:],
            "logprobs": (zeros + logprobs_c)[1:],
            "advantages": (zeros + advantages_c)[1:],
            "weights": (zeros + weights_c)[1:],
        },
    )


@dataclass(frozen=True)
class AdamParams:
    """One AdamW step's hyper-parameters; the fields of tinker's strict ``AdamParams``, nothing else.

    Defaults follow tinker-cookbook's RL loop (``eps=1e-8``) and clip at 1.0 (tinker's own default is no
    clipping, ``grad_clip_norm=0``): backends always send every field, so these defaults are ours.
    """

    learning_rate: float = 1e-4
    """Step size."""
    beta1: float = 0.9
    """Decay of the running mean of gradients."""
    beta2: float = 0.95
    """Decay of the running mean of squared gradients."""
    eps: float = 1e-8
    """Added to the denominator for numerical stability."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay."""
    grad_clip_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""


@dataclass(frozen=True)
class ForwardBackwardOutput:
    """What ``forward_backward`` returns (tinker's ``ForwardBackwardOutput`` with plain lists)."""

    loss_fn_outputs: list[dict[str, list[float]]]
    """One dict per datum, in the order given; ``["logprobs"]`` holds the trainer's log-probability of each
    target token (before this step's update), aligned with ``target_tokens``."""
    metrics: Metrics
    """Aggregates over the batch: ``loss:sum``, ``tokens:sum`` (positions with weight > 0), and where the
    backend can compute them ``entropy:mean``, ``kl_sampler_trainer:mean`` (mean of sampler - trainer
    logprob over weighted tokens, an estimate of KL(sampler || trainer)), ``ratio:mean``, ``ratio:max``,
    ``clip_frac:mean`` (ppo), ``kl_ref:mean`` (with ``kl_coef``)."""


@dataclass(frozen=True)
class OptimStepResult:
    """What ``optim_step`` returns."""

    metrics: Metrics
    """E.g. ``grad_norm`` (before clipping), ``learning_rate``, ``step`` (optimizer steps taken so far)."""


@dataclass(frozen=True)
class SavedWeights:
    """A handle to weights saved for sampling."""

    path_or_uri: str
    """A local adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) for the local
    backend, or a ``tinker://<run>/sampler_weights/<name>`` path for tinker / MinT."""
    name: str
    """The name given to ``save_weights_for_sampler``."""
    step: int | None = None
    """Optimizer steps taken when the weights were saved, where the backend knows it."""
