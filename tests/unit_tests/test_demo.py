"""``metaclaw demo`` end to end, cut down to a few prompts and one training step (the full run is `make demo`)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from langchain_metaclaw import TraceStore
from langchain_metaclaw.demo import run_demo
from langchain_metaclaw.schedule.events import recent_events

pytestmark = [pytest.mark.model, pytest.mark.slow]


def test_demo_serves_scores_trains_in_a_madmax_window_and_swaps_while_serving(tmp_path):
    out = io.StringIO()
    report = run_demo(train_minutes=3.0, home=tmp_path, console=Console(file=out, width=120), max_steps=1,
                      prompts=6)
    text = out.getvalue()

    store = TraceStore(f"sqlite:///{tmp_path / 'demo.db'}")
    events = [e.event for e in reversed(recent_events(store, limit=50))]
    # the real scheduler ran the session: window opened on the simulated idle signal, then closed
    assert events.index("opened") < events.index("run_started") < events.index("run_ended")
    assert "closed" in events[events.index("opened"):]
    (run,) = store.train_runs()
    assert report.train_status == f"{run.status}: {run.reason}"
    # one step of 2 groups: whether it had signal depends on the samples; either way it is recorded
    assert (run.status, run.steps) in {("ok", 1), ("stopped", 1), ("skipped", 0)}, run.reason
    assert (run.candidate_adapter is not None) == (run.steps == 1)
    assert report.failed_during_training == 0
    assert set(report.before) == set(report.after) == {"greedy"}
    assert report.plot is not None and report.plot.stat().st_size > 0
    assert "[SIMULATED] keyboard idle" in text and "[SIMULATED] the user is back" in text
    assert "held-out reward (greedy): before" in text
