"""The user comes back during a REAL local training run on the embedded model: MadMax stops it within one
step, the trainer checkpoints, and the run is recorded as ``stopped``."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from langchain_core.messages import HumanMessage

from langchain_metaclaw import MetaClawCallbackHandler, TraceStore
from langchain_metaclaw.chat_model import MetaClawChatModel
from langchain_metaclaw.schedule import MadMaxScheduler, WindowPolicy, WindowSignals, recent_events
from langchain_metaclaw.schedule.clock import FakeClock
from langchain_metaclaw.schedule.lease import current

pytestmark = [pytest.mark.model, pytest.mark.slow]

PROMPTS = ["Name a fruit.", "Name a color.", "Name an animal.", "Name a country."]


@pytest.fixture
def captured_store(tmp_path, base_model_and_tokenizer):  # (one torch thread, model loaded once)
    store = TraceStore(f"sqlite:///{tmp_path / 't.db'}")
    llm = MetaClawChatModel(store=store, max_tokens=12, temperature=1.0, seed=0)
    handler = MetaClawCallbackHandler(store)
    for prompt in PROMPTS:
        message = llm.invoke([HumanMessage(prompt)], config={"callbacks": [handler]})
        assert message.response_metadata["metaclaw"]["tokens_source"] == "engine"
    handler.close()
    for i, turn in enumerate(store.turns(kind="llm")):
        store.add_score(turn.id, 1.0 if i % 2 else -1.0, source="rule:alternate")
    yield store
    llm.close()
    store.close()


def test_the_user_returns_during_real_training(captured_store):
    from langchain_metaclaw.training.trainer import Trainer, TrainerConfig

    store = captured_store
    clock = FakeClock(datetime(2025, 6, 10, 12, 0, tzinfo=UTC))
    last_input = {"at": clock.now()}

    def signals(now):
        return WindowSignals(idle_seconds=(now - last_input["at"]).total_seconds())

    cfg = TrainerConfig(max_steps=20, batch_size=2, min_samples=2, eval_prompts=0, threads=1, low_priority=False)
    madmax = MadMaxScheduler(
        store, WindowPolicy(idle_minutes=10, timezone="UTC"), trainer_factory=lambda: Trainer(store, cfg),
        score_fn=lambda s, stop_event: None, signals=signals, clock=clock, holder="laptop",
    )
    clock.advance(minutes=11)
    assert madmax.tick().open
    session = madmax.session
    assert session is not None

    deadline = time.monotonic() + 300
    while session.steps < 1 and session.running:
        assert time.monotonic() < deadline, "no training step within 300 s"
        time.sleep(0.05)
    assert session.running, f"the run ended before the user returned: {session.status} {session.reason}"

    last_input["at"] = clock.now()  # the user is back
    steps_when_back = session.steps
    assert madmax.tick().open is False
    assert session.stop_event.is_set()
    assert session.wait(300)

    run = session.result
    assert session.status == run.status == "stopped", run.reason
    assert steps_when_back <= run.steps <= steps_when_back + 1  # within one step
    assert run.steps < 20
    assert run.reason == f"stop requested before step {run.steps + 1}"
    checkpoint = run.metrics["checkpoint"]
    assert checkpoint and Path(checkpoint).exists()
    assert store.train_runs()[0].status == "stopped"

    ended = recent_events(store, 1, event="run_ended")[0]
    assert ended.details["status"] == "stopped" and ended.details["checkpoint"] == checkpoint
    assert ended.details["train_run"] == run.id and ended.details["steps"] == run.steps
    assert [e.event for e in reversed(recent_events(store, 10))] == [
        "opened", "run_started", "closed", "run_ended"
    ]
    assert current(store, "madmax") is None
    madmax.stop()
