"""The Trainer loop on the real embedded model: traces -> scores -> LoRA step -> candidate -> gate."""

from __future__ import annotations

import threading

import pytest
from langchain_core.messages import HumanMessage

from langchain_metaclaw import MetaClawCallbackHandler, TraceStore
from langchain_metaclaw.adapters import AdapterRegistry
from langchain_metaclaw.chat_model import MetaClawChatModel
from langchain_metaclaw.training.trainer import Trainer, TrainerConfig

pytestmark = [pytest.mark.model, pytest.mark.slow]

PROMPTS = ["Name a fruit.", "Name a color.", "Name an animal.", "Name a country.", "Name a city.", "Name a tool."]


def says_done(prompt, text: str) -> float:
    return 1.0 if "done" in text.lower() else 0.0


@pytest.fixture
def captured_store(tmp_path):
    store = TraceStore(f"sqlite:///{tmp_path / 't.db'}")
    llm = MetaClawChatModel(store=store, max_tokens=12, temperature=1.0, seed=0)
    handler = MetaClawCallbackHandler(store)
    for prompt in PROMPTS:
        message = llm.invoke([HumanMessage(prompt)], config={"callbacks": [handler]})
        assert message.response_metadata["metaclaw"]["tokens_source"] == "engine"
    handler.close()
    for turn in store.turns(kind="llm"):
        store.add_score(turn.id, says_done(None, turn.output_message["data"]["content"]) - 0.5, source="rule:done")
    yield store
    llm.close()


def test_run_trains_registers_and_gates_a_candidate(captured_store):
    cfg = TrainerConfig(max_steps=2, batch_size=3, min_samples=2, eval_prompts=4, token_budget=512, threads=2,
                        low_priority=False)
    trainer = Trainer(captured_store, cfg, reward_fn=says_done)
    run = trainer.run()
    assert run.status == "ok", run.reason
    # 6 captured prompts: the 2 most recent are held out for the promotion gate and never trained on
    assert run.steps == 2 and len(run.samples) == 4
    held_out = {t.id for t in captured_store.turns(kind="llm")[-2:]}
    assert not held_out & set(run.samples)
    assert run.metrics["samples_scored"] == 6 and run.metrics["dropped_stale"] == 0
    assert "loss:sum" in "".join(run.metrics) and run.metrics["eval_prompts"] == 2
    candidate = AdapterRegistry(captured_store).get(run.candidate_adapter)
    assert candidate.status in ("serving", "rejected")
    assert run.reason.startswith(("promoted", "rejected"))
    # a second run has nothing new to train on (the held-out turns stay held out), and says so
    again = Trainer(captured_store, cfg, reward_fn=says_done).run()
    assert again.status == "skipped"
    assert again.reason == "every fresh sample is held out for evaluation; waiting for more traffic"


def test_stop_event_stops_within_a_step_and_checkpoints(captured_store):
    stop = threading.Event()
    cfg = TrainerConfig(max_steps=5, batch_size=2, min_samples=2, eval_prompts=0, threads=2, low_priority=False)

    def progress(step, total, metrics):
        stop.set()  # the user came back during step 1

    run = Trainer(captured_store, cfg).run(stop_event=stop, progress=progress)
    assert run.status == "stopped" and run.reason == "stop requested before step 2"
    assert run.steps == 1 and run.metrics["checkpoint"]
    assert run.candidate_adapter is not None  # what was learned is kept as a candidate


def test_nothing_to_train_is_recorded_with_the_reason(tmp_path):
    store = TraceStore(f"sqlite:///{tmp_path / 'empty.db'}")
    run = Trainer(store, TrainerConfig()).run()
    assert (run.status, run.reason) == ("skipped", "no scored turns yet")


def test_with_a_kl_penalty_constant_groups_still_train_on_the_kl_term(captured_store):
    """A collapsed policy (every group scored alike) has no reward gradient; the KL term must still act."""
    cfg = TrainerConfig(group_size=2, group_prompts=1, max_new_tokens=4, max_steps=1, eval_prompts=2, threads=2,
                        low_priority=False)

    def flat(prompt, text: str) -> float:
        return 0.5

    without = Trainer(captured_store, cfg, reward_fn=flat).run()
    assert (without.status, without.steps) == ("skipped", 0)
    assert without.reason == "no step had any signal (every group scored alike)"
    with_kl = Trainer(captured_store, cfg.model_copy(update={"kl_coef": 0.1}), reward_fn=flat).run()
    assert with_kl.status == "ok" and with_kl.steps == 1, with_kl.reason
    assert with_kl.metrics["last_constant_groups"] == 1 and with_kl.metrics["last_data"] == 2
    assert "last_kl_ref:mean" in with_kl.metrics


def test_a_constant_group_is_resampled_at_the_explore_temperature(captured_store):
    calls = []

    def flat_then_graded(prompt, text: str) -> float:
        calls.append(text)
        return 0.5 if len(calls) <= 2 else float(len(calls) % 2)  # the first group is constant, the next is not

    cfg = TrainerConfig(group_size=2, group_prompts=1, max_new_tokens=4, max_steps=1, eval_prompts=2, threads=2,
                        low_priority=False, explore_temperature=1.5)
    run = Trainer(captured_store, cfg, reward_fn=flat_then_graded).run()
    assert run.status == "ok" and run.steps == 1, run.reason
    assert run.metrics["last_explored_groups"] == 1 and run.metrics["last_constant_groups"] == 0
    assert run.metrics["last_data"] == 2
