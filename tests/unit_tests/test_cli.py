from __future__ import annotations

import json
import time

from click.testing import CliRunner

from langchain_metaclaw.cli import cli
from langchain_metaclaw.store import TraceStore
from tests.fixtures.adapters import tiny_lora


def test_store_path_follows_metaclaw_home(metaclaw_home):
    result = CliRunner().invoke(cli, ["store", "path"], catch_exceptions=False)
    assert result.exit_code == 0
    assert str(metaclaw_home) in result.output


def test_store_verify_and_counts(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    store = TraceStore(url)
    store.write_records(
        [
            {
                "type": "turn",
                "id": "a",
                "episode_id": "gone",
                "kind": "llm",
                "started_at": time.time(),
                "status": "ok",
            }
        ]
    )
    bad = CliRunner().invoke(cli, ["store", "verify", "--store", url])
    assert bad.exit_code == 1 and "reference a missing episode" in bad.output
    counts = CliRunner().invoke(cli, ["store", "counts", "--store", url, "--json"], catch_exceptions=False)
    assert json.loads(counts.output)["turns"] == 1


def test_unreachable_store_is_a_clean_error():
    result = CliRunner().invoke(
        cli, ["store", "verify", "--store", "postgresql+psycopg://x@127.0.0.1:1/x?connect_timeout=1"]
    )
    assert (
        result.exit_code == 1
        and "could not open or migrate" in result.output
        and "Traceback" not in result.output
    )


def test_status_shows_every_stage(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    store = TraceStore(url)
    t = time.time()
    store.write_records([{"type": "episode_start", "id": "e", "started_at": t},
                         {"type": "turn", "id": "a", "episode_id": "e", "kind": "llm", "started_at": t,
                          "status": "ok", "tokens_source": "engine"}])
    store.add_score("a", 1.0, source="prm")
    store.add_adapter("v1", backend="local", uri=str(tmp_path), status="serving")
    run = store.start_train_run(backend="local")
    store.finish_train_run(run.id, status="skipped", reason="no scored data since v1")
    result = CliRunner().invoke(cli, ["status", "--store", url], catch_exceptions=False, terminal_width=200)
    assert result.exit_code == 0
    for expected in ("engine: 1", "scores: prm", "scored 1", "v1", "serving", "skipped", "no scored data since v1"):
        assert expected in result.output, expected


def test_adapters_promote_and_rollback_from_the_cli(tmp_path):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    store = TraceStore(url)
    for name in ("one", "two"):
        store.add_adapter(name, backend="local", uri=str(tiny_lora(tmp_path / name, r=4)))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_model.bin").write_bytes(b"pickle")
    store.add_adapter("bad", backend="local", uri=str(bad))
    runner = CliRunner()
    assert runner.invoke(cli, ["adapters", "promote", "one", "--store", url], catch_exceptions=False).exit_code == 0
    assert runner.invoke(cli, ["adapters", "promote", "two", "--store", url], catch_exceptions=False).exit_code == 0
    refused = runner.invoke(cli, ["adapters", "promote", "bad", "--store", url])
    assert refused.exit_code == 1 and "only safetensors" in refused.output
    back = runner.invoke(cli, ["adapters", "rollback", "--store", url], catch_exceptions=False)
    assert "one is serving" in back.output
    listing = runner.invoke(cli, ["adapters", "list", "--store", url], catch_exceptions=False).output
    assert "one          serving" in listing and "two          rolled_back" in listing and "rejected" in listing


def test_score_command_runs_rules(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    store = TraceStore(url)
    t = time.time()
    store.write_records([{"type": "episode_start", "id": "e", "started_at": t},
                         {"type": "turn", "id": "a", "episode_id": "e", "kind": "llm", "started_at": t, "status": "ok",
                          "output_message": {"type": "ai", "data": {"content": "fine"}}}])
    result = CliRunner().invoke(cli, ["score", "--store", url, "--rule", "no_error"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert [s.source for s in store.scores("a")] == ["rule:no_error"]
