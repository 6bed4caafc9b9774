"""The tinker / MinT backend against a fake of the SDK's own interface (no network, no key).

The fake mirrors tinker's surface: ``ServiceClient`` whose factories return either the client (0.22, the
version MinT pins) or a future of it (0.38), ``types.Datum`` / ``ModelInput`` / ``TensorData`` /
``AdamParams`` (strict), request methods returning futures with ``.result()``. Every test asserts the
exact data sent.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import tarfile
import types as pytypes
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from langchain_metaclaw.errors import AdapterError, BackendUnavailableError, ConfigurationError, TrainingError
from langchain_metaclaw.training import AdamParams, SavedWeights, TrainingBackend, datum_from_tokens
from langchain_metaclaw.training.backends import get_backend
from langchain_metaclaw.training.backends import tinker as tinker_backend
from langchain_metaclaw.training.backends.tinker import TinkerTrainingBackend

# --- the fake SDK --------------------------------------------------------------------------------------


class Future:
    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self, timeout: float | None = None) -> Any:
        return self.value


class TensorData:
    def __init__(self, data=None, dtype=None, shape=None):
        if dtype not in ("int64", "float32"):
            raise TypeError(f"bad dtype {dtype!r}")
        self.data, self.dtype, self.shape = list(data), dtype, shape

    def tolist(self):
        return list(self.data)


class ModelInput:
    def __init__(self, tokens):
        self.tokens = tokens

    @classmethod
    def from_ints(cls, tokens):
        assert all(type(t) is int for t in tokens)
        return cls(list(tokens))

    def to_ints(self):
        return list(self.tokens)


@dataclass(frozen=True)
class Datum:
    model_input: ModelInput
    loss_fn_inputs: dict = field(default_factory=dict)


class AdamParams_:  # strict like tinker's pydantic model: keyword-only, no extras
    def __init__(self, *, learning_rate, beta1, beta2, eps, weight_decay, grad_clip_norm):
        self.__dict__.update(locals())
        del self.__dict__["self"]


@dataclass
class FBOutput:
    loss_fn_outputs: list
    metrics: dict
    loss_fn_output_type: str = "ArrayRecord"


class TrainingClient:
    def __init__(self, service):
        self.service = service
        self.calls: list[tuple] = []
        self.trainer_logprob = -1.0

    def _outputs(self, data):
        return [
            {"logprobs": TensorData([self.trainer_logprob] * d.model_input.tokens.__len__(), "float32")}
            for d in data
        ]

    def forward_backward(self, data, loss_fn, loss_fn_config=None):
        self.calls.append(("forward_backward", data, loss_fn, loss_fn_config))
        return Future(FBOutput(self._outputs(data), {"loss:sum": 1.5}))

    def forward(self, data, loss_fn, loss_fn_config=None):
        self.calls.append(("forward", data, loss_fn, loss_fn_config))
        return Future(FBOutput(self._outputs(data), {}))

    def optim_step(self, adam_params):
        self.calls.append(("optim_step", adam_params))
        return Future(pytypes.SimpleNamespace(metrics={"optimizer:lr": adam_params.learning_rate}))

    def save_weights_for_sampler(self, name, ttl_seconds=None):
        self.calls.append(("save_weights_for_sampler", name))
        return Future(pytypes.SimpleNamespace(path=f"tinker://run-1:train:0/sampler_weights/{name}"))

    def save_state(self, name, ttl_seconds=None, overwrite=False):
        self.calls.append(("save_state", name))
        return Future(pytypes.SimpleNamespace(path=f"tinker://run-1:train:0/weights/{name}"))

    def load_state_with_optimizer(self, path, weights_access_token=None):
        self.calls.append(("load_state_with_optimizer", path))
        return Future(pytypes.SimpleNamespace(path=path))

    def load_state(self, path, weights_access_token=None):
        self.calls.append(("load_state", path))
        return Future(pytypes.SimpleNamespace(path=path))

    def save_weights_and_get_sampling_client(self, name=None, retry_config=None):  # 0.38: name deprecated
        self.calls.append(("save_weights_and_get_sampling_client", name))
        client = SamplingClient(model_path=None, base_model=None, weights=f"step-{len(self.calls)}")
        self.service.sampling_clients.append(client)
        return Future(client)

    def get_tokenizer(self):
        return "tokenizer"


@dataclass
class SamplingParams:
    max_tokens: int | None = None
    seed: int | None = None
    stop: Any = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0


@dataclass
class SampledSequence:
    stop_reason: str
    tokens: list
    logprobs: list | None = None


@dataclass
class SampleResponse:
    sequences: list
    prompt_logprobs: list | None = None


class SamplingClient:
    """Samples ``num_samples`` sequences ``[100 + i, 2]``; greedy answers ``[101, 2]`` from the base model and
    ``[100, 2]`` from any trained weights."""

    def __init__(self, model_path=None, base_model=None, weights=None):
        self.model_path, self.base_model = model_path, base_model
        self.weights = weights or model_path or base_model
        self.prompts: list[list[int]] = []
        self.samples: list[tuple[list[int], int, SamplingParams]] = []

    def compute_logprobs(self, prompt):
        self.prompts.append(prompt.to_ints())
        return Future([None] + [-0.25] * (len(prompt.to_ints()) - 1))

    def sample(self, prompt, num_samples, sampling_params, include_prompt_logprobs=False, topk_prompt_logprobs=0):
        assert isinstance(prompt, ModelInput) and isinstance(sampling_params, SamplingParams)
        self.samples.append((prompt.to_ints(), num_samples, sampling_params))
        greedy = 101 if self.base_model else 100
        rows = [greedy if sampling_params.temperature == 0 else 100 + i for i in range(num_samples)]
        return Future(SampleResponse([SampledSequence("stop", [t, 2], [-0.5, -0.1]) for t in rows]))


class RestClient:
    archive_url = "https://storage.example/ckpt.tar?sig=1"

    def __init__(self):
        self.requested: list[str] = []

    def get_checkpoint_archive_url_from_tinker_path(self, tinker_path):
        self.requested.append(tinker_path)
        return Future(pytypes.SimpleNamespace(url=self.archive_url, expires=None))


def make_sdk(name: str, *, futures: bool) -> pytypes.ModuleType:
    """A module shaped like ``tinker`` (or ``mint``, which re-exports tinker's names)."""
    module = pytypes.ModuleType(name)
    module.types = pytypes.SimpleNamespace(
        Datum=Datum, ModelInput=ModelInput, TensorData=TensorData, AdamParams=AdamParams_, SamplingParams=SamplingParams
    )
    wrap = Future if futures else (lambda value: value)

    class ServiceClient:
        instances: list = []

        def __init__(self, **kwargs):
            self.kwargs = kwargs
            self.env = {k: os.environ.get(k) for k in ("TINKER_API_KEY", "TINKER_BASE_URL")}
            self.training_kwargs = None
            self.sampling_clients: list[SamplingClient] = []
            self.rest = RestClient()
            self.closed = None
            ServiceClient.instances.append(self)

        def create_lora_training_client(self, **kwargs):
            self.training_kwargs = kwargs
            self.training_client = TrainingClient(self)
            return wrap(self.training_client)

        def create_training_client_from_state_with_optimizer(self, path):
            self.training_kwargs = {"from_state": path}
            self.training_client = TrainingClient(self)
            return wrap(self.training_client)

        def create_sampling_client(self, model_path=None, base_model=None, retry_config=None):
            client = SamplingClient(model_path=model_path, base_model=base_model)
            self.sampling_clients.append(client)
            return wrap(client)

        def create_rest_client(self):
            return self.rest

        def close(self, status, detail=None):
            self.closed = status
            return Future(None)

    module.ServiceClient = ServiceClient
    if name == "mint":

        def sync_env():  # mint.mint.sync_env, as in mindlab-toolkit 0.2.0
            if "MINT_API_KEY" in os.environ:
                os.environ["TINKER_API_KEY"] = os.environ["MINT_API_KEY"]
            if "MINT_BASE_URL" in os.environ:
                os.environ["TINKER_BASE_URL"] = os.environ["MINT_BASE_URL"]
            else:
                os.environ.setdefault("TINKER_BASE_URL", "https://mint.macaron.xin")

        module.mint = pytypes.SimpleNamespace(sync_env=sync_env)
    return module


@pytest.fixture(
    params=[("tinker", False), ("tinker", True), ("mint", False), ("mint", True)],
    ids=lambda p: f"{p[0]}-{'0.38' if p[1] else '0.22'}",
)
def sdk(request, monkeypatch):
    name, futures = request.param
    module = make_sdk(name, futures=futures)
    monkeypatch.setitem(sys.modules, name, module)
    for var in ("TINKER_API_KEY", "TINKER_BASE_URL", "MINT_API_KEY", "MINT_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    return module


@pytest.fixture
def backend(sdk):
    b = TinkerTrainingBackend("Qwen/Qwen3-4B-Instruct-2507", 16, sdk=sdk.__name__, seed=7)
    yield b
    b.close()


def sent(td: TensorData) -> tuple[str, list]:
    return td.dtype, td.data


# --- tests ---------------------------------------------------------------------------------------------


def test_creates_a_lora_training_client(backend, sdk):
    service = sdk.ServiceClient.instances[-1]
    assert isinstance(backend, TrainingBackend)
    assert service.kwargs == {}
    assert service.training_kwargs == {
        "base_model": "Qwen/Qwen3-4B-Instruct-2507",
        "rank": 16,
        "seed": 7,
        "train_mlp": True,
        "train_attn": True,
        "train_unembed": False,
    }
    assert isinstance(backend.training_client, TrainingClient)  # futures unwrapped on 0.38
    assert backend.get_tokenizer() == "tokenizer"


def test_importance_sampling_sends_exact_data(backend):
    datum = datum_from_tokens([5, 6, 7], [8, 9], [-0.5, -0.25], 2.0, weights=[1.0, 0.5])
    out = backend.forward_backward([datum], "importance_sampling")
    ((name, data, loss_fn, config),) = backend.training_client.calls
    assert (name, loss_fn, config) == ("forward_backward", "importance_sampling", None)
    (d,) = data
    assert isinstance(d, Datum)
    assert d.model_input.tokens == [5, 6, 7, 8]
    assert set(d.loss_fn_inputs) == {"target_tokens", "logprobs", "advantages"}
    assert sent(d.loss_fn_inputs["target_tokens"]) == ("int64", [6, 7, 8, 9])
    assert sent(d.loss_fn_inputs["logprobs"]) == ("float32", [0.0, 0.0, -0.5, -0.25])
    assert sent(d.loss_fn_inputs["advantages"]) == ("float32", [0.0, 0.0, 2.0, 1.0])  # A * weights
    assert d.loss_fn_inputs["target_tokens"].shape == [4]
    assert out.loss_fn_outputs == [{"logprobs": [-1.0] * 4}]
    assert out.metrics["loss:sum"] == 1.5
    assert out.metrics["tokens:sum"] == 2
    assert out.metrics["kl_sampler_trainer:mean"] == pytest.approx(((-0.5 + 1.0) + (-0.25 + 1.0)) / 2)
    assert out.metrics["ratio:max"] == pytest.approx(math.exp(-0.5))


def test_cross_entropy_and_ppo_payloads(backend):
    datum = datum_from_tokens([1, 2], [3], [-0.1], 1.0)
    backend.forward_backward([datum], "cross_entropy")
    backend.forward_backward([datum], "ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1})
    (_, ce_data, ce_name, ce_config), (_, ppo_data, ppo_name, ppo_config) = backend.training_client.calls
    assert (ce_name, ce_config) == ("cross_entropy", None)
    assert set(ce_data[0].loss_fn_inputs) == {"target_tokens", "weights"}
    assert sent(ce_data[0].loss_fn_inputs["weights"]) == ("float32", [0.0, 1.0])
    assert (ppo_name, ppo_config) == ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1})


def test_optim_step_sends_strict_adam_params(backend):
    result = backend.optim_step(AdamParams(learning_rate=2e-4, weight_decay=0.01))
    ((name, params),) = backend.training_client.calls
    assert name == "optim_step"
    assert vars(params) == {
        "learning_rate": 2e-4,
        "beta1": 0.9,
        "beta2": 0.95,
        "eps": 1e-8,
        "weight_decay": 0.01,
        "grad_clip_norm": 1.0,
    }
    assert result.metrics == {"optimizer:lr": 2e-4, "learning_rate": 2e-4, "step": 1.0}


def test_kl_penalty_shapes_advantages(backend, sdk):
    a = datum_from_tokens([1, 2], [3, 4], [-1.0, -2.0], 1.0).with_inputs(ref_logprobs=[0.0, -1.5, -1.0])
    b = datum_from_tokens([1], [5], [-0.5], -1.0)  # no reference: computed with the base sampler
    out = backend.forward_backward([a, b], "importance_sampling", {"kl_coef": 0.5})
    ((_, data, _, config),) = backend.training_client.calls
    assert config is None  # kl_coef is ours, never sent
    service = sdk.ServiceClient.instances[-1]
    (sampler,) = service.sampling_clients
    assert sampler.base_model == "Qwen/Qwen3-4B-Instruct-2507"
    assert sampler.prompts == [[1, 5]]
    # diffs (sampler - ref) on weighted tokens: a: -1 - -1.5 = 0.5, -2 - -1 = -1; b: -0.5 - -0.25 = -0.25
    mean = (0.5 - 1.0 - 0.25) / 3
    assert out.metrics["kl_ref:mean"] == pytest.approx(mean)
    assert data[0].loss_fn_inputs["advantages"].data == pytest.approx(
        [0.0, 1.0 + 0.5 * (mean - 0.5), 1.0 + 0.5 * (mean + 1.0)]
    )
    assert data[1].loss_fn_inputs["advantages"].data == pytest.approx([-1.0 + 0.5 * (mean + 0.25)])
    with pytest.raises(ConfigurationError, match="only the local backend"):
        backend.forward_backward([a], "cross_entropy", {"kl_coef": 0.1})


def test_compute_logprobs_current_and_base(backend, sdk):
    datum = datum_from_tokens([1, 2], [3], [-0.1], 1.0)
    assert backend.compute_logprobs([datum]) == [[-1.0, -1.0]]
    ((name, data, loss_fn, _),) = backend.training_client.calls
    assert (name, loss_fn, data[0].model_input.tokens) == ("forward", "cross_entropy", [1, 2])
    assert backend.compute_logprobs([datum], model="base") == [[-0.25, -0.25]]
    assert sdk.ServiceClient.instances[-1].sampling_clients[0].prompts == [[1, 2, 3]]


def test_checkpoints_and_sampling_handoff(backend, sdk):
    saved = backend.save_weights_for_sampler("v3")
    assert saved == SavedWeights("tinker://run-1:train:0/sampler_weights/v3", "v3", step=0)
    assert backend.save_state("s1") == "tinker://run-1:train:0/weights/s1"
    backend.load_state("tinker://run-1:train:0/weights/s1")
    assert backend.training_client.calls[-1] == (
        "load_state_with_optimizer",
        "tinker://run-1:train:0/weights/s1",
    )
    client = backend.sampling_client_for(saved)
    assert isinstance(client, SamplingClient) and client.model_path == saved.path_or_uri


def test_resume_from_state(sdk):
    b = TinkerTrainingBackend("m", sdk=sdk.__name__, resume_from="tinker://r/weights/s")
    assert sdk.ServiceClient.instances[-1].training_kwargs == {"from_state": "tinker://r/weights/s"}
    b.close()


def test_close_only_closes_its_own_service_client(sdk):
    own = TinkerTrainingBackend("m", sdk=sdk.__name__)
    own.close()
    assert sdk.ServiceClient.instances[-1].closed == "success"
    with pytest.raises(TrainingError, match="closed"):
        own.optim_step(AdamParams())
    shared = sdk.ServiceClient()
    TinkerTrainingBackend("m", sdk=sdk.__name__, service_client=shared).close()
    assert shared.closed is None


def test_get_backend_builds_the_named_sdk(sdk):
    b = get_backend(sdk.__name__, base_model="m", api_key="sk-abc", base_url="https://x.example")
    assert b.sdk == sdk.__name__
    assert sdk.ServiceClient.instances[-1].kwargs == {"api_key": "sk-abc", "base_url": "https://x.example"}


def test_mint_environment_is_mapped_by_mints_sync_env(monkeypatch):
    module = make_sdk("mint", futures=False)
    monkeypatch.setitem(sys.modules, "mint", module)
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    monkeypatch.delenv("TINKER_BASE_URL", raising=False)
    monkeypatch.setenv("MINT_API_KEY", "sk-mint")
    monkeypatch.delenv("MINT_BASE_URL", raising=False)
    TinkerTrainingBackend("m", sdk="mint")
    assert module.ServiceClient.instances[-1].env == {
        "TINKER_API_KEY": "sk-mint",
        "TINKER_BASE_URL": "https://mint.macaron.xin",
    }


@pytest.mark.parametrize("name", ["tinker", "mint"])
def test_missing_sdk_names_the_extra(monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(BackendUnavailableError, match=rf"langchain-metaclaw\[{name}\]") as info:
        get_backend(name, base_model="m")
    assert info.value.extra == name


def test_validation(backend):
    datum = datum_from_tokens([1], [2], [0.0], 1.0)
    with pytest.raises(ConfigurationError, match="Unknown loss_fn"):
        backend.forward_backward([datum], "dro")
    with pytest.raises(ConfigurationError, match="not understood"):
        backend.forward_backward([datum], "importance_sampling", {"beta": 0.1})
    with pytest.raises(ConfigurationError, match="sdk must be"):
        TinkerTrainingBackend("m", sdk="other")


# --- adapter download ------------------------------------------------------------------------------------


def make_tar(path: Path, files: dict[str, bytes], *, symlink: str | None = None) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return path


ADAPTER = {
    "ckpt/adapter_config.json": json.dumps({"peft_type": "LORA", "r": 16}).encode(),
    "ckpt/adapter_model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ",
    "ckpt/checkpoint_complete": b"",
}


@pytest.fixture
def serve_archive(monkeypatch, tmp_path):
    fetched: list[str] = []

    def serve(files, **kw):
        archive = make_tar(tmp_path / "served.tar", files, **kw)

        def fake_download(url, dest):
            fetched.append(url)
            dest.write_bytes(archive.read_bytes())

        monkeypatch.setattr(tinker_backend, "_download", fake_download)
        return fetched

    return serve


def test_download_adapter_extracts_a_safetensors_adapter(backend, sdk, serve_archive, tmp_path):
    fetched = serve_archive(ADAPTER)
    saved = backend.save_weights_for_sampler("v1")
    dest = backend.download_adapter(saved, tmp_path / "adapters" / "v1")
    assert sdk.ServiceClient.instances[-1].rest.requested == [saved.path_or_uri]
    assert fetched == [RestClient.archive_url]
    assert sorted(p.name for p in dest.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "checkpoint_complete",
    ]
    assert sorted(p.name for p in dest.parent.iterdir()) == ["v1"]  # no temporary directory left


@pytest.mark.parametrize(
    ("files", "kwargs", "match"),
    [
        ({**ADAPTER, "ckpt/adapter_model.bin": b"\x80\x04"}, {}, "pickle-format"),
        ({"ckpt/adapter_config.json": b"{}", "ckpt/adapter_model.pt": b"PK"}, {}, "pickle-format"),
        ({"ckpt/adapter_config.json": b"{}"}, {}, "no adapter_model.safetensors"),
        ({**ADAPTER, "ckpt/run.sh": b"rm -rf /"}, {}, "unexpected file"),
        (ADAPTER, {"symlink": "ckpt/link.json"}, "not a regular file"),
        ({**ADAPTER, "ckpt/adapter_config.json": b"not json"}, {}, "not JSON"),
    ],
)
def test_download_adapter_refuses_unsafe_archives(backend, serve_archive, tmp_path, files, kwargs, match):
    serve_archive(files, **kwargs)
    with pytest.raises(AdapterError, match=match):
        backend.download_adapter("tinker://run-1:train:0/sampler_weights/v1", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_download_refuses_non_https(tmp_path):
    with pytest.raises(TrainingError, match="non-https"):
        tinker_backend._download("file:///etc/passwd", tmp_path / "x.tar")


def test_download_adapter_without_archive_api(backend, sdk, tmp_path):
    service = sdk.ServiceClient.instances[-1]
    service.rest = object()  # tinker 0.38's RestClient has no archive URL
    with pytest.raises(TrainingError, match="tinker checkpoint download"):
        backend.download_adapter("tinker://r/sampler_weights/v1", tmp_path / "dest")


def test_conversion_is_accepted_by_the_installed_sdk_types():
    """Our payload against the real ``tinker.types`` (whichever version is installed; 0.22 checked by hand)."""
    real = pytest.importorskip("tinker")
    datum = datum_from_tokens([5, 6, 7], [8, 9], [-0.5, -0.25], 2.0, weights=[1.0, 0.5])
    converted = tinker_backend.to_sdk_datum(real.types, datum, "importance_sampling")
    assert isinstance(converted, real.types.Datum)
    assert converted.model_input.to_ints() == [5, 6, 7, 8]
    inputs = {k: (v.dtype, v.tolist()) for k, v in converted.loss_fn_inputs.items()}
    assert inputs == {
        "target_tokens": ("int64", [6, 7, 8, 9]),
        "logprobs": ("float32", [0.0, 0.0, -0.5, -0.25]),
        "advantages": ("float32", [0.0, 0.0, 2.0, 1.0]),
    }
    p = AdamParams()
    fields = dict(vars(p))
    assert real.types.AdamParams(**fields).model_dump() == fields  # strict: our fields are exactly theirs
