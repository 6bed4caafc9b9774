"""A training process killed mid-run: the next run resumes from its last checkpoint instead of starting over."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from langchain_metaclaw import TraceStore
from langchain_metaclaw.training.backends.local import LocalTrainingBackend
from langchain_metaclaw.training.trainer import Trainer, TrainerConfig
from tests.unit_tests.training.conftest import build_tiny_llama

ROOT = Path(__file__).resolve().parents[3]
CONFIG = {"max_steps": 10, "batch_size": 3, "min_samples": 2, "eval_prompts": 0, "low_priority": False}

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    import torch
    torch.set_num_threads(1)
    from langchain_metaclaw import TraceStore
    from langchain_metaclaw.training.backends.local import LocalTrainingBackend
    from langchain_metaclaw.training.trainer import Trainer, TrainerConfig
    from tests.unit_tests.training.conftest import build_tiny_llama

    backend = LocalTrainingBackend(model=build_tiny_llama(), output_dir=sys.argv[3], device="cpu")
    trainer = Trainer(TraceStore(sys.argv[2]), TrainerConfig(**eval(sys.argv[4])), backend=backend)

    def progress(step, total, metrics):
        if step == 3:  # steps 1 and 2 are checkpointed and recorded; die in the middle of step 3
            os.kill(os.getpid(), signal.SIGKILL)

    trainer.run(progress=progress)
    """
)


def _scored_turns(store: TraceStore, n: int) -> None:
    t = time.time()
    records = [{"type": "episode_start", "id": "e", "started_at": t}]
    for i in range(n):
        records.append({"type": "turn", "id": f"turn-{i:02d}", "seq": i + 1, "episode_id": "e", "kind": "llm",
                        "started_at": t + i, "status": "ok", "node": "model",
                        "output_message": {"type": "ai", "data": {"content": f"answer {i}"}},
                        "prompt_token_ids": [1, 2 + i, 3], "completion_token_ids": [10 + i, 11, 12],
                        "logprobs": [-1.0, -0.5, -0.25], "tokens_source": "engine", "adapter_version": None})
    store.write_records(records)
    for i in range(n):
        store.add_score(f"turn-{i:02d}", 1.0 if i % 2 else -1.0, source="rule:parity")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_killed_run_is_resumed_from_its_last_checkpoint(tmp_path):
    url = f"sqlite:///{tmp_path / 't.db'}"
    out = tmp_path / "out"
    store = TraceStore(url)
    _scored_turns(store, 15)

    child = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), url, str(out), repr(CONFIG)],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr
    (dead,) = store.train_runs()
    assert (dead.status, dead.steps, len(dead.samples)) == ("running", 2, 6)
    assert dead.metrics["checkpoint"] and dead.metrics["owner"]["pid"]

    trainer = Trainer(store, TrainerConfig(**CONFIG),
                      backend=LocalTrainingBackend(model=build_tiny_llama(), output_dir=out, device="cpu"))
    run = trainer.run(max_steps=1)
    assert run.status == "ok", run.reason
    assert run.metrics["resumed_from"] == dead.id
    assert run.metrics["last_step"] == 3.0  # the optimizer went on from the dead run's step 2, not from 0
    assert not set(run.samples) & set(dead.samples)  # what the dead run trained on is in the checkpoint
    dead = next(r for r in store.train_runs() if r.id == dead.id)
    assert dead.status == "interrupted" and dead.ended_at is not None
    assert dead.reason.startswith(f"its process {dead.metrics['owner']['pid']} died after step 2; run ")
    assert dead.reason.endswith("resumed from its checkpoint")


def test_a_dead_run_without_a_checkpoint_is_closed_with_the_reason(tmp_path):
    store = TraceStore(f"sqlite:///{tmp_path / 't.db'}")
    _scored_turns(store, 6)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    store.start_train_run(backend="local", metrics={"owner": {"host": socket.gethostname(),
                                                               "pid": int(gone.stdout)}})
    trainer = Trainer(store, TrainerConfig(**CONFIG),
                      backend=LocalTrainingBackend(model=build_tiny_llama(), output_dir=tmp_path, device="cpu"))
    run = trainer.run(max_steps=1)
    assert run.status == "ok" and "resumed_from" not in run.metrics
    dead = next(r for r in store.train_runs() if r.id != run.id)
    assert dead.status == "error"
    assert dead.reason == (f"its process {int(gone.stdout)} died after step 0; "
                           "not resumed (no checkpoint from the serving adapter)")
