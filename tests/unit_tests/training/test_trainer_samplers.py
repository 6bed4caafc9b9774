"""The trainer samples its on-policy groups and gates its candidate only through the backend's sampler.

Tinker / MinT: against the fake SDK of ``test_tinker_backend`` (the SDK's own class and method names), with
the local engine made to raise, so a run that touched it (loading a ``tinker://`` path into a peft engine,
as the trainer once did) fails. Local: a tiny Llama trains while a fake ``LocalEngine`` records which
adapters the samplers load, pin requests to and unload.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from langchain_metaclaw import TraceStore
from langchain_metaclaw.adapters import AdapterRegistry
from langchain_metaclaw.training.backends.tinker import TinkerTrainingBackend
from langchain_metaclaw.training.trainer import Trainer, TrainerConfig
from tests.unit_tests.training.conftest import build_tiny_llama
from tests.unit_tests.training.test_tinker_backend import make_sdk

BASE = "Qwen/Qwen3-4B-Instruct-2507"
PROMPTS = ["Name a fruit.", "Name a color.", "Name a tool."]


class FakeTokenizer:
    """Chat template = the contents joined; token 100 decodes to "done", 101 to "nope", 2 is EOS."""

    words = {100: "done", 101: "nope"}

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        return "|".join(m["content"] for m in messages) + ">"

    def __call__(self, text, add_special_tokens):
        assert not add_special_tokens
        return {"input_ids": [3 + ord(c) % 90 for c in text]}

    def decode(self, ids, skip_special_tokens):
        return " ".join(self.words[i] for i in ids if i in self.words)


def says_done(prompt, text: str) -> float:
    return 1.0 if "done" in text else 0.0


def _captured(store: TraceStore) -> None:
    """One scored llm turn per prompt, captured with its messages and engine tokens."""
    t = time.time()
    records: list[dict] = [{"type": "episode_start", "id": "e", "started_at": t}]
    for i, prompt in enumerate(PROMPTS):
        records.append({"type": "turn", "id": f"turn-{i}", "seq": i + 1, "episode_id": "e", "kind": "llm",
                        "started_at": t + i, "status": "ok", "node": "model",
                        "input_messages": [{"type": "human", "data": {"content": prompt}}],
                        "output_message": {"type": "ai", "data": {"content": "nope"}},
                        "prompt_token_ids": [5, 6, 7], "completion_token_ids": [101, 2],
                        "logprobs": [-1.0, -0.5], "tokens_source": "engine", "adapter_version": None})
    store.write_records(records)
    for i in range(len(PROMPTS)):
        store.add_score(f"turn-{i}", 0.0, source="rule:done")


@pytest.fixture
def no_local_engine(monkeypatch):
    """Any use of the local engine fails the test."""
    from langchain_metaclaw.engine import local

    def refuse(*args, **kwargs):
        raise AssertionError("the local engine was used")

    monkeypatch.setattr(local.LocalEngine, "load_adapter", refuse)
    monkeypatch.setattr(local.LocalEngine, "__init__", refuse)
    monkeypatch.setattr(local, "shared_engine", refuse)


@pytest.mark.parametrize("sdk_name", ["tinker", "mint"])
@pytest.mark.parametrize("futures", [False, True], ids=["0.22", "0.38"])
def test_a_tinker_run_samples_and_gates_through_the_sdk_sampling_client(
    tmp_path, monkeypatch, no_local_engine, sdk_name, futures
):
    sdk = make_sdk(sdk_name, futures=futures)
    monkeypatch.setitem(sys.modules, sdk_name, sdk)
    store = TraceStore(f"sqlite:///{tmp_path / 't.db'}")
    _captured(store)
    backend = TinkerTrainingBackend(BASE, 8, sdk=sdk_name)
    backend.training_client.get_tokenizer = FakeTokenizer
    cfg = TrainerConfig(backend=sdk_name, base_model=BASE, group_size=2, group_prompts=2, max_steps=2,
                        eval_prompts=2, max_new_tokens=5)

    run = Trainer(store, cfg, reward_fn=says_done, backend=backend).run()

    assert run.status == "ok" and run.steps == 2, run.reason
    assert run.reason == "promoted: held-out reward 0.000 -> 1.000"
    service = sdk.ServiceClient.instances[-1]
    base, step1, step2, candidate = service.sampling_clients
    # step 1 samples from the serving weights (the base model), step 2 from the weights step 1 trained
    assert base.base_model == BASE and (step1.weights, step2.weights) != (None, None)
    for client in (base, step1):
        groups = [(n, p.temperature, p.max_tokens) for _, n, p in client.samples if p.temperature]
        assert groups == [(2, 1.0, 5), (2, 1.0, 5)]  # two prompts, two completions each
    assert not step2.samples  # taken after the last step; closed unused
    # the gate: greedy answers to the held-out prompt from the serving version and from the candidate
    assert [p.temperature for _, _, p in candidate.samples] == [0.0]
    assert [p.temperature for _, _, p in base.samples][-1] == 0.0
    assert candidate.model_path == f"tinker://run-1:train:0/sampler_weights/cand-{run.id[:8]}"
    names = [c[0] for c in backend.training_client.calls]
    assert names.count("forward_backward") == 2 and names.count("save_weights_and_get_sampling_client") == 2
    assert "load_state" not in names and "load_state_with_optimizer" not in names
    # what was trained: the prompt's tokens then the sampled completion, advantage +-0.5 (reward 1 vs 0)
    _, data, loss_fn, _ = next(c for c in backend.training_client.calls if c[0] == "forward_backward")
    assert loss_fn == "importance_sampling" and len(data) == 4
    assert sorted(max(d.loss_fn_inputs["advantages"].data) for d in data) == [0.0, 0.0, 0.5, 0.5]
    serving = AdapterRegistry(store).current()
    assert serving.version == run.candidate_adapter and serving.uri == candidate.model_path


class FakeEngine:
    """The public surface of ``LocalEngine`` the local sampler uses, recording what it was asked."""

    def __init__(self) -> None:
        self.adapters: list[str] = []
        self.loaded: list[tuple[str, str]] = []
        self.unloaded: list[str] = []
        self.pinned: list[str | None] = []

    def load_adapter(self, name: str, path: str) -> None:
        assert name not in self.adapters and (Path(path) / "adapter_model.safetensors").is_file()
        self.adapters.append(name)
        self.loaded.append((name, path))

    def unload_adapter(self, name: str) -> None:
        self.adapters.remove(name)
        self.unloaded.append(name)

    def sample_group(self, prompt, *, n, adapter, max_new_tokens, temperature, seed):
        self.pinned.append(adapter)
        return [SimpleNamespace(prompt_token_ids=list(range(10, 20)), completion_token_ids=[100 + i, 2],
                                logprobs=[-0.5, -0.1], text="done" if i == 0 else "nope") for i in range(n)]

    def generate_batch(self, prompts, *, adapter, max_new_tokens):
        self.pinned.append(adapter)
        return [SimpleNamespace(text="nope" if adapter is None else "done") for _ in prompts]


def test_a_local_run_samples_from_each_step_through_the_engine(tmp_path, make_backend):
    store = TraceStore(f"sqlite:///{tmp_path / 't.db'}")
    _captured(store)
    engine = FakeEngine()
    # the candidate is validated against its base before it serves: give the tiny model a config to read
    model = build_tiny_llama()
    base_dir = tmp_path / "tiny-llama"
    model.config.save_pretrained(base_dir)
    model.config._name_or_path = str(base_dir)
    backend = make_backend(engine=engine, model=model)
    cfg = TrainerConfig(group_size=2, group_prompts=2, max_steps=2, eval_prompts=2, low_priority=False,
                        base_model=str(base_dir))

    run = Trainer(store, cfg, reward_fn=says_done, backend=backend).run()

    assert run.status == "ok" and run.steps == 2, run.reason
    assert run.reason == "promoted: held-out reward 0.000 -> 1.000"
    step = run.id[:8]
    # groups: step 1 from the base model, step 2 from step 1's weights; then the gate: base, candidate
    assert engine.pinned == [None, None, f"{step}-s1", f"{step}-s1", None, run.candidate_adapter]
    assert [name for name, _ in engine.loaded] == [f"{step}-s1", f"{step}-s2", run.candidate_adapter]
    # step checkpoints are the run's own and are unloaded; the candidate may serve, so it stays
    assert engine.unloaded == [f"{step}-s1", f"{step}-s2"]
    assert engine.adapters == [run.candidate_adapter]
