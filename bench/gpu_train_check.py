"""train.py as a user launches it, once per optimizer: a finite loss, a checkpoint, and a resume that
continues the run. A part of the GPU kit (bench/gpu_check.sh), which runs it compiled and in bf16 on CUDA:

    python -m bench.gpu_train_check --device=cuda --compile=true --dtype=bfloat16 --out=/tmp/check
    python -m bench.gpu_train_check --device=cuda --launcher=torchrun --optimizers adamw --out=/tmp/check

For each optimizer, run A trains `--steps` steps and checkpoints half-way and at the end; run B starts
from a copy of A's out_dir that holds only the half-way checkpoint, so it resumes there and trains to the
end. B's final weights are compared with A's:
  - on a CPU without torch.compile every operation here is deterministic, so they must be bitwise equal;
  - compiled, or on CUDA, they need not be: flash attention's backward and inductor's scatter-add (the
    embedding's gradient) accumulate with atomics in no fixed order, and inductor's CPU code rounded one
    ulp differently in a fresh process (rehearsal: a deviation of 4e-8). There the check is relative to
    how far the second half moved the weights: |W_B - W_A| / |W_A - W_half| under 5%. A resume that lost
    the optimizer state, the multipliers or the data position changes the second half's steps
    themselves, a deviation of the order of 1.
Under `--launcher=torchrun` (one process per GPU; one here) train.py runs its DDP path even at world
size 1: the process group, the DDP wrapper, no_sync over accumulation, the all-reduces. With
`--resume_parallel=fsdp` run B resumes A's DDP checkpoint under parallel=fsdp: FSDP2's sharding, its
all-gathers and reduce-scatters, each block compiled on its own, the optimizer on DTensor shards, the
gathered checkpoint and export.

With --eval_only_check, A's final checkpoint is then evaluated with `--eval_only=true`, as a user asks
how good a model is (the kit does it under torchrun, where the eval is split over the ranks): its
val loss must be the run's own final eval (the same batches), exactly on a CPU without torch.compile,
within EVAL_ONLY_TOLERANCE where the run evaluated a compiled model in bf16 and eval_only an eager one.

Writes OUT/train_check.json (one record per optimizer) and exits 1 if any run failed.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from safetensors.torch import load_file

from bench.common import random_token_dir
from data import vocab
from optimizers.registry import OPTIMIZERS, spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MAX_DEVIATION = 0.05  # |W_B - W_A| / |W_A - W_half| where bitwise equality is not required (see above)
EVAL_ONLY_TOLERANCE = 0.02  # nats: bf16 rounds a loss of ~10 at about 2e-3 relative, compiled or not


def train_args(args, optimizer: str, out_dir: str, data_dir: str) -> list[str]:
    values = dict(
        out_dir=out_dir,
        data_dir=data_dir,
        model=args.model,
        block_size=64,
        micro_batch_size=8,
        tokens_per_step=8 * 64 * 2,
        optimizer=optimizer,
        optimizer_backend=args.optimizer_backend,
        kernel_check=args.kernel_check,
        max_steps=args.steps,
        warmup_steps=2,
        eval_interval=args.steps // 2,
        eval_steps=2,
        log_interval=1,
        keep_last=5,
        lwlr_T=4,
        lwlr_cache_dir="none",
        device=args.device,
        compile=args.compile,
        dtype=args.dtype,
        # a rate of its own scale, its refresh due within the few steps (its registry entry's gpu_check)
        **spec(optimizer).gpu_check,
    )
    return [f"--{key}={value}" for key, value in values.items()]


def launch(args, train_argv: list[str], log_path: str) -> int:
    if args.launcher == "torchrun":
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=1",
            "train.py",
            *train_argv,
        ]
    else:
        command = [sys.executable, "train.py", *train_argv]
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        return subprocess.run(
            command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=args.run_timeout
        ).returncode


def log_records(out_dir: str, kind: str) -> list[dict]:
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def deviation(resumed: dict, uninterrupted: dict, half: dict) -> tuple[bool, float]:
    """(bitwise equal, |W_B - W_A| / |W_A - W_half|) over every tensor of the model."""
    equal = all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    difference = sum(float((resumed[k].double() - uninterrupted[k].double()).square().sum()) for k in uninterrupted)
    moved = sum(float((uninterrupted[k].double() - half[k].double()).square().sum()) for k in uninterrupted)
    return equal, (difference / moved) ** 0.5 if moved else float("inf")


def check(args, optimizer: str, data_dir: str, work: str) -> dict:
    """Run A, then run B from A's half-way checkpoint; the record of what held, and its time."""
    record = {
        "optimizer": optimizer,
        "launcher": args.launcher,
        "device": args.device,
        "compile": args.compile,
        "dtype": args.dtype,
        "resume_parallel": args.resume_parallel,
    }
    start = time.perf_counter()
    try:
        record.update(resume_check(args, optimizer, data_dir, work))
    except Exception as e:  # a record for the report either way; the logs hold the rest
        record.update(passed=False, error=f"{type(e).__name__}: {e}")
    record["seconds"] = time.perf_counter() - start
    return record


def resume_check(args, optimizer: str, data_dir: str, work: str) -> dict:
    from training import checkpoint

    record = {}
    a_dir, b_dir = os.path.join(work, f"{optimizer}-A"), os.path.join(work, f"{optimizer}-B")
    code = launch(args, train_args(args, optimizer, a_dir, data_dir), a_dir + ".log")
    if code != 0:
        return {**record, "passed": False, "error": f"run A exited {code} (see {a_dir}.log)"}
    start = log_records(a_dir, "start")[0]  # which backend the optimizer took, and why (the kernels' self-check)
    record.update(backend=start["optimizer_backend"], backend_reason=start["optimizer_backend_reason"])
    losses = [r["loss"] for r in log_records(a_dir, "train")]
    half, end = args.steps // 2, args.steps
    saved = sorted(name for name in os.listdir(a_dir) if name.startswith("step-"))
    record.update(final_loss=losses[-1], finite=bool(np.isfinite(losses).all()), checkpoints=saved)
    if args.eval_only_check:
        evaluated = launch(
            args, [*train_args(args, optimizer, a_dir, data_dir), "--eval_only=true"], a_dir + "-eval.log"
        )
        if evaluated != 0:
            return {**record, "passed": False, "error": f"eval_only on run A exited {evaluated} (see {a_dir}-eval.log)"}
        record.update(
            eval_only_val_loss=log_records(a_dir, "eval_only")[-1]["val_loss"],
            run_val_loss=log_records(a_dir, "eval")[-1]["val_loss"],
        )
    dropped = {"log.jsonl", "model.safetensors"}  # B keeps only the half-way checkpoint (and config, lwlr.json)
    shutil.copytree(
        a_dir,
        b_dir,
        ignore=lambda folder, names: [
            n for n in names if n in dropped or (n.startswith("step-") and n != f"step-{half:08d}")
        ],
    )
    resume_argv = [*train_args(args, optimizer, b_dir, data_dir), f"--parallel={args.resume_parallel}"]
    code = launch(args, resume_argv, b_dir + ".log")
    if code != 0:
        return {**record, "passed": False, "error": f"run B exited {code} (see {b_dir}.log)"}
    resumed_at = log_records(b_dir, "start")[0]["step"]
    equal, dev = deviation(
        load_file(os.path.join(b_dir, "model.safetensors")),
        load_file(os.path.join(a_dir, "model.safetensors")),
        checkpoint.load_tensors(os.path.join(a_dir, f"step-{half:08d}"), "model"),
    )
    exact_required = args.device == "cpu" and args.compile == "false"
    kernels_trusted = "self-check failed" not in record["backend_reason"]
    eval_gap = abs(record["eval_only_val_loss"] - record["run_val_loss"]) if args.eval_only_check else 0.0
    passed = (
        kernels_trusted
        and record["finite"]
        and eval_gap <= (1e-6 if exact_required else EVAL_ONLY_TOLERANCE)
        and f"step-{end:08d}" in saved
        and resumed_at == half
        and (equal if exact_required else dev <= MAX_DEVIATION)
    )
    return {
        **record,
        "resumed_at": resumed_at,
        "bitwise_equal": equal,
        "deviation": dev,
        "exact_required": exact_required,
        "passed": passed,
    }


def outcome(record: dict) -> str:
    if "error" in record:
        return record["error"]
    same = (
        "bitwise equal"
        if record["bitwise_equal"]
        else f"deviation {record['deviation']:.2e} of the second half's update"
    )
    evaluated = (
        f", eval_only val loss {record['eval_only_val_loss']:.4f} (the run's {record['run_val_loss']:.4f})"
        if "eval_only_val_loss" in record
        else ""
    )
    return f"loss {record['final_loss']:.4f}{evaluated}, resumed at step {record['resumed_at']}: {same}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--launcher", default="python", choices=("python", "torchrun"))
    parser.add_argument("--model", default="gpt2-tiny")
    parser.add_argument("--vocab_size", type=int, default=vocab.GPT2Vocab.size, help="random tokens over this many ids")
    parser.add_argument("--steps", type=int, default=8, help="even: run B resumes at steps / 2")
    parser.add_argument("--compile", default="true")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--optimizer_backend", default="auto", help="auto (triton on CUDA) | triton (on CPU: TRITON_INTERPRET=1)"
    )
    parser.add_argument(
        "--kernel_check", default="auto", help="auto (the self-check on CUDA) | force (also interpreted on CPU)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="optimizers checked at once")
    parser.add_argument("--eval_only_check", action="store_true", help="also evaluate run A with eval_only")
    parser.add_argument(
        "--resume_parallel",
        default="ddp",
        choices=("ddp", "fsdp"),
        help="run B's parallel (torchrun): fsdp resumes A's DDP checkpoint sharded",
    )
    parser.add_argument("--run_timeout", type=float, default=600)
    parser.add_argument("--out", required=True, help="folder for train_check.json, the runs and their logs")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.steps % 2:
        parser.error("--steps must be even and at least 2")
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="runs-", dir=args.out)
    data_dir = random_token_dir(args.vocab_size, os.path.join(work, "data"), train_tokens=200_000)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        records = list(pool.map(lambda name: check(args, name, data_dir, work), args.optimizers))
    for r in records:
        print(
            f"{r['launcher']:8} {r['optimizer']:12} {'ok' if r['passed'] else 'FAILED':6} {outcome(r)} "
            f"({r['seconds']:.0f} s)"
        )
    with open(os.path.join(args.out, "train_check.json"), "w") as f:
        json.dump({"max_deviation": MAX_DEVIATION, "runs": records}, f, indent=1)
    return 0 if all(r["passed"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
