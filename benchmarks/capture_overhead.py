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

Each scenario also prints what the baseline call itself costs: behind a sleeping model every line of code
after the wake-up runs slower (cold caches), ours and LangChain's alike, and on a shared VM by a factor
that drifts from minute to minute. Rounds of hundreds of calls catch different drift states, so behind a
sleeping model the variants are also measured alternated call by call (``--alternated-calls``): each call
picks a variant at random, every variant sees the same machine states, and the no-op handler (a control
that runs none of our code) shows how much of the reading is noise. The writer thread's
background work then overlaps every variant's sleeps alike; process CPU is not split per variant there.

    python benchmarks/capture_overhead.py [--calls 2000] [--rounds 7] [--latency-ms 2] [--history 3]
                                          [--alternated-calls 8000]
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


def _alternated_us(model, variants: dict, calls: int, messages) -> dict[str, list[float]]:
    """Agent-thread CPU microseconds of each call, the variant drawn at random for every call."""
    configs = {name: {"callbacks": cbs} if cbs else {} for name, cbs in variants.items()}
    names = list(configs)
    draw = random.Random(1)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for name in names * 20:  # untimed warm-up
        model.invoke(messages, config=configs[name])
    clock = time.thread_time_ns
    for _ in range(calls):
        name = names[draw.randrange(len(names))]
        config = configs[name]
        start = clock()
        model.invoke(messages, config=config)
        samples[name].append((clock() - start) / 1e3)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--latency-ms", type=float, default=2.0)
    parser.add_argument("--history", type=int, default=len(MESSAGES),
                        help="messages each call sends (an agent's history grows with every tool round)")
    parser.add_argument("--alternated-calls", type=int, default=8000,
                        help="calls alternated at random between baseline, no-op and metaclaw behind the "
                             "sleeping model (0: skip)")
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
    instant_baseline_cpu_us = 0.0
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
        if not latency:
            instant_baseline_cpu_us = med["baseline"][1]
        print(f"baseline call itself: {med['baseline'][0]:.1f} us wall "
              f"({med['baseline'][0] - latency * 1e6:.1f} beyond the model's latency), "
              f"{med['baseline'][1]:.1f} us agent-thread CPU")
        print(f"{'variant':<10} {'wall':>9} {'agent-thread CPU':>17} {'process CPU (incl. writer)':>27}")
        for name in variants:
            print(f"{name:<10} {over[name][0]:9.1f} {over[name][1]:17.1f} {over[name][2]:27.1f}")
        for i, label in enumerate(("wall", "agent-thread CPU", "process CPU")):
            print(f"metaclaw / langsmith ({label}): {over['metaclaw'][i] / over['langsmith'][i]:.2f}")
    alternated_over = None
    if args.alternated_calls:
        alternated = {k: variants[k] for k in ("baseline", "noop", "metaclaw")}
        samples = _alternated_us(_FixedModel(latency_s=args.latency_ms / 1e3), alternated,
                                 args.alternated_calls, messages)
        handler.flush(60)
        base = samples["baseline"]
        print(f"\n[io-bound, alternated] model latency {args.latency_ms:.1f} ms, {args.alternated_calls} calls, "
              "each a variant drawn at random; agent-thread CPU in us per call")
        print(f"baseline call itself: mean {statistics.fmean(base):.1f}, median {statistics.median(base):.1f} "
              f"({statistics.fmean(base) / instant_baseline_cpu_us:.1f}x its cpu-bound cost: "
              "code after the wait runs that much slower here)")
        for name in ("noop", "metaclaw"):
            xs = samples[name]
            two_se = 2 * (statistics.pvariance(xs) / len(xs) + statistics.pvariance(base) / len(base)) ** 0.5
            print(f"{name:<10} over baseline: mean {statistics.fmean(xs) - statistics.fmean(base):6.1f} "
                  f"(+-{two_se:.1f}, 2 SE), median {statistics.median(xs) - statistics.median(base):6.1f}")
        alternated_over = statistics.fmean(samples["metaclaw"]) - statistics.fmean(base)
    print("\nsummary (target: <= 60 us per call and no more than LangSmith's tracer)")
    for label, table in (("wall", results), ("agent-thread CPU", cpu_results), ("process CPU", proc_results)):
        for scenario, over in table.items():
            ok = over["metaclaw"] <= TARGET_US and over["metaclaw"] <= over["langsmith"]
            print(f"  {label:<17} {scenario:<10} metaclaw {over['metaclaw']:7.1f} us, langsmith "
                  f"{over['langsmith']:7.1f} us: {'meets target' if ok else 'ABOVE TARGET'}")
    if alternated_over is not None:
        print(f"  agent-thread CPU  io-bound, alternated call by call: metaclaw {alternated_over:7.1f} us "
              f"(the rounds' io-bound rows carry the no-op row's error): "
              f"{'meets target' if alternated_over <= TARGET_US else 'ABOVE TARGET'}")
    stats = handler.stats
    print(f"records written: {stats.written} of {stats.submitted} submitted, write errors: {stats.write_errors}")
    handler.close()


if __name__ == "__main__":
    main()
