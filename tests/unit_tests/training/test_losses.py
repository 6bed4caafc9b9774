"""Each loss against hand-computed values (tinker's definitions: sums over tokens)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from langchain_metaclaw.training.losses import (  # noqa: E402
    compute_loss,
    cross_entropy_loss,
    importance_sampling_loss,
    kl_penalty,
    ppo_loss,
    token_entropy,
    token_logprobs,
)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_token_logprobs_and_entropy():
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 2.0]])
    targets = torch.tensor([1, 0])
    assert torch.allclose(token_logprobs(logits, targets), t(math.log(0.75), math.log(0.5)))
    expected_h0 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert torch.allclose(token_entropy(logits), t(expected_h0, math.log(2.0)))
    big = torch.randn(3, 5, 17)
    idx = torch.randint(0, 17, (3, 5))
    ref = torch.log_softmax(big, -1).gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(token_logprobs(big, idx), ref, atol=1e-6)


def test_cross_entropy():
    logp = t(-1.0, -2.0, -3.0)
    assert cross_entropy_loss(logp, t(1.0, 0.5, 0.0)).item() == pytest.approx(2.0)
    assert cross_entropy_loss(logp).item() == pytest.approx(6.0)


def test_importance_sampling_value_and_gradient():
    logp = t(-1.0, -2.0).requires_grad_()
    loss = importance_sampling_loss(logp, t(-1.5, -2.0), t(2.0, -1.0))
    # -(e^0.5 * 2 + 1 * -1)
    assert loss.item() == pytest.approx(-(2 * math.exp(0.5) - 1.0), rel=1e-6)
    loss.backward()
    # d/dlogp of -(r * A) is -r * A
    assert torch.allclose(logp.grad, t(-2 * math.exp(0.5), 1.0))
    weighted = importance_sampling_loss(t(-1.0, -2.0), t(-1.5, -2.0), t(2.0, -1.0), t(0.0, 1.0))
    assert weighted.item() == pytest.approx(1.0)


def test_ppo_clips_the_ratio():
    # r = e^0.5 ~ 1.65 with A = 2: clipped to 1.2 -> 2.4; r = 1 with A = -1 -> -1; r = 0.5 with A = -1:
    # min(-0.5, 0.8 * -1) = -0.8.
    logp = t(-1.0, -2.0, -1.0 - math.log(2.0)).requires_grad_()
    loss = ppo_loss(logp, t(-1.5, -2.0, -1.0), t(2.0, -1.0, -1.0))
    assert loss.item() == pytest.approx(-(2.4 - 1.0 - 0.8), rel=1e-6)
    loss.backward()
    # Clipped tokens get no gradient; the unclipped one gets -r * A = 1.
    assert torch.allclose(logp.grad, t(0.0, 1.0, 0.0))
    wide = ppo_loss(t(-1.0), t(-1.5), t(2.0), clip_low_threshold=0.5, clip_high_threshold=2.0)
    assert wide.item() == pytest.approx(-2 * math.exp(0.5), rel=1e-6)


def test_kl_penalty_k3():
    # delta = ref - logp = 1 -> e - 2; delta = 0 -> 0
    value = kl_penalty(t(-2.0, -1.0), t(-1.0, -1.0))
    assert value.item() == pytest.approx(math.e - 2.0, rel=1e-6)
    assert kl_penalty(t(-2.0, -1.0), t(-1.0, -1.0), t(0.0, 1.0)).item() == pytest.approx(0.0)


def test_compute_loss_dispatch_and_metrics():
    logp = t(-1.0, -2.0, -3.0)
    inputs = {
        "logprobs": t(0.0, -1.5, -2.0),
        "advantages": t(0.0, 2.0, -1.0),
        "weights": t(0.0, 1.0, 1.0),
        "ref_logprobs": t(0.0, -2.0, -2.0),
    }
    result = compute_loss("importance_sampling", logp, inputs, {"kl_coef": 0.5})
    is_part = -(math.exp(-0.5) * 2.0 + math.exp(-1.0) * -1.0)
    kl_part = 0.0 + (math.exp(1.0) - 1.0 - 1.0)
    assert result.loss.item() == pytest.approx(is_part + 0.5 * kl_part, rel=1e-6)
    assert result.tokens == 2.0
    assert result.sums["kl_sampler_trainer"] == pytest.approx(0.5 + 1.0)
    assert result.sums["ratio"] == pytest.approx(math.exp(-0.5) + math.exp(-1.0), rel=1e-6)
    assert result.maxima["ratio"] == pytest.approx(math.exp(-0.5), rel=1e-6)
    assert result.sums["kl_ref"] == pytest.approx(kl_part, rel=1e-6)

    ppo = compute_loss("ppo", logp, inputs, {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5})
    assert ppo.sums["clip_frac"] == 1.0  # e^-1 < 0.5
    ce = compute_loss("cross_entropy", logp, {"weights": t(1.0, 1.0, 0.0)})
    assert ce.loss.item() == pytest.approx(3.0)
    assert ce.sums == {"loss": pytest.approx(3.0)}


def test_compute_loss_rejects_unknown_config_and_missing_reference():
    with pytest.raises(ValueError, match="not understood"):
        compute_loss(
            "importance_sampling",
            t(-1.0),
            {"logprobs": t(0.0), "advantages": t(1.0)},
            {"clip_low_threshold": 0.9},
        )
    with pytest.raises(ValueError, match="ref_logprobs"):
        compute_loss("cross_entropy", t(-1.0), {}, {"kl_coef": 0.1})
    with pytest.raises(ValueError, match="Unknown loss_fn"):
        compute_loss("dro", t(-1.0), {})
