"""The ``TrainingBackend`` protocol: tinker's ``TrainingClient``, synchronous, with plain-Python records.

Every backend (``local`` peft, ``tinker``, ``mint``) takes the same :class:`~..types.Datum` list and the same
loss names, so a training loop written against this protocol runs unchanged on a laptop or on Tinker.

Call order for one step (as with tinker): ``forward_backward`` (once or more: gradients accumulate) then
``optim_step`` (applies and clears them). ``save_weights_for_sampler`` hands weights to serving;
``save_state`` / ``load_state`` checkpoint weights *and* optimizer state so a killed run resumes.

The next policy comes from the backend, as in tinker-cookbook's loop: ``save_weights_and_get_sampler``
gives a :class:`~langchain_metaclaw.training.sampler.Sampler` on the weights just trained, ``sampler`` one on
a saved version (or the base model). The trainer samples and gates only through them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

from langchain_metaclaw.errors import ConfigurationError
from langchain_metaclaw.training.sampler import Sampler
from langchain_metaclaw.training.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    LossFnName,
    OptimStepResult,
    SavedWeights,
    check_loss_config,
)

__all__ = ["LOSS_FNS", "LogprobModel", "TrainingBackend", "validate_request"]

LOSS_FNS: tuple[LossFnName, ...] = ("importance_sampling", "cross_entropy", "ppo")


def validate_request(data: Sequence[Datum], loss_fn: str, config: Mapping[str, float]) -> None:
    """Refuse a ``forward_backward`` call every backend would reject, before any work (or network) is spent."""
    check_loss_config(loss_fn, config)
    for i, datum in enumerate(data):
        try:
            datum.check_for(loss_fn)
        except ValueError as exc:
            msg = f"data[{i}]: {exc}"
            raise ConfigurationError(msg) from exc


LogprobModel = Literal["current", "base"]
"""Which policy ``compute_logprobs`` scores with: the adapter being trained, or the base model alone."""


@runtime_checkable
class TrainingBackend(Protocol):
    """A LoRA training client shaped like tinker's ``TrainingClient``.

    ``loss_fn_config`` keys: ``kl_coef`` (any loss: penalise divergence from ``ref_logprobs``, which the
    backend computes against the base model when a datum lacks them), ``clip_low_threshold`` /
    ``clip_high_threshold`` (``ppo``, defaults 0.8 / 1.2). The local backend adds the KL as a loss term (k3
    estimator); tinker and MinT take no extra loss terms, so there it shapes the advantages the way
    tinker-cookbook's ``incorporate_kl_penalty`` does. Unknown keys raise ``ConfigurationError``.
    """

    base_model: str
    """Name of the base model the adapter is trained on."""

    def forward_backward(self, data: Sequence[Datum], loss_fn: LossFnName,
                         loss_fn_config: Mapping[str, float] | None = None) -> ForwardBackwardOutput:
        """Compute the loss (a sum over tokens) and accumulate its gradients.

        Returns the trainer's per-datum logprobs of the target tokens (as they were before this call's
        gradients are applied) and batch metrics (``loss:sum``, ``tokens:sum``, ...).
        """
        ...

    def optim_step(self, adam_params: AdamParams) -> OptimStepResult:
        """Apply one AdamW step with the accumulated gradients (clipped to ``grad_clip_norm``), then clear them."""
        ...

    def save_weights_for_sampler(self, name: str) -> SavedWeights:
        """Save the current adapter for serving (a peft safetensors directory, or a ``tinker://`` path)."""
        ...

    def save_weights_and_get_sampler(self, name: str) -> Sampler:
        """A sampler on the current weights, saved under ``name`` (a name private to the caller's run)."""
        ...

    def sampler(self, version: str | None = None, path: str | None = None) -> Sampler:
        """A sampler on the saved weights ``version`` at ``path`` (what ``save_weights_for_sampler`` returned);
        ``version=None``: the base model."""
        ...

    def save_state(self, name: str) -> str:
        """Checkpoint adapter weights, optimizer state and step; return the path to give ``load_state``."""
        ...

    def load_state(self, path: str) -> None:
        """Restore a ``save_state`` checkpoint (weights, optimizer state, step)."""
        ...

    def compute_logprobs(
        self, data: Sequence[Datum], *, model: LogprobModel = "current"
    ) -> list[list[float]]:
        """Log-probabilities of each datum's ``target_tokens`` under the current adapter or the base model.

        Used to recompute behaviour logprobs for retokenized samples and reference logprobs for a KL
        penalty. No gradients, no effect on the accumulated ones.
        """
        ...

    def get_tokenizer(self) -> Any:
        """The tokenizer of ``base_model``."""
        ...

    def close(self) -> None:
        """Release the model / session. The backend is unusable afterwards."""
        ...
