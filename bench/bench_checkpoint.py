"""What a checkpoint costs under parallel=fsdp: the rank-0 gather (every tensor gathered onto rank 0, which
writes and hashes it alone while the others wait: the save before sharded checkpoints) against the sharded
save (training/sharded.py: each rank copies its shards to host memory, then writes and hashes them in the
background), on CPU processes with gloo.

    python -m bench.bench_checkpoint                                   # gpt2-medium on 2 and 4 ranks
    python -m bench.bench_checkpoint --model gpt2 --ranks 2 --out bench/results

Each (ranks, way) is its own torchrun launch: the model under fsdp with AdamW, one step (so the optimizer's
state exists), then one save, timed on every rank. The stall is what the step waits for (the gather and the
write for the gather; the copy to host memory for the sharded save); the total runs until the checkpoint's
folder is renamed into place; rank 0's host memory is its peak resident set during the save above the one
before it, sampled every 5 ms. Writes <out>/checkpoint-<device>.json and .md.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

WAYS = ("gather", "sharded")


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """The peak resident set above the one at the start, sampled in a thread while the block runs."""

    def __enter__(self):
        self.start = self.peak = resident_bytes()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._done.wait(0.005):
            self.peak = max(self.peak, resident_bytes())

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())
        self.extra = self.peak - self.start


def worker(args) -> None:
    """One rank of a launch: train one step, save once the given way, and (rank 0) write the figures."""
    import torch
    import torch.distributed as dist

    from model import GPT
    from runtime import fsdp
    from runtime.ranks import init_runtime
    from training import checkpoint
    from training.build import gpt_config
    from training.config import parse_config
    from training.trainer import Trainer

    rt = init_runtime("cpu", 1800)
    c = parse_config(
        [
            f"--model={args.model}",
            f"--data_dir={args.data}",
            f"--out_dir={args.out_dir}",
            "--block_size=64",
            "--micro_batch_size=1",
            f"--tokens_per_step={64 * rt.world_size}",
            "--parallel=fsdp",
            "--compile=false",
            "--dtype=float32",
            "--lr_rule=single",
            "--max_steps=10",
        ]
    )
    os.makedirs(c.out_dir, exist_ok=True)
    torch.manual_seed(c.seed)
    trainer = Trainer(c, rt, GPT(gpt_config(c)), None)
    trainer.step(0)
    dist.barrier()
    with PeakMemory() as memory:
        began = time.perf_counter()
        if args.way == "sharded":
            trainer.save(1, "bench", False)
            stall = time.perf_counter() - began
            trainer.wait_for_save()
        else:  # the gather the save did before sharded checkpoints, to the letter
            tensors = {
                "model": fsdp.full_model_state(trainer.raw_model, keep=rt.is_main),
                "optimizer": fsdp.full(trainer.optimizer.state_dict(), keep=rt.is_main),
            }
            if rt.is_main:
                checkpoint.save(c.out_dir, 1, tensors, trainer.meta(1), c.keep_last, say=lambda *_: None)
            dist.barrier()
            stall = time.perf_counter() - began
        total = time.perf_counter() - began
    path = checkpoint.step_dir(c.out_dir, 1)
    if rt.is_main:
        size = sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))
        row = {
            "model": args.model,
            "parameters": trainer.raw_model.num_params(),
            "ranks": rt.world_size,
            "way": args.way,
            "stall_s": stall,
            "total_s": total,
            "rank0_extra_memory_bytes": memory.extra,
            "checkpoint_bytes": size,
            "files": len(os.listdir(path)),
        }
        with open(args.report, "w") as f:
            json.dump(row, f)
    dist.barrier()
    dist.destroy_process_group()


def launch(model: str, ranks: int, way: str, data: str, scratch: str) -> dict:
    out_dir, report = os.path.join(scratch, f"{way}-{ranks}"), os.path.join(scratch, f"{way}-{ranks}.json")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ranks}",
        "-m",
        "bench.bench_checkpoint",
        "--worker",
        f"--way={way}",
        f"--model={model}",
        f"--data={data}",
        f"--out_dir={out_dir}",
        f"--report={report}",
    ]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    subprocess.run(command, cwd=root, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(report) as f:
        row = json.load(f)
    shutil.rmtree(out_dir)  # a gpt2-medium checkpoint is 4.3 GB
    return row


def markdown(rows: list[dict], env: dict) -> str:
    lines = [
        f"Checkpoint saves under fsdp on {env['device']} (torch {env['torch']}, gloo, one thread a rank): the rank-0 "
        "gather against the sharded save, one save after one AdamW step.",
        "",
        "| model | ranks | way | stall, s | total, s | rank 0's extra host memory, GB | checkpoint, GB | files |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['ranks']} | {r['way']} | {r['stall_s']:.2f} | {r['total_s']:.2f} | "
            f"{r['rank0_extra_memory_bytes'] / 1e9:.2f} | {r['checkpoint_bytes'] / 1e9:.2f} | {r['files']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2-medium")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--out", default=None, help="folder for the .json and .md (default: out-bench)")
    parser.add_argument("--scratch", default=None, help="where the checkpoints are written (default: a temp folder)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("way", "data", "out_dir", "report"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    import torch

    from bench.common import LOCAL, random_token_dir, write_results
    from runtime.device import environment

    scratch = args.scratch or tempfile.mkdtemp(prefix="bench-checkpoint-")
    data = random_token_dir(50257, os.path.join(scratch, "data"), train_tokens=1 << 16)
    rows = []
    for ranks in args.ranks:
        for way in WAYS:
            rows.append(launch(args.model, ranks, way, data, scratch))
            print(json.dumps(rows[-1]), flush=True)
    env = environment(torch.device("cpu"))
    write_results(args.out or LOCAL, "checkpoint", env, rows, markdown(rows, env))
    return rows


if __name__ == "__main__":
    main()
