"""Does each layer's rate stay sensible, and does lwlr follow curvature? The held-out comparison's model
(bench/overfit.py's heldout-cpu: char-level gpt2-mini, 300 steps, AdamW) trained by train.py with layer
statistics every 10 steps under single, lwlr and fan_in at each one's best rate there (seed 0), the block
sharpness at lwlr's measurement init and after the lwlr run's 300 steps, then GPT-2 124M's at init, and the
figure and tables of bench/layer_report.py.

    python -m data.shakespeare_char.prepare && python -m data.shakespeare.prepare
    python -m bench.layer_study                                   # about 10 min on 2 CPU cores
    python -m bench.layer_study --out_dir bench/results/layer-stats-heldout   # the committed figure

Each run is its heldout-cpu point's config, in train.py instead of the sweep: its val loss agrees with the
point's to the digits two machines share (docs/findings.md).
Writes into --out_dir: layers.png and layers.md (bench/layer_report.py), and sharpness-*.json and .md; the
runs' out_dirs (checkpoints, layers.jsonl) go to out-bench/layer-study-runs/, untracked.
"""

import argparse
import os
import shutil
import subprocess
import sys

import torch

from bench import layer_report, overfit, sharpness
from bench.common import LOCAL

BEST_RATES = {"single": 3.16e-3, "lwlr": 1e-2, "fan_in": 1e-2}  # AdamW's in heldout-cpu (docs/findings.md)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(rule: str, lr: float, out_dir: str) -> str:
    sweep = overfit.HELDOUT_CPU
    keys = overfit.config_overrides(sweep, "adamw", rule, lr, False, 0, torch.device("cpu"))
    keys |= dict(
        out_dir=out_dir,
        threads=sweep.threads,
        eval_interval=sweep.eval_every,
        layer_stats_interval=10,
        init_from="scratch",
        lwlr_cache_dir="auto",
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    subprocess.run([sys.executable, "train.py", *(f"--{k}={v}" for k, v in keys.items())], cwd=ROOT, check=True)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=os.path.join(LOCAL, "layer-stats-heldout"))
    parser.add_argument("--batches", type=int, default=20, help="sharpness: batches per estimate")
    args = parser.parse_args(argv)
    runs = {rule: run(rule, lr, os.path.join(LOCAL, "layer-study-runs", rule)) for rule, lr in BEST_RATES.items()}
    lwlr_run = runs["lwlr"]
    files = []
    for name, where in (
        ("sharpness-init", ["--init", "--model=gpt2-mini", "--dataset=shakespeare_char", "--seed=0",
                            "--micro_batch_size=16", "--block_size=128"]),
        ("sharpness-step-300", ["--out_dir", lwlr_run]),
        ("sharpness-gpt2-init", ["--init", "--model=gpt2", "--dataset=shakespeare", "--micro_batch_size=4",
                                 "--block_size=256"]),
    ):
        report = os.path.join(args.out_dir, name)
        sharpness.main([*where, "--batches", str(args.batches), "--device", "cpu", "--report_dir", report])
        for suffix in ("json", "md"):
            os.replace(os.path.join(report, f"sharpness.{suffix}"), os.path.join(args.out_dir, f"{name}.{suffix}"))
        os.rmdir(report)
        files.append(os.path.join(args.out_dir, f"{name}.json"))
    layer_report.main(
        [*runs.values(), "--sharpness", *files[:2], "--figure", os.path.join(args.out_dir, "layers.png")]
    )


if __name__ == "__main__":
    main()
