"""Wall time of ``score_pending`` over 1000 captured turns with a slow judge, against the serial time.

A temporary SQLite store gets ``--turns`` llm turns (episodes of ``--turns-per-episode`` user/assistant
exchanges, each turn followed by the user's next message, so nothing waits). The judge is a chat model whose
every call takes ``--latency-ms`` (``asyncio.sleep``, like a remote API) and answers ``Score: +1``. The serial
time, ``turns x votes x latency``, is computed, not run. Target: <= 10 s for 1000 turns, 3 votes, 50 ms.

    python benchmarks/scoring.py [--turns 1000] [--votes 3] [--latency-ms 50] [--concurrency 16 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from pathlib import Path

from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage, message_to_dict
from langchain_core.outputs import ChatGeneration, ChatResult

from langchain_metaclaw.scoring import judge_health, score_pending
from langchain_metaclaw.store import TraceStore

TARGET_S = 10.0


class SlowJudge(BaseChatModel):
    latency_s: float = 0.05

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        time.sleep(self.latency_s)
        return self._result()

    async def _agenerate(self, messages, stop=None, run_manager=None, **kwargs):
        await asyncio.sleep(self.latency_s)
        return self._result()

    @staticmethod
    def _result() -> ChatResult:
        message = AIMessage(content="The answer was correct and the user moved on.\nScore: +1",
                            usage_metadata={"input_tokens": 600, "output_tokens": 14, "total_tokens": 614})
        return ChatResult(generations=[ChatGeneration(message=message)])

    @property
    def _llm_type(self) -> str:
        return "slow-judge"


def fill(store: TraceStore, turns: int, per_episode: int) -> None:
    start = time.time() - 86400
    records: list[dict] = []
    made = 0
    while made < turns:
        episode = f"ep-{uuid.uuid4().hex[:10]}"
        records.append({"type": "episode_start", "id": episode, "thread_id": episode, "started_at": start})
        history = []
        for i in range(min(per_episode, turns - made)):
            history.append(HumanMessage(f"Question {i}: what is {i} + {i}?", id=str(uuid.uuid4())))
            turn_id = str(uuid.uuid4())
            reply = AIMessage(f"{i} + {i} = {2 * i}.", id=f"run-{turn_id}")
            at = start + made
            records.append({"type": "turn", "id": turn_id, "episode_id": episode, "kind": "llm", "node": "agent",
                            "started_at": at, "ended_at": at + 0.5, "status": "ok", "seq": made,
                            "input_messages": [message_to_dict(m) for m in history],
                            "output_message": message_to_dict(reply)})
            history.append(reply)
            made += 1
        # the user's reply to the last answer arrives in one more (unscored-by-count) turn's input
        history.append(HumanMessage("Thanks!", id=str(uuid.uuid4())))
        records.append({"type": "turn", "id": str(uuid.uuid4()), "episode_id": episode, "kind": "llm",
                        "node": "agent", "started_at": start + made, "ended_at": start + made + 0.5,
                        "status": "error", "seq": made, "input_messages": [message_to_dict(m) for m in history],
                        "error": "not scored (status=error)"})
        records.append({"type": "episode_end", "id": episode, "ended_at": start + made + 1, "status": "ok"})
        if len(records) > 2000:
            store.write_records(records)
            records = []
    store.write_records(records)


def run(turns: int, votes: int, latency_ms: float, concurrency: int, per_episode: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        store = TraceStore(f"sqlite:///{Path(tmp) / 'bench.db'}", spool_dir=Path(tmp) / "spool")
        fill(store, turns, per_episode)
        judge = SlowJudge(latency_s=latency_ms / 1000)
        started, cpu = time.perf_counter(), time.process_time()
        report = score_pending(store, judge=judge, votes=votes, concurrency=concurrency)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        again = time.perf_counter()
        second = score_pending(store, judge=judge, votes=votes, concurrency=concurrency)
        idle = time.perf_counter() - again
        health = judge_health(store)
        store.close()
    assert report.scored == turns, report
    assert second.judge_calls == 0
    return {"wall": wall, "cpu": cpu, "report": report, "idle": idle, "health": health}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument("--votes", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--turns-per-episode", type=int, default=5)
    args = parser.parse_args()

    serial = args.turns * args.votes * args.latency_ms / 1000
    print(f"{args.turns} turns x {args.votes} votes x {args.latency_ms:g} ms judge latency "
          f"(episodes of {args.turns_per_episode} turns, temp SQLite file, WAL)")
    print(f"serial time (computed, not run): {serial:.1f} s")
    print(f"{'concurrency':>11} {'wall s':>8} {'cpu s':>7} {'speed-up':>9} {'ms/turn':>8} {'judge p50 ms':>13} "
          f"{'2nd pass s':>10}  target <= {TARGET_S:g} s")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {os.cpu_count()} cores, load average {load:.1f} (wall time is shared; cpu s is this process)")
    for concurrency in args.concurrency:
        result = run(args.turns, args.votes, args.latency_ms, concurrency, args.turns_per_episode)
        wall = result["wall"]
        p50 = result["health"]["latency_ms"]["p50"]
        verdict = "ok" if wall <= TARGET_S else "MISSED"
        print(f"{concurrency:>11} {wall:>8.2f} {result['cpu']:>7.2f} {serial / wall:>8.1f}x {1000 * wall / args.turns:>8.2f} "
              f"{p50:>13.1f} {result['idle']:>10.2f}  {verdict}")
        print(f"{'':>11} {result['report'].summary()}")


if __name__ == "__main__":
    main()
