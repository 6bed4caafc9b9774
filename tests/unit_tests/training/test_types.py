"""Datum alignment and validation, and the torch-free import surface."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from langchain_metaclaw.errors import ConfigurationError
from langchain_metaclaw.training import AdamParams, Datum, datum_from_tokens
from langchain_metaclaw.training.backends import available_backends, get_backend, register_backend


def test_datum_from_tokens_shifts_like_tinker():
    d = datum_from_tokens([10, 11, 12], [20, 21], [-0.5, -0.25], 2.0)
    assert d.model_input == [10, 11, 12, 20]
    assert d.loss_fn_inputs == {
        "target_tokens": [11, 12, 20, 21],
        "logprobs": [0.0, 0.0, -0.5, -0.25],
        "advantages": [0.0, 0.0, 2.0, 2.0],
        "weights": [0.0, 0.0, 1.0, 1.0],
    }
    assert d.length == 4
    assert d.full_sequence() == [10, 11, 12, 20, 21]


def test_datum_from_tokens_per_token_advantages_weights_and_missing_logprobs():
    d = datum_from_tokens([1], [2, 3], None, [0.5, -1.0], weights=[1.0, 0.0])
    assert d.model_input == [1, 2]
    assert d.loss_fn_inputs["logprobs"] == [0.0, 0.0]
    assert d.loss_fn_inputs["advantages"] == [0.5, -1.0]
    assert d.weights() == [1.0, 0.0]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([], [1], [0.0], 1.0), "non-empty"),
        (([1], [], [], 1.0), "non-empty"),
        (([1], [2, 3], [0.0], 1.0), "completion_logprobs has 1 entries"),
        (([1], [2, 3], [0.0, 0.0], [1.0]), "advantage has 1 entries"),
    ],
)
def test_datum_from_tokens_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        datum_from_tokens(*args)


def test_datum_validation():
    with pytest.raises(ValueError, match="needs 'target_tokens'"):
        Datum(model_input=[1, 2], loss_fn_inputs={})
    with pytest.raises(ValueError, match="aligned with model_input"):
        Datum(model_input=[1, 2], loss_fn_inputs={"target_tokens": [2]})
    with pytest.raises(ValueError, match="Unknown loss_fn_inputs key 'mask'"):
        Datum(model_input=[1], loss_fn_inputs={"target_tokens": [2], "mask": [1]})
    ce = Datum(model_input=[1], loss_fn_inputs={"target_tokens": [2]})
    ce.check_for("cross_entropy")
    assert ce.weights() == [1.0]
    with pytest.raises(ValueError, match=r"lacks \['logprobs', 'advantages'\]"):
        ce.check_for("importance_sampling")
    with pytest.raises(ValueError, match="Unknown loss_fn"):
        ce.check_for("dro")


def test_datum_round_trips_through_json_and_with_inputs():
    d = datum_from_tokens([1, 2], [3], [-1.0], 1.0)
    again = Datum.from_dict(json.loads(json.dumps(d.to_dict())))
    assert again == d
    with_ref = d.with_inputs(ref_logprobs=[0.0, -2.0])
    assert with_ref.loss_fn_inputs["ref_logprobs"] == [0.0, -2.0]
    assert "weights" not in with_ref.with_inputs(weights=None).loss_fn_inputs
    assert "ref_logprobs" not in d.loss_fn_inputs  # frozen: the original is unchanged


def test_adam_params_defaults():
    p = AdamParams()
    assert (p.learning_rate, p.beta1, p.beta2, p.eps, p.weight_decay, p.grad_clip_norm) == (
        1e-4,
        0.9,
        0.95,
        1e-8,
        0.0,
        1.0,
    )


def test_import_is_light():
    code = (
        "import sys, langchain_metaclaw.training as t, langchain_metaclaw.training.backends as b;"
        "t.datum_from_tokens([1], [2], [0.0], 1.0); b.available_backends();"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'tinker', 'mint') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_registry():
    assert {"local", "tinker", "mint"} <= set(available_backends())
    with pytest.raises(ConfigurationError, match="Unknown training backend 'nope'"):
        get_backend("nope")
    with pytest.raises(ConfigurationError, match="already exists"):
        register_backend("local", lambda **kw: None)
    sentinel = object()
    register_backend("test-fake", lambda **kw: (sentinel, kw))
    try:
        assert get_backend("test-fake", a=1) == (sentinel, {"a": 1})
    finally:
        from langchain_metaclaw.training import backends

        backends._REGISTRY.pop("test-fake")
