"""A program that exits right after ``MadMaxScheduler.stop()`` exits with status 0 (it used to abort with
SIGABRT while the finished session's thread still freed the trainer's tensors)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.model, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]


def test_a_program_exiting_right_after_stop_exits_cleanly(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "METACLAW_TORCH_THREADS": "1", "MADMAX_STOP_HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "madmax_stop.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "stop() took" in proc.stdout
