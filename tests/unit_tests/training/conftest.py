"""Fixtures for the training tests: a tiny seeded Llama built in-process (no download, no embedded model)."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 256


def build_tiny_llama(seed: int = 0):
    """2 layers, hidden 64, vocab 256; identical weights for the same seed."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    return model.eval()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine, two OpenMP threads contending with other processes
    run these tiny models up to 10x slower (measured), and one thread is as fast uncontended."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_model():
    return build_tiny_llama()


@pytest.fixture
def make_backend(tmp_path):
    """Build a LocalTrainingBackend on a fresh tiny Llama (same base weights every call)."""
    from langchain_metaclaw.training.backends.local import LocalTrainingBackend

    built = []

    def factory(**kwargs):
        kwargs.setdefault("output_dir", tmp_path / "out")
        kwargs.setdefault("device", "cpu")
        model = kwargs.pop("model", None) or build_tiny_llama()
        backend = LocalTrainingBackend(model=model, **kwargs)
        built.append(backend)
        return backend

    yield factory
    for backend in built:
        backend.close()


def random_rl_data(n: int, *, seed: int = 0, min_len: int = 4, max_len: int = 40, advantage=None):
    """``n`` RL data of varied lengths: random prompt/completion tokens, zero sampler logprobs."""
    from langchain_metaclaw.training import datum_from_tokens

    rng = random.Random(seed)
    data = []
    for _ in range(n):
        total = rng.randint(min_len, max_len)
        n_prompt = rng.randint(1, total - 1)
        tokens = [rng.randrange(VOCAB) for _ in range(total)]
        adv = rng.uniform(-1, 1) if advantage is None else advantage
        data.append(datum_from_tokens(tokens[:n_prompt], tokens[n_prompt:], [-5.0] * (total - n_prompt), adv))
    return data
