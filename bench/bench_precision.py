"""What bf16 autocast costs in quality: the default run (python train.py, 200 steps) in bf16 and in fp32,
over several seeds, and the lwlr multipliers each precision measures.

    python -m bench.bench_precision                       # 3 seeds x 2 precisions: about 25 min on 2 CPU cores
    python -m bench.bench_precision --seeds 0 --max_steps 20   # a quick look

Each run is `train.py --seed=S --dtype=D --out_dir=...` in its own process, with the lwlr cache off (each
measures its own multipliers). The score is the val loss at the end; the difference of the two means
counts as a cost where it exceeds twice its standard error, sqrt(s_a^2 / n_a + s_b^2 / n_b). The
multipliers are compared layer by layer (seed by seed: the same batches, another precision). Writes
bench/results/precision-<device>.json and .md.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile

import torch

from bench.common import LOCAL, results_base
from runtime.device import environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRECISIONS = ("float32", "bfloat16")


def run(seed: int, dtype: str, work: str, extra: list[str]) -> dict:
    out = os.path.join(work, f"{dtype}-seed{seed}")
    command = [
        sys.executable,
        "train.py",
        f"--seed={seed}",
        f"--dtype={dtype}",
        f"--out_dir={out}",
        "--lwlr_cache_dir=none",
        *extra,
    ]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    with open(os.path.join(out, "lwlr.json")) as f:
        multipliers = {layer["name"]: layer["multiplier"] for layer in json.load(f)["layers"]}
    steps = [r for r in records if r["kind"] == "train"]
    return {
        "seed": seed,
        "dtype": dtype,
        "val_loss": [r for r in records if r["kind"] == "eval"][-1]["val_loss"],
        "ms_per_step": statistics.median(r["ms_per_step"] for r in steps),
        "multipliers": multipliers,
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max_steps", type=int, default=None, help="default: the default run's")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="more train.py settings, e.g. model=gpt2-tiny lwlr_T=2",
    )
    parser.add_argument(
        "--out", default=LOCAL, help="results folder (default out-bench/; bench/results: the committed ones)"
    )
    args = parser.parse_args(argv)
    extra = ([f"--max_steps={args.max_steps}"] if args.max_steps else []) + [f"--{setting}" for setting in args.set]
    work = tempfile.mkdtemp(prefix="bench-precision-")
    runs = []
    for seed in args.seeds:
        for dtype in PRECISIONS:
            runs.append(run(seed, dtype, work, extra))
            print(
                f"seed {seed} {dtype:8}: val loss {runs[-1]['val_loss']:.4f}, {runs[-1]['ms_per_step']:.0f} ms/step",
                flush=True,
            )
    by = {dtype: [r for r in runs if r["dtype"] == dtype] for dtype in PRECISIONS}
    (fp32_mean, fp32_std), (bf16_mean, bf16_std) = (mean_std([r["val_loss"] for r in by[d]]) for d in PRECISIONS)
    n = len(args.seeds)
    difference, standard_error = bf16_mean - fp32_mean, math.sqrt(fp32_std**2 / n + bf16_std**2 / n)
    deviations = [
        abs(b["multipliers"][name] - a["multipliers"][name]) / a["multipliers"][name]
        for a, b in zip(by["float32"], by["bfloat16"])
        for name in a["multipliers"]
    ]
    summary = {
        "env": environment(torch.device("cpu")),
        "seeds": args.seeds,
        "max_steps": args.max_steps or "default",
        "settings": args.set,
        "val_loss": {"float32": [fp32_mean, fp32_std], "bfloat16": [bf16_mean, bf16_std]},
        "difference": difference,
        "standard_error": standard_error,
        "beyond_noise": abs(difference) > 2 * standard_error,
        "ms_per_step": {d: statistics.median(r["ms_per_step"] for r in by[d]) for d in PRECISIONS},
        "multiplier_max_relative_difference": max(deviations),
        "multiplier_mean_relative_difference": statistics.fmean(deviations),
        "runs": [{k: v for k, v in r.items() if k != "multipliers"} for r in runs],
    }
    verdict = "beyond" if summary["beyond_noise"] else "within"
    lines = [
        f"Default run ({summary['max_steps']} steps), {summary['env']['device']}, torch {summary['env']['torch']}, "
        f"commit {summary['env']['commit']}; seeds {args.seeds}.",
        "",
        "| precision | val loss, mean +- std | median ms/step |",
        "|---|---:|---:|",
        *(
            f"| {d} | {summary['val_loss'][d][0]:.4f} +- {summary['val_loss'][d][1]:.4f} | "
            f"{summary['ms_per_step'][d]:.0f} |"
            for d in PRECISIONS
        ),
        "",
        f"- bf16 - fp32: {difference:+.4f}, standard error {standard_error:.4f}: {verdict} twice the seed noise.",
        f"- lwlr multipliers, bf16 against fp32 (same seed, same batches): largest relative difference "
        f"{100 * summary['multiplier_max_relative_difference']:.2f}%, mean "
        f"{100 * summary['multiplier_mean_relative_difference']:.2f}%.",
    ]
    base = results_base(args.out, "precision", summary["env"]["device"])
    with open(base + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    main()
