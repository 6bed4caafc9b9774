"""Scored traces to training data: reward combination, staleness, baselines, groups, datums."""

from __future__ import annotations

import time

import pytest

from langchain_metaclaw.store import TraceStore
from langchain_metaclaw.training.data import (
    RunningBaseline,
    Sample,
    collect_samples,
    drop_stale,
    group_advantages,
    sample_to_datum,
)


def _sample(**kw) -> Sample:
    base = dict(turn_id="t", task="model", reward=1.0, prompt_token_ids=[1, 2], completion_token_ids=[3, 4],
                logprobs=[-0.5, -0.25], tokens_source="engine", adapter_version=None)
    return Sample(**{**base, **kw})


def test_collect_samples_combines_sources_and_skips_unscored():
    store = TraceStore("sqlite://")
    t = time.time()
    turn = {"type": "turn", "episode_id": "e", "kind": "llm", "started_at": t, "status": "ok", "node": "model",
            "output_message": {"type": "ai", "data": {"content": "hi"}}, "prompt_token_ids": [1],
            "completion_token_ids": [2], "logprobs": [-0.1], "tokens_source": "engine", "adapter_version": "v1"}
    store.write_records([{"type": "episode_start", "id": "e", "started_at": t},
                         {**turn, "id": "a", "seq": 1}, {**turn, "id": "b", "seq": 2}, {**turn, "id": "c", "seq": 3},
                         {**turn, "id": "err", "seq": 4, "status": "error"}])
    store.add_score("a", 1.0, source="prm")
    store.add_feedback("a", -1.0)  # feedback weighs 2, prm 1: (2 * -1 + 1) / 3
    store.add_score("b", 0.5, source="rule:json_valid")
    store.add_score("c", None, source="prm", status="unscored", reason="no valid vote")
    store.add_score("err", 1.0, source="prm")
    samples = collect_samples(store)
    assert [s.turn_id for s in samples] == ["a", "b"]
    assert samples[0].reward == pytest.approx(-1 / 3)
    assert samples[1].reward == 0.5
    assert (samples[0].adapter_version, samples[0].task, samples[0].completion_token_ids) == ("v1", "model", [2])


def test_drop_stale_counts_what_it_drops():
    samples = [_sample(turn_id="base"), _sample(turn_id="v1", adapter_version="v1"),
               _sample(turn_id="v3", adapter_version="v3")]
    kept, dropped = drop_stale(samples, ["v1", "v2", "v3"], current="v3", max_staleness=2)
    assert [s.turn_id for s in kept] == ["v1", "v3"] and dropped == 1
    # after a rollback to v1, samples of the newer v3 are off-policy, not stale: importance sampling keeps them
    kept, dropped = drop_stale(samples, ["v1", "v2", "v3"], current="v1", max_staleness=0)
    assert [s.turn_id for s in kept] == ["v1", "v3"] and dropped == 1


def test_running_baseline_is_per_task():
    baseline = RunningBaseline(momentum=0.5)
    assert baseline.advantage("a", 1.0) == 1.0  # nothing seen yet: baseline 0
    assert baseline.advantage("a", 1.0) == 0.0  # now expected
    assert baseline.advantage("a", 0.0) == -1.0
    # a new task starts from the global running mean, not from zero
    assert baseline.advantage("b", 1.0) == pytest.approx(1.0 - baseline.global_mean, abs=0.2)


def test_group_advantages():
    assert group_advantages([1.0, 0.0, 0.0, 1.0]) == [0.5, -0.5, -0.5, 0.5]
    assert group_advantages([1.0, 1.0, 1.0]) is None  # no gradient in a constant group
    norm = group_advantages([1.0, 0.0], normalize=True)
    assert norm[0] == pytest.approx(1.0, abs=1e-4) and norm[1] == pytest.approx(-1.0, abs=1e-4)


def test_engine_sample_to_datum_uses_engine_tokens():
    datum = sample_to_datum(_sample(), 0.5)
    assert datum.model_input == [1, 2, 3]
    assert datum.loss_fn_inputs["target_tokens"] == [2, 3, 4]
    assert datum.loss_fn_inputs["logprobs"] == [0.0, -0.5, -0.25]
    assert datum.loss_fn_inputs["advantages"] == [0.0, 0.5, 0.5]


def test_retokenized_sample_needs_a_tokenizer():
    sample = _sample(prompt_token_ids=None, completion_token_ids=None, logprobs=None, tokens_source="retokenized",
                     messages=[{"type": "human", "data": {"content": "hi"}}], output_text="hello")
    with pytest.raises(ValueError, match="needs a tokenizer|a tokenizer is needed"):
        sample_to_datum(sample, 1.0)
