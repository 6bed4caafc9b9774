"""The README's "Add it to your agent" example runs as written (on the embedded model, offline)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"

pytestmark = [pytest.mark.model]


def _example() -> str:
    section = README.read_text().split("## Add it to your agent", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README lost its 'Add it to your agent' example"
    return match.group(1)


def test_add_it_to_your_agent_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example opens sqlite:///metaclaw.db in the working directory
    namespace: dict = {}
    exec(compile(_example(), str(README), "exec"), namespace)
    store, turn = namespace["store"], namespace["turn"]
    assert turn.tokens_source == "engine" and turn.completion_token_ids and turn.logprobs
    assert turn.episode_id == "user-42" and turn.node == "model"
    (feedback,) = store.feedback(turn.id)
    assert (feedback.score, feedback.comment) == (1.0, "exactly right")
    assert (tmp_path / "metaclaw.db").exists()
    namespace["handler"].close()
    namespace["llm"].close()
