"""Where a CPU training step's time goes, ours against nanoGPT's on the same shapes: the forward pass with
the loss, the backward pass, gradient clipping and the optimizer (with zero_grad), each timed apart, and
how many operators one step launches (torch.profiler's aten events).

    python -m bench.profile_step --nanogpt DIR                      # DIR/nanogpt_model.py: nanoGPT's model.py
    python -m bench.profile_step --nanogpt DIR --mode compiled --busy

Both sides run the default run's shapes (GPT-2's vocabulary, 4 layers x 4 heads x 128, 16 x 128 tokens a
step, AdamW), each in its own process, alternating over --rounds; a figure is the median over rounds of a
side's median over --steps steps after a warm-up. --mode eager: fp32, no compile; compiled: bf16 autocast
(on a CPU with native bf16) and torch.compile. --busy runs a second heavy job (fp32 matmuls on every core)
beside both, as on a shared machine. Our forward includes the output layer's gradient, which its fused
loss computes there (model.LinearCrossEntropy); nanoGPT's computes it in the backward pass. Without
--nanogpt only our side runs. Writes out-bench/profile-<mode>-<cpu>.json and .md unless --out says where.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

from bench.common import LOCAL, random_token_dir, write_results

PHASES = ("forward + loss", "backward", "clip", "optimizer")

# What both sides share: time each phase of WARMUP + STEPS steps, then count one step's operators.
TIMING = r"""
import json, time, torch
from torch.profiler import ProfilerActivity, profile

def marker(marks):  # a phase's end: its time, while the phases are timed (not while profiled)
    return (lambda: marks.append(time.perf_counter())) if marks else (lambda: None)

def measure(step_phases):
    times = []
    for step in range(WARMUP + STEPS):
        marks = [time.perf_counter()]
        step_phases(step, marks)
        times.append([b - a for a, b in zip(marks, marks[1:])])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step_phases(WARMUP + STEPS, [])
    ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    timed = times[WARMUP:]
    per_phase = [sorted(t[i] for t in timed)[STEPS // 2] * 1000 for i in range(4)]
    # each phase's share of its own step: steady where a shared machine makes whole steps drift
    shares = [sorted(t[i] / sum(t) for t in timed)[STEPS // 2] for i in range(4)]
    total = sorted(sum(t) for t in timed)[STEPS // 2] * 1000
    print("RESULT " + json.dumps({"phases": per_phase, "shares": shares, "total": total, "ops": ops}))
"""

OURS = r"""
import sys
from bench.common import fresh_trainer
from optimizers import base
from training.build import lr_at
overrides = {"data_dir": DATA, "lwlr_T": 2, "lwlr_cache_dir": "none", "compile": COMPILE, "dtype": DTYPE}
tr = fresh_trainer(overrides, torch.device("cpu"))

def step_phases(step, marks):  # Trainer.step's parts, one micro-batch, as the default run has
    base.set_lr(tr.optimizer, lr_at(step, tr.c))
    x, y = tr.train_batches.get(step, tr.split, tr.rt.device, 0, 0)
    mark = marker(marks)
    with tr.ctx:
        _, loss = tr.model(x, y)
    mark()
    loss.backward()
    mark()
    norm = torch.nn.utils.clip_grad_norm_(tr.params, tr.c.grad_clip, foreach=True)
    torch.logical_not(torch.isfinite(loss.detach() + norm), out=tr.found_inf)
    mark()
    tr.optimizer.found_inf = tr.found_inf
    tr.optimizer.step()
    tr.optimizer.zero_grad(set_to_none=True)
    mark()

measure(step_phases)
"""

NANO = r"""
import contextlib, sys
sys.path.insert(0, NANOGPT)
from nanogpt_model import GPT, GPTConfig
torch.manual_seed(0)
m = GPT(GPTConfig(block_size=128, vocab_size=50304, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=True))
opt = m.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cpu")
ctx = torch.autocast("cpu", dtype=torch.bfloat16) if DTYPE == "bfloat16" else contextlib.nullcontext()
fwd = torch.compile(m) if COMPILE == "true" else m
g = torch.Generator().manual_seed(1)

def step_phases(step, marks):  # nanoGPT's train.py step
    mark = marker(marks)
    x = torch.randint(0, 50257, (16, 128), generator=g)
    y = torch.randint(0, 50257, (16, 128), generator=g)
    with ctx:
        _, loss = fwd(x, y)
    mark()
    loss.backward()
    mark()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    mark()
    opt.step()
    opt.zero_grad(set_to_none=True)
    mark()

measure(step_phases)
"""

BURNER = "import torch\nx = torch.randn(1024, 1024)\nwhile True: x = torch.tanh(x @ x)"


def one_side(code: str, consts: dict) -> dict:
    prelude = "".join(f"{key} = {value!r}\n" for key, value in consts.items())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", prelude + TIMING + code], capture_output=True, text=True, cwd=root)
    line = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode or not line:
        raise SystemExit(f"a side failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return json.loads(line[-1].removeprefix("RESULT "))


def median_of(runs: list[dict]) -> dict:
    return {
        "phases": [statistics.median(run["phases"][i] for run in runs) for i in range(len(PHASES))],
        "shares": [statistics.median(run["shares"][i] for run in runs) for i in range(len(PHASES))],
        "total": statistics.median(run["total"] for run in runs),
        "ops": statistics.median(run["ops"] for run in runs),
    }


def table(figures: dict, title: str) -> str:
    sides = list(figures)
    lines = [f"### {title}", "", "| | " + " | ".join(sides) + " |", "|---|" + "---:|" * len(sides)]
    for i, phase in enumerate(PHASES):
        cells = [f"{figures[s]['phases'][i]:,.1f} ({figures[s]['shares'][i]:.0%})" for s in sides]
        lines.append(f"| {phase}, ms (share of the step) | " + " | ".join(cells) + " |")
    lines.append("| the step, ms | " + " | ".join(f"{figures[s]['total']:,.1f}" for s in sides) + " |")
    lines.append("| operators a step | " + " | ".join(f"{figures[s]['ops']:,.0f}" for s in sides) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", default="", help="a folder holding nanoGPT's model.py as nanogpt_model.py")
    parser.add_argument("--mode", choices=("eager", "compiled"), default="eager")
    parser.add_argument("--busy", action="store_true", help="a second heavy job beside both sides")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default=LOCAL, help="where the .json and .md go (bench/results: the committed ones)")
    args = parser.parse_args(argv)
    import torch  # after the arguments: --help needs no torch

    from runtime.device import cpu_kind, environment, precision

    capability = cpu_kind()
    native_bf16 = precision(torch.device("cpu"), "auto")[0] == "bfloat16"
    dtype = "bfloat16" if args.mode == "compiled" and native_bf16 else "float32"
    consts = {
        "WARMUP": args.warmup,
        "STEPS": args.steps,
        "COMPILE": str(args.mode == "compiled").lower(),
        "DTYPE": dtype,
    }
    sides = {"ours": (OURS, {"DATA": random_token_dir(50257)})}
    if args.nanogpt:
        sides["nanoGPT"] = (NANO, {"NANOGPT": os.path.abspath(args.nanogpt)})
    runs = {name: [] for name in sides}
    burner = subprocess.Popen([sys.executable, "-c", BURNER]) if args.busy else None
    try:
        for round_ in range(args.rounds):
            order = list(sides) if round_ % 2 == 0 else list(sides)[::-1]
            for name in order:
                code, extra = sides[name]
                runs[name].append(one_side(code, {**consts, **extra}))
                print(f"round {round_ + 1}: {name} {runs[name][-1]['total']:,.0f} ms", flush=True)
    finally:
        if burner is not None:
            burner.kill()
            burner.wait()
    figures = {name: median_of(side_runs) for name, side_runs in runs.items()}
    machine = "busy (a second heavy job)" if args.busy else "quiet"
    title = f"{args.mode}, {dtype}, {machine}: {os.cpu_count()} cores, {capability}"
    env = {
        **environment(torch.device("cpu")),  # versions and commit
        "device": f"cpu-{capability.lower().replace('+', '-')}-{os.cpu_count()}-cores",
        "mode": args.mode,
        "dtype": dtype,
        "busy": args.busy,
    }
    kind = f"profile-{args.mode}{'-busy' if args.busy else ''}"
    write_results(args.out, kind, env, [{"side": name, **fig} for name, fig in figures.items()], table(figures, title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
