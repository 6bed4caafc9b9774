"""Training throughput of the local backend's ``forward_backward`` against naive padded peft loops.

Same model (SmolLM2-135M-Instruct + LoRA r16 on all projections, fp32), same samples (32 sequences with
lengths drawn uniformly from 40-400 tokens, the last third of each a "completion" with an advantage), same
``importance_sampling`` loss, gradients only (no optimizer step). Variants, interleaved round by round so
machine noise hits each alike:

  metaclaw       LocalTrainingBackend.forward_backward: sort by length, micro-batches under a token budget
  padded-global  the whole batch padded to its longest sample ("one padded batch"), run in chunks of
                 token_budget // longest rows so memory stays comparable
  padded-chunk   a typical HF loop: fixed micro-batches of 4 samples in arrival order, each padded to its own
                 longest sample (DataCollatorWithPadding)

Throughput counts real (unpadded) tokens per second. Peak RSS is the process high-water mark after the
metaclaw variant's first round (the model and everything before it included).

    python benchmarks/train_throughput.py [--samples 32] [--min-len 40] [--max-len 400] [--rounds 2]
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import sys
import tempfile
import time

TARGET_RATIO = 1.3


def make_data(n: int, min_len: int, max_len: int, vocab: int, seed: int = 0):
    from langchain_metaclaw.training import datum_from_tokens

    rng = random.Random(seed)
    data = []
    for _ in range(n):
        total = rng.randint(min_len, max_len)
        n_prompt = total - max(1, total // 3)
        tokens = [rng.randrange(100, vocab) for _ in range(total)]
        completion = tokens[n_prompt:]
        data.append(
            datum_from_tokens(tokens[:n_prompt], completion, [-2.0] * len(completion), rng.uniform(-1.0, 1.0))
        )
    return data


def naive_forward_backward(model, data, chunks: list[list[int]], pad_to: int | None) -> None:
    """A plain peft loop: right-pad each chunk (to ``pad_to`` or its own longest), log_softmax, IS loss."""
    import torch

    for idx in chunks:
        rows = [data[i] for i in idx]
        width = pad_to or max(d.length for d in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        targets = torch.zeros_like(ids)
        sampler = torch.zeros((len(rows), width))
        adv = torch.zeros((len(rows), width))
        for r, d in enumerate(rows):
            n = d.length
            ids[r, :n] = torch.tensor(d.model_input)
            mask[r, :n] = 1
            targets[r, :n] = torch.tensor(d.loss_fn_inputs["target_tokens"])
            sampler[r, :n] = torch.tensor(d.loss_fn_inputs["logprobs"])
            adv[r, :n] = torch.tensor(d.loss_fn_inputs["advantages"])
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        loss = -(torch.exp(logp - sampler) * adv * mask).sum()
        loss.backward()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--min-len", type=int, default=40)
    parser.add_argument("--max-len", type=int, default=400)
    parser.add_argument("--token-budget", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch

    from langchain_metaclaw.errors import BackendUnavailableError
    from langchain_metaclaw.training.backends.local import LocalTrainingBackend

    try:
        from langchain_metaclaw.models.embedded import load_base_model

        started = time.perf_counter()
        model, _ = load_base_model()
        label = f"SmolLM2-135M-Instruct (loaded in {time.perf_counter() - started:.1f} s)"
    except (ImportError, BackendUnavailableError) as exc:
        import transformers

        print(f"SmolLM2 is not available ({exc}); measuring a random 4-layer Llama instead", file=sys.stderr)
        config = transformers.LlamaConfig(
            vocab_size=49152,
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,
        )
        model = transformers.LlamaForCausalLM(config).eval()
        label = "random 4-layer Llama (SmolLM2 unavailable)"

    backend = LocalTrainingBackend(
        model=model, base_model="bench", token_budget=args.token_budget, threads=args.threads,
        output_dir=tempfile.mkdtemp(prefix="metaclaw-bench-"), device="cpu",
    )  # fmt: skip
    vocab = model.config.vocab_size
    data = make_data(args.samples, args.min_len, args.max_len, vocab)
    real = sum(d.length for d in data)
    longest = max(d.length for d in data)
    rows_global = max(1, args.token_budget // longest)
    chunks_global = [
        list(range(i, min(i + rows_global, len(data)))) for i in range(0, len(data), rows_global)
    ]
    chunks_4 = [list(range(i, min(i + 4, len(data)))) for i in range(0, len(data), 4)]
    padded_chunk = sum(4 * max(data[i].length for i in c) for c in chunks_4)

    print(f"model: {label}; torch threads: {torch.get_num_threads()}; device: {backend.device}")
    print(
        f"batch: {len(data)} samples, {args.min_len}-{args.max_len} tokens (longest {longest}), {real} real tokens; "
        f"padded-global computes {len(data) * longest}, padded-chunk {padded_chunk}"
    )
    # Warm-up: one short pass through each code path (allocator, kernels).
    warm = data[:2]
    backend.forward_backward(warm, "importance_sampling")
    naive_forward_backward(backend.model, warm, [[0, 1]], None)
    backend.model.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {"metaclaw": [], "padded-global": [], "padded-chunk": []}
    peak_rss_gb = None
    micro = None
    for _ in range(args.rounds):
        for name in times:
            backend.model.train()
            started = time.perf_counter()
            if name == "metaclaw":
                out = backend.forward_backward(data, "importance_sampling")
                micro = out.metrics
            elif name == "padded-global":
                naive_forward_backward(backend.model, data, chunks_global, longest)
            else:
                naive_forward_backward(backend.model, data, chunks_4, None)
            times[name].append(time.perf_counter() - started)
            backend.model.zero_grad(set_to_none=True)
            if name == "metaclaw" and peak_rss_gb is None:
                peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2

    print(f"{'variant':<14} {'seconds (median)':>17} {'real tokens/s':>14} {'vs metaclaw':>12}")
    ours = statistics.median(times["metaclaw"])
    for name, values in times.items():
        seconds = statistics.median(values)
        print(f"{name:<14} {seconds:>17.2f} {real / seconds:>14.1f} {seconds / ours:>11.2f}x")
    assert micro is not None
    print(
        f"metaclaw: {int(micro['micro_batches:sum'])} micro-batches, padding {micro['padding_frac:mean']:.1%}, "
        f"token budget {args.token_budget}; peak RSS after its first round {peak_rss_gb:.2f} GB"
    )
    ratio_global = statistics.median(times["padded-global"]) / ours
    ratio_chunk = statistics.median(times["padded-chunk"]) / ours
    verdict = "meets" if min(ratio_global, ratio_chunk) >= TARGET_RATIO else "misses"
    print(
        f"speed-up: {ratio_global:.2f}x over one padded batch, {ratio_chunk:.2f}x over padded micro-batches of 4 "
        f"({verdict} the {TARGET_RATIO}x target)"
    )
    backend.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
