"""The ``tinker`` and ``mint`` training backends: one code path over the tinker SDK's ``TrainingClient``.

The SDK is imported, and its futures unwrapped, by :mod:`langchain_metaclaw._tinker` (MinT's environment
mapping, the 0.22 / 0.38 differences).

The next policy comes from the training client, as in tinker-cookbook's RL loop:
:meth:`TinkerTrainingBackend.save_weights_and_get_sampler` wraps ``save_weights_and_get_sampling_client``
and :meth:`~TinkerTrainingBackend.sampler` a ``create_sampling_client(model_path=...)``, so the trainer's
on-policy groups and its promotion gate sample on the service and never load a ``tinker://`` path locally.

Data conversion (:func:`to_sdk_datum`): ``model_input`` becomes ``ModelInput.from_ints``; ``loss_fn_inputs``
become ``TensorData`` with tinker's dtypes (``target_tokens`` int64, the rest float32), only the keys the
loss takes: ``cross_entropy`` gets ``target_tokens`` and ``weights``; ``importance_sampling`` / ``ppo`` get
``target_tokens``, ``logprobs`` and ``advantages * weights`` (tinker's RL losses take no weights; the
product gives the same loss). ``kl_coef`` is not a tinker loss option: it is applied as reward shaping of
the advantages (tinker-cookbook's ``incorporate_kl_penalty``) with reference logprobs from the base model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tarfile
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from langchain_metaclaw._tinker import (
    SdkName,
    import_sdk,
    make_service_client,
    resolve,
    save_weights_and_get_sampling_client,
)
from langchain_metaclaw.errors import AdapterError, ConfigurationError, TrainingError
from langchain_metaclaw.training.backends.base import LogprobModel, validate_request
from langchain_metaclaw.training.backends.samplers import TinkerSampler
from langchain_metaclaw.training.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    LossFnName,
    Metrics,
    OptimStepResult,
    SavedWeights,
)

__all__ = ["TinkerTrainingBackend", "kl_shaped_advantages", "to_sdk_datum"]

logger = logging.getLogger(__name__)

_MAX_ARCHIVE_BYTES = 20 * 1024**3
_ALLOWED_ARCHIVE_SUFFIXES = (".json", ".safetensors", ".md", ".txt")
_ALLOWED_ARCHIVE_NAMES = {"checkpoint_complete"}


def _tensor(types: Any, values: Sequence[float] | Sequence[int], dtype: str) -> Any:
    if dtype == "int64":
        data: list[Any] = [int(v) for v in values]
    else:
        data = [float(v) for v in values]
    return types.TensorData(data=data, dtype=dtype, shape=[len(data)])


def to_sdk_datum(types: Any, datum: Datum, loss_fn: str, advantages: Sequence[float] | None = None) -> Any:
    """Convert our :class:`Datum` into ``types.Datum`` for ``loss_fn`` (see the module docstring).

    ``advantages`` overrides the datum's (already weighted, e.g. KL-shaped) advantages.
    """
    datum.check_for(loss_fn)
    inputs: dict[str, Any] = {"target_tokens": _tensor(types, datum.loss_fn_inputs["target_tokens"], "int64")}
    weights = datum.weights()
    if loss_fn == "cross_entropy":
        inputs["weights"] = _tensor(types, weights, "float32")
    else:
        if advantages is None:
            advantages = [
                float(a) * w for a, w in zip(datum.loss_fn_inputs["advantages"], weights, strict=True)
            ]
        inputs["logprobs"] = _tensor(types, datum.loss_fn_inputs["logprobs"], "float32")
        inputs["advantages"] = _tensor(types, advantages, "float32")
    model_input = types.ModelInput.from_ints([int(t) for t in datum.model_input])
    return types.Datum(model_input=model_input, loss_fn_inputs=inputs)


def kl_shaped_advantages(
    data: Sequence[Datum], ref_logprobs: Sequence[Sequence[float]], kl_coef: float
) -> tuple[list[list[float]], float]:
    """Weighted advantages with tinker-cookbook's KL penalty folded in.

    ``A_t * w_t + kl_coef * w_t * (mean_diff - diff_t)``, ``diff_t = sampler_logp_t - ref_logp_t``, the mean over
    weighted tokens of the whole batch. Returns the advantages and ``mean_diff`` (a KL(sampler || ref) estimate).
    """
    diffs_D = [
        [float(s) - float(r) for s, r in zip(d.loss_fn_inputs["logprobs"], ref, strict=True)]
        for d, ref in zip(data, ref_logprobs, strict=True)
    ]
    weights_D = [d.weights() for d in data]
    total = sum(w * x for ws, xs in zip(weights_D, diffs_D, strict=True) for w, x in zip(ws, xs, strict=True))
    count = sum(w for ws in weights_D for w in ws)
    mean_diff = total / count if count else 0.0
    shaped_D = []
    for d, ws, xs in zip(data, weights_D, diffs_D, strict=True):
        shaped_D.append(
            [
                float(a) * w + kl_coef * w * (mean_diff - x)
                for a, w, x in zip(d.loss_fn_inputs["advantages"], ws, xs, strict=True)
            ]
        )
    return shaped_D, mean_diff


def _floats(value: Any) -> list[float]:
    """A ``TensorData`` / numpy array / list as a list of floats."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    elif hasattr(value, "data"):
        value = value.data
    return [float(v) for v in value]


class TinkerTrainingBackend:
    """LoRA training on Tinker or MinT through the SDK's ``TrainingClient``.

    Args:
        base_model (`str`): a model the service trains (e.g. ``"Qwen/Qwen3-4B-Instruct-2507"``).
        rank (`int`, defaults to 32): LoRA rank (MinT documents 64 as its maximum).
        service_client (*optional*): an existing ``ServiceClient`` (not closed by :meth:`close`); built
            from ``api_key`` / ``base_url`` / the environment otherwise.
        sdk (`"tinker" | "mint"`, defaults to `"tinker"`): which SDK to import.
        api_key, base_url (`str`, *optional*): passed to ``ServiceClient``; they win over the environment.
        seed (`int`, *optional*): LoRA initialisation seed.
        train_mlp, train_attn (`bool`, default `True`), train_unembed (`bool`, defaults to `False`): which
            weights get LoRA. ``train_unembed`` defaults to off, unlike tinker, because PEFT cannot load an
            adapter on the unembedding (``download_adapter`` would give a checkpoint the local backend
            cannot serve).
        user_metadata (`dict[str, str]`, *optional*): attached to the training run.
        resume_from (`str`, *optional*): a ``save_state`` path to start from (weights and optimizer state).
    """

    def __init__(
        self,
        base_model: str,
        rank: int = 32,
        *,
        service_client: Any = None,
        sdk: SdkName = "tinker",
        api_key: str | None = None,
        base_url: str | None = None,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = False,
        user_metadata: Mapping[str, str] | None = None,
        resume_from: str | None = None,
    ) -> None:
        if not base_model:
            msg = "TinkerTrainingBackend needs base_model (a model the service can train)"
            raise ConfigurationError(msg)
        self.sdk: SdkName = sdk
        self._sdk = import_sdk(sdk)
        self.types = self._sdk.types
        self.base_model = base_model
        self.rank = rank
        self._owns_service_client = service_client is None
        if service_client is None:
            service_client = make_service_client(self._sdk, api_key=api_key, base_url=base_url)
        self.service_client = service_client
        if resume_from:
            self.training_client = resolve(
                service_client.create_training_client_from_state_with_optimizer(resume_from)
            )
        else:
            kwargs: dict[str, Any] = {
                "base_model": base_model,
                "rank": rank,
                "seed": seed,
                "train_mlp": train_mlp,
                "train_attn": train_attn,
                "train_unembed": train_unembed,
            }
            if user_metadata:
                kwargs["user_metadata"] = dict(user_metadata)
            self.training_client = resolve(service_client.create_lora_training_client(**kwargs))
        self._base_sampler: Any = None
        self._tokenizer: Any = None
        self._step = 0
        self._closed = False

    @property
    def step(self) -> int:
        """Optimizer steps taken through this object (not restored by ``load_state``)."""
        return self._step

    # --- protocol ----------------------------------------------------------------------------------------

    def forward_backward(self, data: Sequence[Datum], loss_fn: LossFnName,
                         loss_fn_config: Mapping[str, float] | None = None) -> ForwardBackwardOutput:
        self._check_open()
        data = list(data)
        config = dict(loss_fn_config or {})
        validate_request(data, loss_fn, config)
        kl_coef = float(config.pop("kl_coef", 0.0))
        shaped: list[list[float]] | None = None
        extra: Metrics = {}
        if kl_coef:
            if loss_fn == "cross_entropy":
                msg = "kl_coef with cross_entropy needs a loss term; only the local backend supports it"
                raise ConfigurationError(msg)
            refs = [
                list(d.loss_fn_inputs["ref_logprobs"]) if "ref_logprobs" in d.loss_fn_inputs else None
                for d in data
            ]
            missing = [i for i, r in enumerate(refs) if r is None]
            if missing:
                for i, r in zip(
                    missing, self.compute_logprobs([data[i] for i in missing], model="base"), strict=True
                ):
                    refs[i] = r
            shaped, mean_diff = kl_shaped_advantages(data, refs, kl_coef)  # type: ignore[arg-type]
            extra["kl_ref:mean"] = mean_diff
        sdk_data = [
            to_sdk_datum(self.types, d, loss_fn, None if shaped is None else shaped[i])
            for i, d in enumerate(data)
        ]
        try:
            result = resolve(
                self.training_client.forward_backward(sdk_data, loss_fn, loss_fn_config=config or None)
            )
        except Exception as exc:  # the SDK's errors are many; say which call failed and keep the cause
            msg = f"{self.sdk} forward_backward({loss_fn!r}) failed: {exc}"
            raise TrainingError(msg) from exc
        outputs = [{"logprobs": _floats(o["logprobs"])} for o in result.loss_fn_outputs]
        metrics: Metrics = {k: float(v) for k, v in dict(result.metrics or {}).items()}
        metrics.update(extra)
        metrics.update(_client_metrics(data, outputs, loss_fn))
        return ForwardBackwardOutput(loss_fn_outputs=outputs, metrics=metrics)

    def optim_step(self, adam_params: AdamParams) -> OptimStepResult:
        self._check_open()
        params = self.types.AdamParams(
            learning_rate=adam_params.learning_rate,
            beta1=adam_params.beta1,
            beta2=adam_params.beta2,
            eps=adam_params.eps,
            weight_decay=adam_params.weight_decay,
            grad_clip_norm=adam_params.grad_clip_norm,
        )
        try:
            response = resolve(self.training_client.optim_step(params))
        except Exception as exc:
            msg = f"{self.sdk} optim_step failed: {exc}"
            raise TrainingError(msg) from exc
        self._step += 1
        metrics: Metrics = {k: float(v) for k, v in dict(getattr(response, "metrics", None) or {}).items()}
        metrics.setdefault("learning_rate", adam_params.learning_rate)
        metrics["step"] = float(self._step)
        return OptimStepResult(metrics=metrics)

    def save_weights_for_sampler(self, name: str) -> SavedWeights:
        self._check_open()
        path = resolve(self.training_client.save_weights_for_sampler(name)).path
        return SavedWeights(path_or_uri=str(path), name=name, step=self._step)

    def save_state(self, name: str) -> str:
        self._check_open()
        return str(resolve(self.training_client.save_state(name)).path)

    def load_state(self, path: str) -> None:
        """Load weights and optimizer state (``load_state_with_optimizer`` where the SDK has it)."""
        self._check_open()
        loader = (
            getattr(self.training_client, "load_state_with_optimizer", None)
            or self.training_client.load_state
        )
        resolve(loader(path))

    def compute_logprobs(
        self, data: Sequence[Datum], *, model: LogprobModel = "current"
    ) -> list[list[float]]:
        """``current``: ``TrainingClient.forward`` (no gradients); ``base``: a base-model SamplingClient's
        ``compute_logprobs`` on each full sequence (its first entry, for the first token, is dropped)."""
        self._check_open()
        data = list(data)
        if not data:
            return []
        if model == "current":
            sdk_data = [to_sdk_datum(self.types, d, "cross_entropy") for d in data]
            result = resolve(self.training_client.forward(sdk_data, "cross_entropy"))
            return [_floats(o["logprobs"]) for o in result.loss_fn_outputs]
        if model != "base":
            msg = f"model must be 'current' or 'base', got {model!r}"
            raise ConfigurationError(msg)
        base = self._base_sampling_client()
        futures = [
            base.compute_logprobs(self.types.ModelInput.from_ints(d.full_sequence()))
            for d in data
        ]
        out: list[list[float]] = []
        for i, future in enumerate(futures):
            values = list(resolve(future))[1:]
            if len(values) != data[i].length or any(v is None for v in values):
                msg = f"{self.sdk} compute_logprobs returned no logprob for some tokens of data[{i}]"
                raise TrainingError(msg)
            out.append([float(v) for v in values])
        return out

    def get_tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = self.training_client.get_tokenizer()
        return self._tokenizer

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns_service_client:
            close = getattr(self.service_client, "close", None)
            if callable(close):
                try:
                    resolve(close("success"))
                except Exception as exc:  # closing is best effort
                    logger.debug("closing the %s service client failed: %s", self.sdk, exc)

    # --- samplers and hand-off to serving ----------------------------------------------------------------

    def save_weights_and_get_sampler(self, name: str) -> TinkerSampler:
        """A sampler on the current weights (``save_weights_and_get_sampling_client``: ephemeral weights,
        nothing left in storage per step)."""
        self._check_open()
        client = save_weights_and_get_sampling_client(self.training_client, name)
        return TinkerSampler(client, self.types, self.get_tokenizer, name)

    def sampler(self, version: str | None = None, path: str | None = None) -> TinkerSampler:
        """A sampler on the sampler checkpoint at ``path`` (a ``tinker://`` path), or the base model when
        ``version`` is ``None``."""
        self._check_open()
        if version is None:
            return TinkerSampler(self._base_sampling_client(), self.types, self.get_tokenizer, None)
        if path is None:
            msg = f"sampler({version!r}) needs the sampler checkpoint path of that version"
            raise ConfigurationError(msg)
        return TinkerSampler(self.sampling_client_for(path), self.types, self.get_tokenizer, version)

    def sampling_client_for(self, saved: SavedWeights | str) -> Any:
        """A ``SamplingClient`` serving ``saved`` (what the chat model's tinker backend flips to)."""
        self._check_open()
        path = saved.path_or_uri if isinstance(saved, SavedWeights) else str(saved)
        return resolve(self.service_client.create_sampling_client(model_path=path))

    def download_adapter(self, saved: SavedWeights | str, dest: str | os.PathLike[str]) -> Path:
        """Download sampler weights as a PEFT adapter directory at ``dest`` (safetensors only).

        Uses the REST client's checkpoint archive URL (tinker 0.22, the version MinT pins), extracts the tar
        into a temporary sibling and renames it into place. Archives holding pickled weights (``.bin``,
        ``.pt``, ...) or anything besides JSON / safetensors are refused with ``AdapterError``.

        Raises:
            TrainingError: the SDK has no archive download (tinker >= 0.38 removed it; use
                ``tinker checkpoint download`` there).
        """
        self._check_open()
        path = saved.path_or_uri if isinstance(saved, SavedWeights) else str(saved)
        rest = self._rest_client()
        get_url = getattr(rest, "get_checkpoint_archive_url_from_tinker_path", None)
        if get_url is None:
            msg = (
                f"This {self.sdk} SDK cannot download checkpoint archives (tinker >= 0.38 removed "
                "get_checkpoint_archive_url_from_tinker_path); use `tinker checkpoint download` or tinker 0.22"
            )
            raise TrainingError(msg)
        url = resolve(get_url(path)).url
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.download-") as tmp:
            archive = Path(tmp) / "checkpoint.tar"
            _download(url, archive)
            _extract_adapter_archive(archive, dest)
        return dest

    # --- helpers -------------------------------------------------------------------------------------------

    def _base_sampling_client(self) -> Any:
        if self._base_sampler is None:
            self._base_sampler = resolve(self.service_client.create_sampling_client(base_model=self.base_model))
        return self._base_sampler

    def _rest_client(self) -> Any:
        factory = getattr(self.service_client, "create_rest_client", None)
        if callable(factory):
            return resolve(factory())
        rest_client = getattr(self._sdk, "RestClient", None)
        if rest_client is None:
            msg = f"This {self.sdk} SDK has no REST client to download checkpoints with"
            raise TrainingError(msg)
        return rest_client()

    def _check_open(self) -> None:
        if self._closed:
            msg = "This training backend is closed"
            raise TrainingError(msg)


def _client_metrics(
    data: Sequence[Datum], outputs: Sequence[Mapping[str, list[float]]], loss_fn: str
) -> Metrics:
    """Metrics the service does not return, from the trainer logprobs it does."""
    tokens = 0.0
    diff_sum = ratio_sum = 0.0
    ratio_max = 0.0
    for datum, output in zip(data, outputs, strict=True):
        weights = datum.weights()
        tokens += sum(1.0 for w in weights if w > 0)
        if loss_fn == "cross_entropy":
            continue
        for w, s, t in zip(weights, datum.loss_fn_inputs["logprobs"], output["logprobs"], strict=True):
            if w > 0:
                diff = float(s) - float(t)
                ratio = math.exp(-diff)
                diff_sum += diff
                ratio_sum += ratio
                ratio_max = max(ratio_max, ratio)
    metrics: Metrics = {"tokens:sum": tokens}
    if loss_fn != "cross_entropy":
        denom = max(tokens, 1.0)
        metrics.update(
            {
                "kl_sampler_trainer:mean": diff_sum / denom,
                "ratio:mean": ratio_sum / denom,
                "ratio:max": ratio_max,
            }
        )
    return metrics


def _download(url: str, dest: Path) -> None:
    """Stream ``url`` (https only: it is a signed URL from the service) into ``dest``."""
    if urllib.parse.urlsplit(url).scheme != "https":
        msg = f"Refusing to download a checkpoint archive from a non-https URL: {url[:80]!r}"
        raise TrainingError(msg)
    size = 0
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as fh:  # noqa: S310 - https only
        while chunk := response.read(1 << 20):
            size += len(chunk)
            if size > _MAX_ARCHIVE_BYTES:
                msg = f"Checkpoint archive larger than {_MAX_ARCHIVE_BYTES} bytes; refusing"
                raise TrainingError(msg)
            fh.write(chunk)


def _extract_adapter_archive(archive: Path, dest: Path) -> None:
    """Extract a checkpoint tar into ``dest`` after checking it holds only a safetensors PEFT adapter.

    Pickle-format weights are refused by the adapter validator's one list (``is_pickle_file``); the extracted
    directory then goes through the full validator when it is registered and promoted.
    """
    from langchain_metaclaw.adapters.validate import CONFIG_FILE, WEIGHTS_FILE, is_pickle_file
    from langchain_metaclaw.training.backends.checkpoints import atomic_dir

    try:
        tar = tarfile.open(archive)
    except tarfile.TarError as exc:
        msg = f"The downloaded checkpoint is not a tar archive: {exc}"
        raise AdapterError(msg) from exc
    with tar:
        files = [m for m in tar.getmembers() if not m.isdir()]
        for member in files:
            name = Path(member.name).name
            if not member.isfile():
                msg = f"Checkpoint archive member {member.name!r} is not a regular file; refusing"
                raise AdapterError(msg)
            if is_pickle_file(name):
                msg = f"Checkpoint archive holds {member.name!r}, a pickle-format weight file; only safetensors load"
                raise AdapterError(msg)
            if not (name in _ALLOWED_ARCHIVE_NAMES or name.lower().endswith(_ALLOWED_ARCHIVE_SUFFIXES)):
                msg = f"Checkpoint archive holds unexpected file {member.name!r}; refusing"
                raise AdapterError(msg)
        configs = [m for m in files if Path(m.name).name == CONFIG_FILE]
        if len(configs) != 1:
            msg = f"Checkpoint archive must hold exactly one {CONFIG_FILE} (found {len(configs)})"
            raise AdapterError(msg)
        prefix = str(Path(configs[0].name).parent)
        chosen = [m for m in files if str(Path(m.name).parent) == prefix]
        if not any(Path(m.name).name == WEIGHTS_FILE for m in chosen):
            msg = f"Checkpoint archive has no {WEIGHTS_FILE} next to {CONFIG_FILE}"
            raise AdapterError(msg)
        with atomic_dir(dest) as tmp:
            for member in chosen:
                source = tar.extractfile(member)
                if source is None:  # pragma: no cover - checked isfile above
                    continue
                with source, open(tmp / Path(member.name).name, "wb") as fh:
                    shutil.copyfileobj(source, fh)
            try:
                json.loads((tmp / CONFIG_FILE).read_text())
            except ValueError as exc:
                msg = f"{CONFIG_FILE} in the checkpoint archive is not JSON: {exc}"
                raise AdapterError(msg) from exc
