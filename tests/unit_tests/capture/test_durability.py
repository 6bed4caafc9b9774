"""Zero data loss: SIGKILL mid-run, a database that goes away and comes back, a full disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage

from langchain_metaclaw import MetaClawCallbackHandler, TraceStore
from langchain_metaclaw.store import spool as spool_module
from tests.fixtures.fakes import ScriptedChatModel
from tests.fixtures.postgres import PostgresServer

REPO = Path(__file__).resolve().parents[3]

CHILD = textwrap.dedent(
    """
    import sys, time
    from langchain_core.messages import AIMessage, HumanMessage
    from langchain.agents import create_agent
    from langchain_metaclaw import MetaClawCallbackHandler, TraceStore
    from tests.fixtures.fakes import ScriptedChatModel

    url, max_delay = sys.argv[1], float(sys.argv[2])
    # max_delay large: the writer thread waits to fill a batch and commits nothing before the kill,
    # so everything the store has afterwards came from the spool.
    handler = MetaClawCallbackHandler(TraceStore(url), max_delay=max_delay, batch_size=10**6)
    agent = create_agent(ScriptedChatModel(script=[AIMessage("answer")]), [])
    i = 0
    while True:
        out = agent.invoke({"messages": [HumanMessage(f"q{i}")]}, config={"callbacks": [handler]})
        print(f"done q{i}", flush=True)
        i += 1
        time.sleep(0.01)
    """
)


@pytest.mark.parametrize("max_delay", [3600.0, 0.01], ids=["nothing-committed", "writer-running"])
def test_sigkill_loses_no_completed_turn(store_url, max_delay):
    TraceStore(store_url).close()  # migrate first so the child starts fast
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, store_url, str(max_delay)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    done = []
    try:
        while len(done) < 25:
            line = child.stdout.readline()
            if not line:
                pytest.fail(f"child died: {child.stderr.read()}")
            done.append(line.split()[1])
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    store = TraceStore(store_url)  # opening replays the dead child's spool
    captured = {t.input_messages[0]["data"]["content"] for t in store.turns(kind="llm")}
    assert set(done) <= captured, sorted(set(done) - captured)
    assert all(e.status == "ok" for e in store.episodes() if e.ended_at)
    if max_delay > 1000:
        assert store.replayed >= 3 * len(done)
    assert store.verify() == []
    assert list(store.spool_dir.glob("*.jsonl")) == []


def test_database_down_then_back(tmp_path):
    server = PostgresServer()
    server.start()
    try:
        url = server.create_database()
        store = TraceStore(url)
        handler = MetaClawCallbackHandler(store)
        model = ScriptedChatModel(script=[AIMessage("ok")])
        model.invoke("before", config={"callbacks": [handler]})
        assert handler.flush(10)
        server._run("pg_ctl", "-D", str(server.data), "-m", "immediate", "-w", "stop")
        for i in range(5):  # the agent keeps working while the database is gone
            assert model.invoke(f"during {i}", config={"callbacks": [handler]}).content == "ok"
        assert not handler.flush(1.0)
        assert handler.stats.write_errors >= 1 and handler.stats.pending == 5
        opts = f"-p {server.port} -c listen_addresses=127.0.0.1 -k {server.root}"
        server._run(
            "pg_ctl", "-D", str(server.data), "-o", opts, "-l", str(server.root / "log"), "-w", "start"
        )
        assert handler.flush(30), handler.stats
        contents = sorted(t.input_messages[0]["data"]["content"] for t in store.turns())
        assert contents == ["before"] + [f"during {i}" for i in range(5)]
        handler.close()
        assert list(store.spool_dir.glob("*.jsonl")) == []
    finally:
        server.stop()


def test_full_disk_keeps_the_agent_running(store, monkeypatch):
    real_open = os.open

    def open_on_full_disk(path, flags, mode=0o777, **kw):
        if str(path).endswith(".jsonl"):
            return real_open("/dev/full", os.O_WRONLY)  # every write fails with ENOSPC
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(spool_module.os, "open", open_on_full_disk)
    monkeypatch.setattr(spool_module, "fcntl", None)
    handler = MetaClawCallbackHandler(store)
    model = ScriptedChatModel(script=[AIMessage("still answering")])
    for _ in range(3):
        assert model.invoke("hi", config={"callbacks": [handler]}).content == "still answering"
    assert handler.flush(10)
    stats = handler.stats
    assert stats.spool_errors == 3 and "No space left" in stats.last_error
    assert len(store.turns()) == 3  # the queue still delivered them to the database
    handler.close()


def test_flush_and_close_report_timeouts(store):
    handler = MetaClawCallbackHandler(store, max_delay=0.01)
    ScriptedChatModel(script=[AIMessage("x")]).invoke("hi", config={"callbacks": [handler]})
    start = time.monotonic()
    assert handler.close(10)
    assert time.monotonic() - start < 10
    ScriptedChatModel(script=[AIMessage("x")]).invoke("after close", config={"callbacks": [handler]})
    assert len(store.turns()) == 1  # a closed handler captures nothing and raises nothing
