"""``Trainer.check_live_reward``: the serving adapter is rolled back when its live reward falls below its parent's.

No model is loaded: the check reads only scores by adapter version (``TraceStore.live_rewards``).
"""

from __future__ import annotations

import time

from langchain_metaclaw.store import TraceStore
from langchain_metaclaw.training.trainer import Trainer, TrainerConfig


def _store_with_live_rewards(served: dict[str | None, list[float]]) -> TraceStore:
    store = TraceStore("sqlite://")
    t = time.time()
    records = [{"type": "episode_start", "id": "e", "started_at": t}]
    for version, rewards in served.items():
        for i, _ in enumerate(rewards):
            records.append({"type": "turn", "id": f"{version}-{i}", "episode_id": "e", "kind": "llm",
                            "started_at": t + len(records), "status": "ok", "adapter_version": version})
    store.write_records(records)
    for version, rewards in served.items():
        for i, reward in enumerate(rewards):
            store.add_score(f"{version}-{i}", reward, source="prm")
    store.add_adapter("v1", backend="openai", uri="served-model", status="serving")
    return store


def _trainer(store: TraceStore) -> Trainer:
    return Trainer(store, TrainerConfig(live_min_samples=2, rollback_drop=0.5))


def test_a_worse_serving_adapter_is_rolled_back_to_the_base():
    store = _store_with_live_rewards({None: [1.0, 1.0, 0.0], "v1": [-1.0, 0.0]})
    reason = _trainer(store).check_live_reward()
    assert reason is not None and "fell 1.17 below base" in reason
    assert store.adapter("v1").status == "rolled_back"


def test_too_few_or_close_rewards_change_nothing():
    assert _trainer(_store_with_live_rewards({None: [1.0, 1.0], "v1": [-1.0]})).check_live_reward() is None
    store = _store_with_live_rewards({None: [1.0, 0.0], "v1": [0.5, 0.0]})
    assert _trainer(store).check_live_reward() is None
    assert store.adapter("v1").status == "serving"
