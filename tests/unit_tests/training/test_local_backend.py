"""The local peft backend on a tiny seeded Llama (the TestHotSwapping style: numbers, not mocks)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from tests.unit_tests.training.conftest import build_tiny_llama, random_rl_data

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from langchain_metaclaw.errors import AdapterError, ConfigurationError, TrainingError  # noqa: E402
from langchain_metaclaw.training import AdamParams, Datum, TrainingBackend, datum_from_tokens  # noqa: E402
from langchain_metaclaw.training.backends.micro_batches import plan_micro_batches, shared_prefix_groups  # noqa: E402

LR = AdamParams(learning_rate=1e-2)


def lora_params(backend) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in backend._trainable}


def grads(backend) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in backend._trainable}


def ce_loss(backend, data) -> float:
    logprobs = backend.compute_logprobs(data)
    return -sum(
        lp * w for d, row in zip(data, logprobs, strict=True) for lp, w in zip(row, d.weights(), strict=True)
    )


def flat(rows) -> list[float]:
    return [x for row in rows for x in row]


def completion_logprob(backend, data) -> float:
    return -ce_loss(backend, data)


def test_plan_micro_batches_respects_the_budget():
    lengths = [5, 100, 40, 60, 10, 300, 7, 41]
    batches = plan_micro_batches(lengths, token_budget=120)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) == 1 or longest * len(batch) <= 120
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
    assert [300] in [[lengths[i] for i in b] for b in batches]  # over budget: alone
    with pytest.raises(ValueError):
        plan_micro_batches([1], 0)


def test_is_a_training_backend(make_backend):
    backend = make_backend()
    assert isinstance(backend, TrainingBackend)
    assert backend.base_model == "unnamed"


def test_cross_entropy_step_changes_lora_and_lowers_loss(make_backend, tiny_model):
    before_base = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    backend = make_backend(model=tiny_model)
    data = random_rl_data(6, seed=1)
    initial = lora_params(backend)
    loss_before = ce_loss(backend, data)

    out = backend.forward_backward(data, "cross_entropy")
    assert out.metrics["loss:sum"] == pytest.approx(loss_before, rel=1e-5)
    assert out.metrics["tokens:sum"] == sum(sum(1 for w in d.weights() if w > 0) for d in data)
    assert out.metrics["entropy:mean"] > 0
    assert [len(o["logprobs"]) for o in out.loss_fn_outputs] == [d.length for d in data]
    step = backend.optim_step(LR)
    assert step.metrics["step"] == 1.0 and step.metrics["grad_norm"] > 0

    after = lora_params(backend)
    changed = [n for n in initial if not torch.equal(initial[n], after[n])]
    assert any("lora_B" in n for n in changed)
    assert ce_loss(backend, data) < loss_before
    # The caller's model is untouched: peft wrapped a copy that shares (frozen) weights.
    for n, p in tiny_model.named_parameters():
        assert torch.equal(p, before_base[n])


def test_importance_sampling_positive_advantage_raises_sampled_logprobs(make_backend):
    backend = make_backend()
    tokens = list(range(30, 50))
    probe = datum_from_tokens(tokens[:8], tokens[8:], None, 1.0)
    sampler = backend.compute_logprobs([probe])[0]  # on-policy: behaviour = current policy
    data = [
        probe.with_inputs(
            logprobs=[lp if w > 0 else 0.0 for lp, w in zip(sampler, probe.weights(), strict=True)]
        )
    ]
    before = completion_logprob(backend, data)
    out = backend.forward_backward(data, "importance_sampling")
    assert out.metrics["ratio:mean"] == pytest.approx(1.0, abs=1e-5)
    assert out.metrics["kl_sampler_trainer:mean"] == pytest.approx(0.0, abs=1e-5)
    backend.optim_step(LR)
    raised = completion_logprob(backend, data)
    assert raised > before

    negative = [data[0].with_inputs(advantages=[-a for a in data[0].loss_fn_inputs["advantages"]])]
    backend.forward_backward(negative, "importance_sampling")
    backend.optim_step(LR)
    assert completion_logprob(backend, data) < raised


def test_micro_batching_gives_the_same_gradients_as_one_batch(make_backend):
    data = random_rl_data(9, seed=2, min_len=3, max_len=60)
    small = make_backend(token_budget=64)
    big = make_backend(token_budget=100_000)
    warm_up(small, big)
    for name, value in lora_params(small).items():
        assert torch.equal(value, lora_params(big)[name])

    out_small = small.forward_backward(data, "ppo")
    out_big = big.forward_backward(data, "ppo")
    assert out_small.metrics["micro_batches:sum"] > 2
    assert out_big.metrics["micro_batches:sum"] == 1
    assert out_small.metrics["padding_frac:mean"] < out_big.metrics["padding_frac:mean"]
    assert_same_step(small, out_small, big, out_big)


def warm_up(*backends) -> None:
    """One identical step (a single short datum: one identical micro-batch in each), so lora_B is non-zero
    and every LoRA matrix gets a gradient in the step under test."""
    warmup = random_rl_data(1, seed=3, max_len=30)
    for backend in backends:
        backend.forward_backward(warmup, "cross_entropy")
        backend.optim_step(LR)


def assert_same_step(a, out_a, b, out_b) -> None:
    """Two forward_backward calls gave the same loss, logprobs and (non-zero) gradients."""
    assert out_a.metrics["loss:sum"] == pytest.approx(out_b.metrics["loss:sum"], rel=1e-4)
    for x, y in zip(out_a.loss_fn_outputs, out_b.loss_fn_outputs, strict=True):
        assert torch.allclose(torch.tensor(x["logprobs"]), torch.tensor(y["logprobs"]), atol=1e-5)
    g_a, g_b = grads(a), grads(b)
    assert any(g.abs().sum() > 0 for n, g in g_b.items() if "lora_A" in n)
    for name in g_b:
        assert torch.allclose(g_a[name], g_b[name], rtol=1e-4, atol=1e-6), name


def _groups_of_completions(seed: int = 4) -> list[Datum]:
    """3 prompts x 4 sampled completions of different lengths, plus 2 data with a prompt of their own."""
    import random

    rng = random.Random(seed)
    data = []
    for prompt_len in (9, 14, 20):
        prompt = [rng.randrange(256) for _ in range(prompt_len)]
        for _ in range(4):
            completion = [rng.randrange(256) for _ in range(rng.randint(1, 12))]
            data.append(datum_from_tokens(prompt, completion, [-3.0] * len(completion), rng.uniform(-1, 1)))
    data += random_rl_data(2, seed=seed, min_len=12, max_len=30)
    rng.shuffle(data)
    return data


def test_a_shared_prompt_runs_once_with_the_same_gradients(make_backend):
    data = _groups_of_completions()
    groups, alone = shared_prefix_groups(data)
    # the last prompt token predicts the first completion token: it is weighted, the rest is shared
    assert sorted(p for p, _ in groups) == [8, 13, 19] and all(len(m) == 4 for _, m in groups)
    assert len(alone) == 2
    shared = make_backend(token_budget=40)  # a group of 4 completions of up to 12 tokens needs 2
    whole = make_backend(token_budget=40, share_prefixes=False)
    warm_up(shared, whole)

    out_shared = shared.forward_backward(data, "importance_sampling")
    out_whole = whole.forward_backward(data, "importance_sampling")
    assert out_shared.metrics["shared_prefix_tokens:sum"] == 3 * (8 + 13 + 19)
    assert out_whole.metrics["shared_prefix_tokens:sum"] == 0
    assert out_shared.metrics["tokens:sum"] == out_whole.metrics["tokens:sum"]
    assert_same_step(shared, out_shared, whole, out_whole)


def test_save_weights_for_sampler_reloads_with_peft(make_backend):
    backend = make_backend()
    data = random_rl_data(4, seed=4)
    backend.forward_backward(data, "cross_entropy")
    backend.optim_step(LR)
    saved = backend.save_weights_for_sampler("v1")
    path = Path(saved.path_or_uri)
    assert saved.name == "v1" and saved.step == 1
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in path.iterdir()}

    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    backend.model.eval()
    with torch.no_grad():
        expected = backend.model(input_ids=ids).logits
        base = backend.model.get_base_model()
    reloaded = peft.PeftModel.from_pretrained(build_tiny_llama(), str(path)).eval()
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
        assert torch.allclose(got, expected, atol=1e-5)
        # The serving pattern: a second version under its own name, pinned per request.
        reloaded.load_adapter(str(path), adapter_name="v1")
        pinned = reloaded(input_ids=ids, adapter_names=["v1"]).logits
        assert torch.allclose(pinned, expected, atol=1e-5)
        with reloaded.disable_adapter():
            assert not torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-5)
    assert base is not None


def test_save_state_then_resume_matches_an_uninterrupted_run(make_backend, tmp_path):
    batch1, batch2 = random_rl_data(5, seed=5), random_rl_data(5, seed=6)
    first = make_backend(output_dir=tmp_path / "a")
    first.forward_backward(batch1, "importance_sampling")
    first.optim_step(LR)
    state_path = first.save_state("step-1")
    first.forward_backward(batch2, "importance_sampling")
    first.optim_step(LR)

    resumed = make_backend(output_dir=tmp_path / "b", seed=123)  # different LoRA init: the state must win
    resumed.load_state(state_path)
    assert resumed.step == 1
    resumed.forward_backward(batch2, "importance_sampling")
    resumed.optim_step(LR)
    assert resumed.step == 2
    expected, got = lora_params(first), lora_params(resumed)
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-6), name
    opt_a, opt_b = first._optimizer.state_dict(), resumed._optimizer.state_dict()
    for idx, state in opt_a["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.allclose(opt_b["state"][idx][key], state[key], atol=1e-7)


def test_load_state_rejects_a_different_lora_config(make_backend, tmp_path):
    backend = make_backend(output_dir=tmp_path / "a")
    path = backend.save_state("s")
    other = make_backend(output_dir=tmp_path / "b", rank=4)
    with pytest.raises(AdapterError, match="LoRA config"):
        other.load_state(path)
    with pytest.raises(AdapterError, match="not a training state"):
        other.load_state(str(tmp_path / "missing"))


def test_no_pickle_is_written(make_backend, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle/torch.save used for a checkpoint")

    backend = make_backend(output_dir=tmp_path / "out")
    backend.forward_backward(random_rl_data(3, seed=7), "cross_entropy")
    backend.optim_step(LR)
    monkeypatch.setattr(torch, "save", refuse)
    monkeypatch.setattr(pickle, "dump", refuse)
    monkeypatch.setattr(pickle, "dumps", refuse)
    backend.save_weights_for_sampler("v1")
    state = backend.save_state("s1")
    monkeypatch.undo()
    backend.load_state(state)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".json", ".safetensors"}
    for p in files:
        assert not p.read_bytes()[:2].startswith(b"\x80"), p  # pickle protocol header
        assert not p.read_bytes()[:2] == b"PK", p  # torch zip checkpoint


def test_save_is_atomic(make_backend, tmp_path, monkeypatch):
    backend = make_backend(output_dir=tmp_path / "out")
    first = Path(backend.save_weights_for_sampler("v1").path_or_uri)
    before = (first / "adapter_model.safetensors").read_bytes()
    backend.forward_backward(random_rl_data(2, seed=8), "cross_entropy")
    backend.optim_step(LR)

    def crash(directory, name):
        (directory / "adapter_model.safetensors").write_bytes(b"half written")
        raise OSError("disk full")

    monkeypatch.setattr(backend, "_save_adapter", crash)
    with pytest.raises(OSError, match="disk full"):
        backend.save_weights_for_sampler("v1")
    assert (first / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in first.parent.iterdir()) == ["v1"]  # no temporary directory left


def test_compute_logprobs_base_and_kl_penalty(make_backend, tiny_model):
    backend = make_backend(model=tiny_model)
    data = random_rl_data(3, seed=9)
    base_before = backend.compute_logprobs(data, model="base")
    assert flat(base_before) == pytest.approx(flat(backend.compute_logprobs(data)), abs=1e-6)  # lora_B = 0
    out = backend.forward_backward(data, "importance_sampling", {"kl_coef": 0.1})
    assert out.metrics["kl_ref:mean"] == pytest.approx(0.0, abs=1e-6)
    backend.optim_step(LR)
    current = backend.compute_logprobs(data)
    base = backend.compute_logprobs(data, model="base")
    assert flat(base) == pytest.approx(flat(base_before), abs=1e-6)
    assert flat(current) != pytest.approx(flat(base), abs=1e-4)
    with_ref = [d.with_inputs(ref_logprobs=r) for d, r in zip(data, base, strict=True)]
    out = backend.forward_backward(with_ref, "importance_sampling", {"kl_coef": 0.1})
    assert out.metrics["kl_ref:mean"] > 0
    # Base logprobs equal the original model's own.
    d = data[0]
    with torch.no_grad():
        logits = tiny_model(input_ids=torch.tensor([d.model_input])).logits[0]
    own = torch.log_softmax(logits, -1).gather(-1, torch.tensor(d.target_tokens)[:, None])[:, 0]
    assert torch.allclose(own, torch.tensor(base[0]), atol=1e-5)


def test_errors(make_backend):
    backend = make_backend()
    ce_only = Datum(model_input=[1, 2], loss_fn_inputs={"target_tokens": [2, 3]})
    with pytest.raises(ConfigurationError, match="Unknown loss_fn"):
        backend.forward_backward([ce_only], "dro")
    with pytest.raises(ConfigurationError, match=r"data\[0\]"):
        backend.forward_backward([ce_only], "importance_sampling")
    with pytest.raises(ConfigurationError, match="not understood"):
        backend.forward_backward([ce_only], "cross_entropy", {"clip_low_threshold": 0.5})
    with pytest.raises(TrainingError, match="no accumulated gradients"):
        backend.optim_step(LR)
    with pytest.raises(ConfigurationError, match="Checkpoint name"):
        backend.save_state("../escape")
    with pytest.raises(ConfigurationError, match="tokenizer"):
        backend.get_tokenizer()
    backend.close()
    with pytest.raises(TrainingError, match="closed"):
        backend.forward_backward([ce_only], "cross_entropy")


@pytest.mark.model
def test_smollm2_importance_sampling_step():
    embedded = pytest.importorskip("langchain_metaclaw.models.embedded")
    from langchain_metaclaw.errors import BackendUnavailableError
    from langchain_metaclaw.training.backends.local import LocalTrainingBackend

    try:
        embedded.load_base_model()
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    backend = LocalTrainingBackend(output_dir=os.environ["METACLAW_HOME"], token_budget=256)
    try:
        tokenizer = backend.get_tokenizer()
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
        )
        prompt = list(prompt if isinstance(prompt, list) else prompt["input_ids"])
        completion = tokenizer.encode("The capital of France is Paris.", add_special_tokens=False)
        probe = datum_from_tokens(prompt, completion, None, 1.0)
        sampler = backend.compute_logprobs([probe])[0]
        datum = probe.with_inputs(
            logprobs=[lp if w > 0 else 0.0 for lp, w in zip(sampler, probe.weights(), strict=True)]
        )
        before = completion_logprob(backend, [datum])
        out = backend.forward_backward([datum], "importance_sampling")
        assert out.metrics["kl_sampler_trainer:mean"] == pytest.approx(0.0, abs=1e-4)
        backend.optim_step(AdamParams(learning_rate=1e-3))
        assert completion_logprob(backend, [datum]) > before
        saved = backend.save_weights_for_sampler("smol-v1")
        assert Path(saved.path_or_uri, "adapter_model.safetensors").stat().st_size > 1_000_000
    finally:
        backend.close()


def test_a_failed_forward_backward_leaves_no_partial_gradients(make_backend, monkeypatch):
    backend = make_backend(token_budget=40)
    data = random_rl_data(6, seed=10, min_len=20, max_len=40)
    real_logits = backend._logits
    calls = []

    def fail_second(batch):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real_logits(batch)

    monkeypatch.setattr(backend, "_logits", fail_second)
    with pytest.raises(TrainingError, match="out of memory.*gradients were cleared"):
        backend.forward_backward(data, "cross_entropy")
    assert all(p.grad is None for _, p in backend._trainable)
    with pytest.raises(TrainingError, match="no accumulated gradients"):
        backend.optim_step(LR)
