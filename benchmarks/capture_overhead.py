"""Per-LLM-call overhead of capture, in microseconds over a no-callback baseline.

Runs, interleaved in one process so machine noise hits every variant alike:
  baseline     a fake chat model, no callbacks
  noop         a handler that does nothing (the cost of LangChain's callback machinery itself)
  langsmith    LangSmith's LangChainTracer pointed at an unreachable endpoint (it only queues)
  metaclaw     MetaClawCallbackHandler on a temporary SQLite store (spool + queue + writer thread)
Each call sends a 3-message conversation (``--history N``: N messages, as an agent that has made earlier
tool rounds resends them) and gets a tool-calling AIMessage back, like an agent turn, and
each call is its own episode (the worst case: the episode's record is written with every call; in an
agent it is shared by all the turns of an invocation). Rounds of 2000 calls span many of the writer's
batches (it sleeps 50 ms between them): much shorter rounds would leave its work to the untimed flush.

Two scenarios:
  cpu-bound   the model answers instantly: any background thread's work is charged to the caller (GIL)
  io-bound    the model takes --latency-ms like a remote LLM; background work overlaps the wait, so the
              overhead is what the agent's own thread pays

    python benchmarks/capture_overhead.py [--calls 2000] [--rounds 7] [--latency-ms 2] [--history 3]
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import random
import statistics
import tempfile
import time

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult

TARGET_US = 60.0


class _FixedModel(BaseChatModel):
    latency_s: float = 0.0

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        if self.latency_s:
            time.sleep(self.latency_s)
        msg = AIMessage(
            content="Let me look that up.",
            tool_calls=[{"name": "search", "args": {"query": "weather in Paris"}, "id": "call_1"}],
            usage_metadata={"input_tokens": 42, "output_tokens": 12, "total_tokens": 54},
        )
        return ChatResult(generations=[ChatGeneration(message=msg)])

    @property
    def _llm_type(self) -> str:
        return "fixed"


class _Noop(BaseCallbackHandler):
    run_inline = True

    def on_chat_model_start(self, *args, **kwargs):
        pass


MESSAGES = [
    SystemMessage("You are a helpful assistant with a search tool."),
    HumanMessage("What's the weather in Paris today? I'm planning a walk."),
    AIMessage("Sure, one moment."),
]


def conversation(length: int) -> list:
    """``MESSAGES`` followed by earlier tool rounds (question, call, result, answer) up to ``length``
    messages: an agent resends its whole history, as the same message objects, on every call."""
    messages = list(MESSAGES)
    for i in itertools.count():
        if len(messages) >= length:
            return messages[:length]
        messages += [
            HumanMessage(f"And in city {i}? Same walk, another day."),
            AIMessage("", tool_calls=[{"name": "search", "args": {"query": f"weather city {i}"}, "id": f"c{i}"}]),
            ToolMessage(f"Sunny, {18 + i % 10} degrees, light wind from the west.", tool_call_id=f"c{i}"),
            AIMessage(f"It will be sunny in city {i}, {18 + i % 10} degrees."),
        ]


def _per_call_us(model, callbacks, calls: int, flush=None, messages=MESSAGES) -> tuple[float, float, float]:
    """(wall, agent-thread CPU, whole-process CPU) microseconds per call; process CPU includes the flush of
    everything the calls queued, so background work is charged to the variant that caused it."""
    config = {"callbacks": callbacks} if callbacks else {}
    for _ in range(calls // 10):  # untimed: a variant that follows a long wait (LangSmith's flush) starts cold
        model.invoke(messages, config=config)
    wall, thread, proc = time.perf_counter(), time.thread_time(), time.process_time()
    for _ in range(calls):
        model.invoke(messages, config=config)
    wall, thread = time.perf_counter() - wall, time.thread_time() - thread
    if flush is not None:
        flush()
    proc = time.process_time() - proc
    return wall / calls * 1e6, thread / calls * 1e6, proc / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--latency-ms", type=float, default=2.0)
    parser.add_argument("--history", type=int, default=len(MESSAGES),
                        help="messages each call sends (an agent's history grows with every tool round)")
    args = parser.parse_args()
    messages = conversation(args.history)

    os.environ.setdefault("LANGSMITH_TRACING", "false")
    logging.getLogger("langsmith").setLevel(logging.CRITICAL)  # it cannot reach its endpoint, by design
    from langchain_core.tracers.langchain import LangChainTracer
    from langsmith import Client
    from urllib3.util.retry import Retry

    from langchain_metaclaw import MetaClawCallbackHandler, TraceStore

    tmp = tempfile.mkdtemp(prefix="metaclaw-bench-")
    os.environ["METACLAW_HOME"] = tmp
    store = TraceStore(f"sqlite:///{tmp}/bench.db")
    handler = MetaClawCallbackHandler(store)
    # No retries: each batch is serialised and sent once, as to a reachable endpoint (retrying a refused
    # connection only adds minutes of backoff sleeps to the flushes, never measured work).
    tracer = LangChainTracer(client=Client(api_url="http://127.0.0.1:9", api_key="lsv2-bench-unreachable",
                                           retry_config=Retry(total=0)))
    variants = {"baseline": None, "noop": [_Noop()], "langsmith": [tracer], "metaclaw": [handler]}
    results: dict[str, dict[str, float]] = {}
    cpu_results: dict[str, dict[str, float]] = {}
    proc_results: dict[str, dict[str, float]] = {}
    for scenario, latency, calls in (("cpu-bound", 0.0, args.calls), ("io-bound", args.latency_ms / 1e3, args.calls // 5)):
        model = _FixedModel(latency_s=latency)
        # LangSmith's client serialises and sends from its own thread: drain that queue too, or its leftover
        # work lands in (and is charged to) whichever variant runs next. With a timeout: its
        # wait_for_futures() has none, and it once hung a run for 20 minutes after the sender thread stopped.
        flushes = {"metaclaw": lambda: handler.flush(60),
                   "langsmith": lambda: tracer.client.flush(timeout=60)}
        for name, cbs in variants.items():  # warm-up
            _per_call_us(model, cbs, 100, flushes.get(name), messages)
        samples: dict[str, list[tuple[float, float, float]]] = {k: [] for k in variants}
        order = random.Random(0)
        for _ in range(args.rounds):
            for name in order.sample(list(variants), len(variants)):  # no variant always follows another
                samples[name].append(_per_call_us(model, variants[name], calls, flushes.get(name), messages))
        med = {k: [statistics.median(x[i] for x in v) for i in range(3)] for k, v in samples.items()}
        over = {k: [med[k][i] - med["baseline"][i] for i in range(3)] for k in variants}
        results[scenario] = {k: over[k][0] for k in variants}
        cpu_results[scenario] = {k: over[k][1] for k in variants}
        proc_results[scenario] = {k: over[k][2] for k in variants}
        print(f"\n[{scenario}] model latency {latency * 1e3:.1f} ms, {len(messages)} messages a call, "
              f"{calls} calls x {args.rounds} rounds, median; "
              "overhead over baseline in us per call")
        print(f"{'variant':<10} {'wall':>9} {'agent-thread CPU':>17} {'process CPU (incl. writer)':>27}")
        for name in variants:
            print(f"{name:<10} {over[name][0]:9.1f} {over[name][1]:17.1f} {over[name][2]:27.1f}")
        for i, label in enumerate(("wall", "agent-thread CPU", "process CPU")):
            print(f"metaclaw / langsmith ({label}): {over['metaclaw'][i] / over['langsmith'][i]:.2f}")
    print("\nsummary (target: <= 60 us per call and no more than LangSmith's tracer)")
    for label, table in (("wall", results), ("agent-thread CPU", cpu_results), ("process CPU", proc_results)):
        for scenario, over in table.items():
            ok = over["metaclaw"] <= TARGET_US and over["metaclaw"] <= over["langsmith"]
            print(f"  {label:<17} {scenario:<10} metaclaw {over['metaclaw']:7.1f} us, langsmith "
                  f"{over['langsmith']:7.1f} us: {'meets target' if ok else 'ABOVE TARGET'}")
    stats = handler.stats
    print(f"records written: {stats.written} of {stats.submitted} submitted, write errors: {stats.write_errors}")
    handler.close()


if __name__ == "__main__":
    main()
