"""Sampling throughput of LocalEngine: one request at a time vs batched decoding, on the embedded model.

Two workloads of on-policy RL on the CPU (the learning benchmark's ToolCallFormatTask prompts):

  group   G completions of one prompt at temperature 1 (an on-policy group):
            sequential   G x generate(seed=row seed)
            group-drop   sample_group (finished rows leave the batch: the engine's default)
            group-mask   sample_group with finished rows kept in the batch and masked (engine._drop_finished=False)
          The same row seeds in every variant, so they generate (nearly always exactly) the same tokens.
  eval    greedy answers to P different prompts (the promotion gate):
            sequential   P x generate
            batch        generate_batch(batch_size=8): left-padded batches
          and how many of the P greedy outputs differ from generate's.

Variants are interleaved round by round, so machine noise hits each alike; the median round is reported,
as wall-clock tokens/s and as process CPU-milliseconds per token (less sensitive to other processes sharing
the cores; with 2 threads it counts both).

    python benchmarks/sampling.py [--threads 1 2] [--group-size 8] [--max-new-tokens 48] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--skip-eval", action="store_true")
    args = parser.parse_args()

    import torch

    from langchain_metaclaw.engine.local import LocalEngine
    from langchain_metaclaw.tasks import ToolCallFormatTask

    engine = LocalEngine()
    task = ToolCallFormatTask()
    prompts = [p.messages for p in task.train]
    eval_prompts = [p.messages for p in (task.held_out + task.train)][: args.eval_prompts]
    n, tokens = args.group_size, args.max_new_tokens

    def sequential(prompt, seeds):
        return [engine.generate(prompt, max_new_tokens=tokens, temperature=1.0, seed=s) for s in seeds]

    def group(prompt, seeds, drop):
        engine._drop_finished = drop
        try:
            return engine.sample_group(prompt, n=n, max_new_tokens=tokens, temperature=1.0, seed=seeds)
        finally:
            engine._drop_finished = True

    group_variants = {
        "sequential": sequential,
        "group-drop": lambda p, s: group(p, s, True),
        "group-mask": lambda p, s: group(p, s, False),
    }
    eval_variants = {
        "sequential": lambda ps: [engine.generate(p, max_new_tokens=tokens) for p in ps],
        "batch": lambda ps: engine.generate_batch(ps, max_new_tokens=tokens, batch_size=8),
    }

    def timed(fn, *fn_args):
        wall, cpu = time.perf_counter(), time.process_time()
        results = fn(*fn_args)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        count = sum(len(r.completion_token_ids) for r in results)
        return results, count / wall, 1000 * cpu / count

    def report(title, rates, cpus):
        base = statistics.median(rates["sequential"])
        print(title)
        for name, values in rates.items():
            rate, cpu = statistics.median(values), statistics.median(cpus[name])
            rounds = ", ".join(f"{v:.1f}" for v in values)
            print(
                f"  {name:<11} {rate:6.1f} tok/s {rate / base:5.2f}x  {cpu:6.1f} CPU-ms/token   rounds: {rounds}"
            )

    for threads in args.threads:
        torch.set_num_threads(threads)
        engine.generate(prompts[0], max_new_tokens=4)  # warm up
        rates: dict[str, list[float]] = {name: [] for name in group_variants}
        cpus: dict[str, list[float]] = {name: [] for name in group_variants}
        same = total = 0
        for round_ in range(args.rounds):
            prompt = prompts[round_ % len(prompts)]
            seeds = [1000 * round_ + i for i in range(n)]
            outputs = {}
            for name, fn in group_variants.items():
                results, rate, cpu = timed(fn, prompt, seeds)
                outputs[name] = [r.completion_token_ids for r in results]
                rates[name].append(rate)
                cpus[name].append(cpu)
            for row in range(n):
                total += 1
                same += outputs["sequential"][row] == outputs["group-drop"][row] == outputs["group-mask"][row]
        report(
            f"group: {threads} thread(s), G={n}, <= {tokens} new tokens, {args.rounds} rounds (median):",
            rates,
            cpus,
        )
        print(f"  rows identical in all three variants: {same}/{total}", flush=True)

        if args.skip_eval:
            continue
        rates = {name: [] for name in eval_variants}
        cpus = {name: [] for name in eval_variants}
        differ = 0
        for _ in range(args.rounds):
            outputs = {}
            for name, fn in eval_variants.items():
                results, rate, cpu = timed(fn, eval_prompts)
                outputs[name] = [r.completion_token_ids for r in results]
                rates[name].append(rate)
                cpus[name].append(cpu)
            differ = sum(a != b for a, b in zip(outputs["sequential"], outputs["batch"], strict=True))
        report(
            f"eval: {threads} thread(s), {len(eval_prompts)} prompts, greedy, <= {tokens} new tokens, "
            f"{args.rounds} rounds (median):",
            rates,
            cpus,
        )
        print(f"  greedy outputs that differ from generate(): {differ}/{len(eval_prompts)}", flush=True)


if __name__ == "__main__":
    main()
