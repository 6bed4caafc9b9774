"""``run_schedule`` in real child processes: SIGKILL while training, restart, SIGTERM.

Each child runs the real blocking scheduler (APScheduler job store in the test database) with a trainer
that appends one line per step to a file, so the test can check that no two processes ever trained at
the same time, that a killed holder's lease is only taken over after it expired, that the job store
never holds more than the one watchdog job, and that a SIGTERM stops the session at a step boundary.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from langchain_metaclaw.schedule import recent_events
from langchain_metaclaw.schedule.jobs import JOBSTORE_TABLE
from langchain_metaclaw.schedule.lease import current
from langchain_metaclaw.store import TraceStore

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
TTL = 2.0

CHILD = textwrap.dedent(
    """
    import sys, time, logging; logging.basicConfig(level=logging.INFO, format="%(asctime)s %(threadName)s %(name)s %(message)s")
    from langchain_metaclaw.schedule import WindowPolicy, WindowSignals, run_schedule

    url, steps_path, holder, ttl = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])

    class FileTrainer:
        def run(self, stop_event=None, progress=None):
            step = 0
            with open(steps_path, "a") as f:
                while not stop_event.is_set():
                    step += 1
                    f.write(f"{holder} {step} {time.time():.6f}\\n")
                    f.flush()
                    time.sleep(0.05)
            return {"status": "stopped", "reason": f"stop requested before step {step + 1}", "steps": step,
                    "metrics": {"checkpoint": f"ckpt-{holder}-{step}"}}

    run_schedule(url, WindowPolicy(idle_minutes=1, timezone="UTC"), trainer_factory=FileTrainer,
                 score_fn=lambda store: None, signals=WindowSignals(idle_seconds=10**6),
                 check_interval=0.2, lease_ttl=ttl, holder=holder)
    print("clean exit", flush=True)
    """
)


def wait_for(predicate, timeout: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"child exited with {p.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def steps(path: Path) -> list[tuple[str, int, float]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        holder, step, at = line.split()
        out.append((holder, int(step), float(at)))
    return out


def job_ids(store: TraceStore) -> list[str]:
    with store.engine.connect() as conn:
        return [r[0] for r in conn.execute(text(f"SELECT id FROM {JOBSTORE_TABLE} ORDER BY id"))]


def test_kill_and_restart_never_trains_twice_and_keeps_its_state(store_url, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    steps_path = tmp_path / "steps.txt"
    store = TraceStore(store_url)
    procs: list[subprocess.Popen] = []

    def spawn(holder: str) -> subprocess.Popen:
        log = open(tmp_path / f"{holder}.log", "w")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(
            [sys.executable, str(script), store_url, str(steps_path), holder, str(TTL)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)},
        )
        procs.append(p)
        return p

    def started_by(holder: str) -> bool:
        return any(e.details.get("holder") == holder for e in recent_events(store, 200, event="run_started"))

    def training(holder: str) -> bool:
        return any(h == holder for h, _, _ in steps(steps_path))

    try:
        p1 = spawn("P1")
        wait_for(lambda: training("P1"), 60, "P1 to train", [p1])

        # a second process on the same store waits for the lease instead of training
        p2 = spawn("P2")
        wait_for(
            lambda: any(e.details.get("holder") == "P2" for e in recent_events(store, 200, event="skipped")),
            60, "P2 to skip the window", [p1, p2],
        )
        skipped = next(e for e in recent_events(store, 200, event="skipped") if e.details["holder"] == "P2")
        assert skipped.details["lease_holder"] == "P1"
        assert not training("P2")
        assert job_ids(store) == ["madmax-watchdog"]

        # P1 crashes while training: P2 takes over, but only once P1's lease expired
        p1.send_signal(signal.SIGKILL)
        p1.wait(10)
        lease1 = current(store, "madmax")
        assert lease1.holder == "P1"
        wait_for(lambda: training("P2"), 30, "P2 to take over", [p2])
        assert started_by("P2")

        # P2 crashes too; a new process restarts the schedule
        p2.send_signal(signal.SIGKILL)
        p2.wait(10)
        lease2 = current(store, "madmax")
        assert lease2.holder == "P2"
        p3 = spawn("P3")
        wait_for(lambda: training("P3"), 60, "P3 to train", [p3])
        assert job_ids(store) == ["madmax-watchdog"]  # three starts, one job

        # a clean stop: the session stops at a step boundary and everything is handed back
        p3.send_signal(signal.SIGTERM)
        assert p3.wait(30) == 0
        assert "clean exit" in (tmp_path / "P3.log").read_text()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)

    log = "\n".join((tmp_path / f"P{i}.log").read_text() for i in (1, 2, 3))
    lines = steps(steps_path)
    order = [h for h, _, _ in lines]
    # never interleaved: P1's steps, then P2's, then P3's
    assert order == sorted(order), log
    first = {h: min(at for hh, _, at in lines if hh == h) for h in ("P1", "P2", "P3")}
    last = {h: max(at for hh, _, at in lines if hh == h) for h in ("P1", "P2", "P3")}
    assert first["P2"] >= lease1.expires_at.timestamp() > last["P1"]
    assert first["P3"] >= lease2.expires_at.timestamp() > last["P2"]

    events = list(reversed(recent_events(store, 500)))
    by = {h: [e.event for e in events if e.details.get("holder") == h] for h in ("P1", "P2", "P3")}
    # the killed processes' events are still there; they just never ended
    assert by["P1"] == ["scheduler_started", "opened", "run_started"]
    assert by["P2"][:3] == ["scheduler_started", "opened", "skipped"] and by["P2"][-1] == "run_started"
    assert "run_ended" not in by["P2"]
    assert by["P3"][0] == "scheduler_started" and by["P3"][-3:] == ["run_started", "run_ended", "scheduler_stopped"]
    ended = next(e for e in events if e.event == "run_ended")
    p3_steps = [s for h, s, _ in lines if h == "P3"]
    assert ended.details["status"] == "stopped" and ended.details["steps"] == max(p3_steps)
    assert ended.details["checkpoint"] == f"ckpt-P3-{max(p3_steps)}"
    assert current(store, "madmax") is None  # released on the clean stop
    assert job_ids(store) == ["madmax-watchdog"]
    store.close()
