"""What the layer-wise learning-rate measurement costs: the time of T measurement batches against the
run it precedes.

    python -m bench.bench_lwlr                           # gpt2, T=100, micro-batch 12 x 1024 (config/train_gpt2.py)
    python -m bench.bench_lwlr --T 2 --micro_batch_size 12   # CPU: time 2 batches and extrapolate to T=100

A measurement batch is one forward and backward of the model at the training micro-batch size, plus a
mean |g| per layer; the run does grad_accum such micro-batches per step for max_steps steps, so the
measurement costs about T / (grad_accum * max_steps) of the run's forward-backward work. Uses random
token ids: the cost does not depend on the data. Writes bench/results/lwlr-<device>.json.
"""

import argparse
import json
import time

import torch

import lwlr
from bench.common import LOCAL, results_base, sync
from model import GPT, GPTConfig
from runtime.device import autocast, environment


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--T", type=int, default=100, help="batches actually timed")
    parser.add_argument("--T_reported", type=int, default=100, help="the T the estimate is for (the paper's 100)")
    parser.add_argument("--micro_batch_size", type=int, default=12)
    parser.add_argument("--block_size", type=int, default=1024)
    parser.add_argument("--grad_accum", type=int, default=40, help="micro-batches per step of the run compared against")
    parser.add_argument("--max_steps", type=int, default=600_000, help="steps of the run compared against")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--out", default=LOCAL, help="results folder (default out-bench/; bench/results: the committed ones)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(args.model, block_size=args.block_size)).to(device)
    ids = torch.randint(0, model.config.vocab_size, (args.T, 2, args.micro_batch_size, args.block_size), device=device)
    batches = [(x, y) for x, y in ids]
    ctx = autocast(device, "auto")
    lwlr.compute_multipliers(model, batches[:1], T=1, ctx=ctx)  # warm-up: allocator, kernels
    sync(device)
    start = time.perf_counter()
    lwlr.compute_multipliers(model, batches, T=args.T, ctx=ctx)
    sync(device)
    seconds = time.perf_counter() - start
    per_batch = seconds / args.T
    estimate = per_batch * args.T_reported
    run_batches = args.grad_accum * args.max_steps
    result = {
        "env": environment(device),
        "model": args.model,
        "micro_batch_size": args.micro_batch_size,
        "block_size": args.block_size,
        "T_timed": args.T,
        "seconds_timed": seconds,
        "seconds_per_batch": per_batch,
        "T_reported": args.T_reported,
        "seconds_for_T_reported": estimate,
        "run_micro_batches": run_batches,
        "fraction_of_run_forward_backward": args.T_reported / run_batches,
    }
    print(
        f"{result['env']['device']}: {args.model}, micro-batch {args.micro_batch_size} x {args.block_size}: "
        f"{per_batch:.3f} s per measurement batch; T={args.T_reported}: {estimate:.1f} s "
        f"({'measured' if args.T == args.T_reported else f'extrapolated from {args.T} batches'}), "
        f"{100 * result['fraction_of_run_forward_backward']:.5f}% of a {args.max_steps:,}-step run's "
        f"forward-backward work"
    )
    path = results_base(args.out, f"lwlr-{args.model}", result["env"]["device"]) + ".json"
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
