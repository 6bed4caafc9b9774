"""TraceStore on SQLite and on a real PostgreSQL server (every test here runs on both)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import inspect

from langchain_metaclaw.errors import StoreError
from langchain_metaclaw.store import TraceStore, schema
from langchain_metaclaw.store.migrations import MIGRATIONS, migrate

EXPECTED_TURN_COLUMNS = {
    "id",
    "seq",
    "parent_run_id",
    "root_run_id",
    "episode_id",
    "kind",
    "name",
    "node",
    "step",
    "checkpoint_ns",
    "started_at",
    "ended_at",
    "latency_ms",
    "status",
    "error",
    "input_messages",
    "output_message",
    "tool_name",
    "tool_call_id",
    "tool_args",
    "tool_result",
    "usage",
    "model_name",
    "adapter_version",
    "prompt_token_ids",
    "completion_token_ids",
    "logprobs",
    "tokens_source",
    "sampling",
    "invocation_params",
    "tags",
    "metadata",
    "created_at",
}
EXPECTED_TABLES = {
    "episodes",
    "turns",
    "scores",
    "feedback",
    "adapters",
    "train_runs",
    "judge_calls",
    "schedule_events",
    "leases",
    "_metaclaw_migrations",
}


def _episode(eid="e1", t=None, **kw):
    return {
        "type": "episode_start",
        "id": eid,
        "thread_id": kw.get("thread_id"),
        "root_run_id": "r1",
        "graph_name": "agent",
        "started_at": t or time.time(),
    }


def _turn(tid, eid="e1", kind="llm", t=None, **kw):
    t = t or time.time()
    return {
        "type": "turn",
        "id": tid,
        "episode_id": eid,
        "kind": kind,
        "started_at": t,
        "ended_at": t + 0.01,
        "status": "ok",
        "root_run_id": kw.pop("root", "r1"),
        "seq": kw.pop("seq", 1),
        **kw,
    }


def test_fresh_database_has_exact_schema(store):
    insp = inspect(store.engine)
    assert EXPECTED_TABLES <= set(insp.get_table_names())
    assert {c["name"] for c in insp.get_columns("turns")} == EXPECTED_TURN_COLUMNS
    assert store.verify() == []


def test_migrate_is_idempotent_and_recorded(store_url):
    first = TraceStore(store_url)
    assert migrate(first.engine) == []  # already at head
    with first.engine.connect() as conn:
        names = list(conn.execute(schema.migrations_table.select()).mappings())
    assert [r["name"] for r in names] == [m.__name__ for m in MIGRATIONS]
    assert len(MIGRATIONS) == schema.SCHEMA_VERSION
    TraceStore(store_url).close()  # a second open migrates nothing and succeeds
    first.close()


def test_unreachable_database_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="could not open or migrate"):
        TraceStore("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=1")


def test_write_records_is_idempotent(store):
    t0 = time.time()
    batch = [
        _episode(t=t0),
        _turn("a", t=t0, output_message={"type": "ai", "data": {"content": "hi"}}),
        {"type": "episode_end", "id": "e1", "ended_at": t0 + 1, "status": "ok"},
    ]
    store.write_records(batch)
    store.write_records(batch)  # a spool replay after a crash between commit and trim
    assert [t.id for t in store.turns()] == ["a"]
    (ep,) = store.episodes()
    assert ep.status == "ok" and ep.ended_at is not None and ep.graph_name == "agent"
    assert store.turn("a").output_message == {"type": "ai", "data": {"content": "hi"}}


@pytest.mark.parametrize("as_json", [False, True], ids=["records", "json"])
def test_an_episode_start_can_carry_its_end(store, as_json):
    """An episode that starts and ends in one callback event is one record; a thread invoked again ends
    with its latest end, and a start alone never reopens an ended episode (same rows either way in)."""
    import orjson

    def write(batch):
        store.write_records_json(orjson.dumps(batch).decode()) if as_json else store.write_records(batch)

    t0 = time.time()
    first = {**_episode("t", t=t0), "ended_at": t0 + 1, "status": "ok", "metadata": {"user": "alice"}}
    again = {**_episode("t", t=t0 + 2), "ended_at": t0 + 3, "status": "error", "error": "boom"}
    write([first, _turn("a", eid="t", t=t0), again, _turn("b", eid="t", t=t0 + 2)])
    (ep,) = store.episodes()
    assert (ep.status, ep.error, ep.metadata) == ("error", "boom", {"user": "alice"})
    assert ep.started_at.timestamp() == pytest.approx(t0, abs=1e-6)
    assert ep.ended_at.timestamp() == pytest.approx(t0 + 3, abs=1e-6)
    write([_episode("t", t=t0 + 4)])  # a start alone: the row stays as it ended
    assert store.episodes()[0].status == "error"
    write([{"type": "episode_end", "id": "t", "ended_at": t0 + 5, "status": "ok"}])
    assert store.episode("t").status == "ok" and store.episode("t").error is None
    assert [t.id for t in store.turns()] == ["a", "b"]


def test_turn_fields_round_trip(store):
    t0 = time.time()
    rec = _turn(
        "a",
        t=t0,
        node="agent",
        step=3,
        checkpoint_ns="sub:1",
        input_messages=[{"type": "human", "data": {"content": "q"}}],
        usage={"input_tokens": 3, "output_tokens": 2, "total_tokens": 5},
        model_name="m",
        adapter_version="v2",
        prompt_token_ids=[1, 2, 3],
        completion_token_ids=[4, 5],
        logprobs=[-0.5, -0.25],
        tokens_source="engine",
        sampling={"temperature": 1.0},
        tags=["x"],
        metadata={"k": "v"},
    )
    store.write_records([_episode(t=t0), rec])
    turn = store.turn("a")
    assert turn.node == "agent" and turn.step == 3 and turn.checkpoint_ns == "sub:1"
    assert turn.prompt_token_ids == [1, 2, 3] and turn.completion_token_ids == [4, 5]
    assert turn.logprobs == [-0.5, -0.25] and turn.tokens_source == "engine" and turn.adapter_version == "v2"
    assert turn.usage == {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}
    assert turn.started_at.tzinfo is not None
    assert abs(turn.started_at.timestamp() - t0) < 1e-3
    assert turn.tags == ["x"] and turn.metadata == {"k": "v"}


def test_turn_filters_and_order(store):
    t0 = time.time()
    store.write_records(
        [
            _episode("e1", t=t0),
            _episode("e2", t=t0),
            _turn("b", "e1", t=t0 + 2, seq=2),
            _turn("a", "e1", t=t0 + 1, seq=1),
            _turn("c", "e2", kind="tool", t=t0 + 3, seq=3, tool_name="search"),
        ]
    )
    assert [t.id for t in store.turns()] == ["a", "b", "c"]
    assert [t.id for t in store.turns(episode_id="e1")] == ["a", "b"]
    assert [t.id for t in store.turns(kind="tool")] == ["c"]
    future = datetime.now(UTC) + timedelta(hours=1)
    assert store.turns(since=future) == []
    assert len(store.turns(since=datetime.now(UTC) - timedelta(hours=1))) == 3


def test_feedback_on_turn_becomes_a_score(store):
    store.write_records([_episode(), _turn("a")])
    fb = store.add_feedback("a", 0.5, "meh")
    assert fb.run_id == "a" and fb.score == 0.5 and fb.comment == "meh"
    (score,) = store.scores("a")
    assert (score.source, score.key, score.value, score.reason) == ("feedback", "user_score", 0.5, "meh")
    store.add_feedback("a", 1.0, "better")  # same key: replaces the score, keeps both feedback rows
    (score,) = store.scores("a")
    assert score.value == 1.0 and score.attempts == 2
    assert [f.score for f in store.feedback("a")] == [0.5, 1.0]


def test_feedback_on_root_run_targets_its_last_llm_turn(store):
    t0 = time.time()
    store.write_records(
        [
            _episode(t=t0),
            _turn("first", t=t0, seq=1),
            _turn("tool", kind="tool", t=t0 + 1, seq=2),
            _turn("last", t=t0 + 2, seq=3),
        ]
    )
    store.thumbs("r1", up=False)
    (score,) = store.scores(source="feedback")
    assert score.turn_id == "last" and score.value == -1.0 and score.key == "thumbs"


def test_feedback_on_unknown_run_is_kept_without_score(store):
    store.add_feedback("not-yet-captured", 1.0)
    assert store.scores() == [] and len(store.feedback("not-yet-captured")) == 1
    with pytest.raises(TypeError, match="must be a number"):
        store.add_feedback("x", "good")


def test_scores_upsert(store):
    store.write_records([_episode(), _turn("a")])
    store.add_score("a", None, source="prm", status="unscored", reason="3/3 votes unparseable")
    store.add_score("a", 1.0, source="prm", confidence=0.67, details={"votes": [1, 1, 0]})
    (s,) = store.scores("a", source="prm")
    assert (s.value, s.status, s.attempts, s.episode_id, s.details) == (
        1.0,
        "scored",
        2,
        "e1",
        {"votes": [1, 1, 0]},
    )


def test_adapters_and_train_runs(store):
    store.add_adapter("v1", backend="local", uri="/tmp/v1", base_model="smol", status="serving")
    store.add_adapter("v2", backend="local", uri="/tmp/v2", parent_version="v1")
    store.update_adapter("v2", status="rejected", notes="worse on held-out")
    assert [(a.version, a.status) for a in store.adapters()] == [("v1", "serving"), ("v2", "rejected")]
    assert store.adapter("v2").parent_version == "v1"
    run = store.start_train_run(backend="local", config={"lr": 2e-4})
    store.finish_train_run(run.id, status="skipped", reason="no scored data")
    (got,) = store.train_runs()
    assert (got.status, got.reason, got.config) == ("skipped", "no scored data", {"lr": 2e-4})


def test_verify_reports_orphan_turns(store):
    store.write_records([_turn("a", "missing-episode")])
    assert store.verify() == ["1 turn(s) reference a missing episode"]


def test_spool_left_by_dead_process_is_replayed(store_url, tmp_path):
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    t0 = time.time()
    lines = [json.dumps([_episode(t=t0), _turn("a", t=t0)]), json.dumps([_turn("b", t=t0 + 1, seq=2)])]
    # pid 999999 does not exist; the final line was cut mid-write by the crash
    (spool_dir / "999999-deadbeef-000000.jsonl").write_text("\n".join(lines) + '\n[{"type": "tu')
    store = TraceStore(store_url, spool_dir=spool_dir)
    assert store.replayed == 3
    assert [t.id for t in store.turns()] == ["a", "b"]
    assert list(spool_dir.iterdir()) == []
    assert store.verify() == []


def test_requests_per_minute(store):
    t = time.time()
    store.write_records([_episode(t=t)] + [_turn(f"r{i}", t=t - i, seq=i, created_at=t - i) for i in range(6)]
                        + [_turn("old", t=t - 3600, seq=99, created_at=t - 3600)])
    assert store.requests_per_minute(window_s=60) == 6.0


def test_in_memory_store_keeps_a_transaction_another_thread_has_open():
    """One connection serves every thread of an in-memory store: a reader closing it must not roll back a
    writer's open transaction (it did: a scheduler event written by the watchdog thread vanished)."""
    import threading

    from langchain_metaclaw.schedule.events import recent_events, record_event

    store = TraceStore("sqlite://")
    inserted, read_done = threading.Event(), threading.Event()

    def writer():
        with store.engine.begin() as conn:
            conn.execute(schema.schedule_events.insert().values(
                at=datetime.now(UTC), event="closed", reasons=[], details={}))
            inserted.set()
            read_done.wait(0.5)  # without the lock the reader finishes here, inside this transaction

    def reader():
        inserted.wait(5)
        recent_events(store)
        read_done.set()

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    record_event(store, "scheduler_stopped")
    assert [e.event for e in recent_events(store)] == ["scheduler_stopped", "closed"]
