"""The default run's CPU step against torch's thread count and OpenMP's wait policy, on a quiet machine
and on one that other heavy jobs share (`--jobs`, each fp32 matmuls on every core, as another user's
job would be).

    python -m bench.bench_threads                   # threads 1 and every core, wait policy as is and PASSIVE
    python -m bench.bench_threads --steps 6 --threads 1 2 --policies default PASSIVE ACTIVE

Each setting runs in its own process (OpenMP reads its wait policy once, when torch loads), the default
run's model and batch (config defaults, compile off, dtype=auto), and reports the median step time of
`--steps` steps after `--warmup`. Settings alternate within each round; the figure is the median over
rounds. Writes out-bench/threads-<cpu>.json unless --out says otherwise (--out "" writes nothing).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

from bench.common import LOCAL, random_token_dir

STEP = r"""
import json, sys, time, torch
from bench.common import fresh_trainer
settings = {"data_dir": DATA, "lwlr_T": 2, "compile": "false", "lwlr_cache_dir": "none"}
trainer = fresh_trainer(settings, torch.device("cpu"))
times = []
for step in range(WARMUP + STEPS):
    start = time.perf_counter()
    trainer.step(step)
    times.append(time.perf_counter() - start)
print("RESULT", json.dumps({"ms": 1000 * sorted(times[WARMUP:])[STEPS // 2], "threads": torch.get_num_threads()}))
"""

BURNER = "import torch\nx = torch.randn(1024, 1024)\nwhile True: x = torch.tanh(x @ x)"


def one_setting(threads: int, policy: str, data: str, warmup: int, steps: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    code = f"DATA = {data!r}\nWARMUP = {warmup}\nSTEPS = {steps}\n" + STEP
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    line = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode or not line:
        raise SystemExit(f"the step failed ({threads} threads, {policy}):\n{result.stderr[-2000:]}")
    return json.loads(line[-1].removeprefix("RESULT "))["ms"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    parser.add_argument("--policies", nargs="+", default=["default", "PASSIVE"], help="OMP_WAIT_POLICY values")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=1, help="heavy jobs beside the busy runs, each on every core")
    parser.add_argument("--machines", nargs="+", choices=["quiet", "busy"], default=["quiet", "busy"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=None, help="the JSON to write (default out-bench/threads-<cpu>.json)")
    args = parser.parse_args(argv)
    import torch  # after the arguments: --help needs no torch

    cpu = str(torch.backends.cpu.get_cpu_capability()).lower()
    data = random_token_dir(50257)
    settings = [(t, p) for t in args.threads for p in args.policies]
    figures = {}
    for machine in args.machines:
        jobs = args.jobs if machine == "busy" else 0
        burners = [subprocess.Popen([sys.executable, "-c", BURNER]) for _ in range(jobs)]
        try:
            times = {setting: [] for setting in settings}
            for _ in range(args.rounds):
                for setting in settings:
                    times[setting].append(one_setting(*setting, data, args.warmup, args.steps))
        finally:
            for burner in burners:
                burner.kill()
                burner.wait()
        said = f"busy, {jobs} job{'s' * (jobs > 1)}" if jobs else "quiet"
        for (threads, policy), values in times.items():
            ms = statistics.median(values)
            figures[f"{said}, {threads} threads, OMP_WAIT_POLICY={policy}"] = ms
            print(f"{said:14} | {threads} threads | OMP_WAIT_POLICY={policy:8} | {ms:8.0f} ms/step", flush=True)
    out = args.out if args.out is not None else os.path.join(LOCAL, f"threads-{cpu}.json")
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump({"cpu": cpu, "cores": os.cpu_count(), "ms_per_step": figures, "steps": args.steps}, f, indent=1)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
