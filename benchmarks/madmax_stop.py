"""A program that exits right after ``MadMaxScheduler.stop()`` must exit cleanly (issue 17).

Starts MadMax (background mode) on a fresh SQLite store holding four captured and scored turns of the
embedded model, with signals that open the window at once; waits until the real local training session
has run one step; calls ``stop()`` and returns from ``main``. Exit status 0 means the whole round trip
(including interpreter shutdown, which used to abort with SIGABRT while the session thread still freed
the trainer's tensors) went through.

    for i in $(seq 20); do python benchmarks/madmax_stop.py; echo $?; done

Prints one line: the session's status, its steps and the seconds ``stop()`` took.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["Name a fruit.", "Name a color.", "Name an animal.", "Name a country."]


def _captured_store(home: Path):
    """A store with the embedded model's answers to :data:`PROMPTS`, alternately scored +1 / -1."""
    from langchain_core.messages import HumanMessage

    from langchain_metaclaw import MetaClawCallbackHandler, TraceStore
    from langchain_metaclaw.chat_model import MetaClawChatModel

    store = TraceStore(f"sqlite:///{home / 'traces.db'}")
    llm = MetaClawChatModel(store=store, max_tokens=8, temperature=1.0, seed=0)
    handler = MetaClawCallbackHandler(store)
    for prompt in PROMPTS:
        llm.invoke([HumanMessage(prompt)], config={"callbacks": [handler]})
    handler.close()
    llm.close()
    for i, turn in enumerate(store.turns(kind="llm")):
        store.add_score(turn.id, 1.0 if i % 2 else -1.0, source="rule:alternate")
    return store


def _home() -> Path:
    """``$MADMAX_STOP_HOME`` (the test passes its temporary folder), else one fixed folder in the temp dir.

    The fixed folder is emptied at the start of each run, not at its end: the program must exit right
    after ``stop()`` (removing ~130 MB of checkpoints first would give a lingering thread the time to
    finish and hide the crash). So run one copy at a time.
    """
    given = os.environ.get("MADMAX_STOP_HOME")
    if given:
        return Path(given)
    home = Path(tempfile.gettempdir()) / "madmax-stop-home"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir()
    return home


def main(timeout: float = 600.0) -> int:
    home = _home()
    os.environ["METACLAW_HOME"] = str(home)
    os.environ.setdefault("METACLAW_TORCH_THREADS", "1")

    from langchain_metaclaw.schedule import MadMaxScheduler, WindowPolicy, WindowSignals
    from langchain_metaclaw.training.trainer import Trainer, TrainerConfig

    store = _captured_store(home)
    cfg = TrainerConfig(max_steps=20, batch_size=2, min_samples=2, eval_prompts=0, threads=1, low_priority=False)
    madmax = MadMaxScheduler(
        store,
        WindowPolicy(idle_minutes=1, timezone="UTC"),
        trainer_factory=lambda: Trainer(store, cfg),
        score_fn=lambda s, stop_event: None,
        signals=WindowSignals(idle_seconds=3600.0),  # the user is away: the window opens at once
        check_interval=0.5,
    )
    madmax.start()
    deadline = time.monotonic() + timeout
    while (session := madmax.last_session) is None or (session.steps < 1 and session.running):
        if time.monotonic() > deadline:
            print("no training step within the timeout", file=sys.stderr)
            return 2
        time.sleep(0.05)
    started = time.monotonic()
    madmax.stop()
    print(f"session {session.status} after {session.steps} step(s); stop() took {time.monotonic() - started:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
