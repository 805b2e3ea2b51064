"""What the layer statistics cost (training/layer_stats.py): a training step with them against one without,
in turns, on the default run's shapes and on GPT-2 124M's, and the share of a run's time at an interval.

    python -m bench.bench_layer_stats                                   # CPU: the default run, then gpt2
    python -m bench.bench_layer_stats --models gpt2 --rounds 5          # on CUDA: bf16, compiled
    python -m bench.bench_layer_stats --out bench/results               # the committed table

Each round runs `--plain` steps without statistics, then one with; a variant's time is its median over the
rounds, so a drift in the machine's speed falls on both alike. The cost at interval k is the stats step's
extra time over k plain steps. Writes <out>/layer-stats-<device>.json and .md (device, versions, commit).
"""

import argparse
import json
import statistics
import time

import torch

from bench.common import LOCAL, fresh_trainer, random_token_dir, sync, write_results
from runtime.device import environment
from training.config import TrainConfig
from training.layer_stats import LayerStats

DEFAULT_INTERVAL = TrainConfig().layer_stats_interval
SHAPES = {  # model: (block_size, micro_batch_size): the default run's, and gpt2's on the device
    "gpt2-mini": {"cpu": (128, 16), "cuda": (128, 16)},
    "gpt2": {"cpu": (1024, 1), "cuda": (1024, 16)},
}


def measure(model: str, device: torch.device, args, data_dir: str) -> dict:
    block_size, micro_batch_size = SHAPES[model][device.type]
    trainer = fresh_trainer(
        dict(
            model=model,
            block_size=block_size,
            micro_batch_size=micro_batch_size,
            tokens_per_step=block_size * micro_batch_size,
            data_dir=data_dir,
            device=str(device),
            compile=args.compile,
            lr_rule="single",
            warmup_steps=1,
            max_steps=10**6,
        ),
        device,
    )
    for step in range(args.warmup):  # compilation and the optimizer's state
        trainer.step(step)
    timed = time_stats(trainer, device, args.warmup, args.rounds, args.plain)
    return {
        "model": model,
        "block_size": block_size,
        "micro_batch_size": micro_batch_size,
        "precision": trainer.c.dtype,
        "compiled": trainer.compiled,
        "parameters": trainer.raw_model.num_params(),
        **timed,
    }


def time_stats(trainer, device: torch.device, step: int, rounds: int, plain: int) -> dict:
    """From optimizer step `step` of a warmed-up trainer on: rounds of `plain` steps, then one with layer
    statistics; the median of each, the extra time, and its share of a run at some intervals."""
    stats = LayerStats(trainer.raw_model)
    trainer.step(step, stats)  # the first stats step allocates its copies
    step += 1
    plain_times, stats_times = [], []
    for _ in range(rounds):
        for with_stats in [False] * plain + [True]:
            sync(device)
            start = time.perf_counter()
            trainer.step(step, stats if with_stats else None)
            sync(device)
            (stats_times if with_stats else plain_times).append(time.perf_counter() - start)
            step += 1
    plain_s, stats_s = statistics.median(plain_times), statistics.median(stats_times)
    extra = stats_s - plain_s
    return {
        "tensors": len(stats.names),
        "plain_ms": 1000 * plain_s,
        "stats_step_ms": 1000 * stats_s,
        "extra_ms": 1000 * extra,
        "cost_at_interval": {k: extra / (k * plain_s) for k in (1, DEFAULT_INTERVAL, 100)},
        "rounds": rounds,
    }


def markdown(rows: list[dict], env: dict) -> str:
    lines = [
        f"Layer statistics' cost on {env['device']} (torch {env['torch']}), median of each variant's steps: "
        f"a step, a step with statistics, and the extra time's share of a run at interval k.",
        "",
        f"| model | tokens per step | compiled | tensors | step, ms | with statistics, ms | extra, ms | "
        f"share at 1 | at {DEFAULT_INTERVAL} (default) | at 100 |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        share = r["cost_at_interval"]
        lines.append(
            f"| {r['model']} | {r['block_size'] * r['micro_batch_size']:,} | {r['compiled']} | {r['tensors']} | "
            f"{r['plain_ms']:.1f} | {r['stats_step_ms']:.1f} | {r['extra_ms']:.1f} | {100 * share[1]:.1f}% | "
            f"{100 * share[DEFAULT_INTERVAL]:.2f}% | {100 * share[100]:.3f}% |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SHAPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", default="auto", help="auto (the run's choice) | true | false")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--plain", type=int, default=2, help="steps without statistics per round")
    parser.add_argument("--out", default=LOCAL)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    data_dir = random_token_dir(50257)
    rows = []
    for model in args.models:
        rows.append(measure(model, device, args, data_dir))
        print(json.dumps(rows[-1]), flush=True)
    env = environment(device)
    write_results(args.out, "layer-stats", env, rows, markdown(rows, env))
    return rows


if __name__ == "__main__":
    main()
