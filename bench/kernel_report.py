"""Every Triton kernel the optimizers launch, compiled for real GPUs on a machine without one, and a
roofline prediction of their step time. Static analysis, not a measurement.

    python -m bench.kernel_report            # sm_80 and sm_90; writes bench/results/kernels.json and .md
    python -m bench.kernel_report --check    # also exit 1 unless every kernel meets the targets below

How: each optimizer with Triton kernels (optimizers/registry.py) takes a step on gpt2's parameters, a
multiplier per tensor as under lr_rule=lwlr, on the CPU with the kernel launch intercepted, so every
recorded launch carries real argument types and the specialization Triton gives a real launch
(16-byte-aligned pointers, constexprs), and the build it chose is the one a real gpt2 run launches. Each
is compiled with triton.compile
for sm_80 (A100) and sm_90 (H100), both builds (ALIGNED, what GPT-2's tensors take, and the scalar
fallback), and assembled with the ptxas inside the Triton wheel (`ptxas -v`: registers, spills).

From the PTX: global accesses are element accesses (masked, so predicated, or vector) or per-program
table reads (scalar and unpredicated: pointers, sizes, multipliers). "128-bit share" is the share of
element-access bytes moved by 128-bit instructions, counted statically (each branch once).
"Bytes/element" is element-access bytes per thread over elements per thread, against the algorithm's
minimum. Occupancy: resident warps per SM from registers alone (64K registers, 64 warps, 32 programs).

Targets (--check, and tests/test_kernels.py): compiles for both targets with no spills; in the ALIGNED
build, at most 64 registers and at least 80% of element bytes in 128-bit accesses; every launch of a gpt2
run takes the ALIGNED build.
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from bench.common import LOCAL
from model import GPT, GPTConfig
from optimizers import base
from optimizers.registry import OPTIMIZERS, spec
from training.config import TrainConfig

ARCHS = {80: "A100 (sm_80)", 90: "H100 (sm_90)"}
MAX_REGISTERS = 64  # half occupancy or better at 8 warps on a 64K-register SM
MIN_VECTOR_SHARE = 0.8

# Peak HBM bandwidth from the vendors' datasheets; the achievable share is the one measured on this
# project's H100 machine (device-to-device copy 3.0 TB/s of 3.35, shared/NOTES.md), assumed for the A100 too.
DEVICES = {
    "H100 SXM": {"bandwidth": 3.35e12, "source": "NVIDIA H100 Tensor Core GPU datasheet: 3.35 TB/s HBM3 (SXM5)"},
    "A100 SXM 80GB": {
        "bandwidth": 2.039e12,
        "source": "NVIDIA A100 Tensor Core GPU datasheet: 2,039 GB/s HBM2e (80GB SXM)",
    },
}
ACHIEVABLE = 3.0 / 3.35
LAUNCH_SECONDS = 5e-6  # one kernel launch from PyTorch (host dispatch + launch), an assumed round figure
ROOFLINE_OPTIMIZERS = ("adamw", "lion", "sophiag", "adam_mini")  # the paper's, predicted step by step
MODELS = ("gpt2", "gpt2-large")


def kernel_optimizers() -> list[str]:
    """The registered optimizers with Triton kernels, each of which the report steps."""
    return [name for name in OPTIMIZERS if spec(name).kernels]


def minimum_bytes() -> dict[str, int]:
    """The fp32 bytes each kernel must move per parameter element (its optimizer's registry entry)."""
    return {kernel.fn.__name__: moved for name in OPTIMIZERS for kernel, moved in _bytes_of(spec(name)).items()}


def _bytes_of(optimizer_spec) -> dict:
    return {**optimizer_spec.kernels, **optimizer_spec.refresh_kernels}


def record_launches(preset: str = "gpt2") -> dict[str, list[tuple]]:
    """(kernel, grid, args, meta) of each optimizer's launches in one step (SophiaG: and a Hessian refresh)
    on a preset's parameters, grouped as a layer-wise run groups them (a multiplier per tensor): the
    launches, and the builds, that a real run of that model makes. Nothing is computed: storage is
    allocated uninitialized, the launches are only recorded, and found_inf is set, so that a part on the
    torch path (Muon's torch.optim.Muon) skips its step."""
    launches: list[tuple] = []
    real_launch, real_use_triton = base.launch_kernel, base.FusedOptimizer.use_triton
    base.launch_kernel = lambda kernel, grid, *args, **meta: launches.append((kernel, grid, args, meta))
    base.FusedOptimizer.use_triton = lambda self, device: True
    try:
        recorded = {}
        for name in kernel_optimizers():
            with torch.device("meta"):
                model = GPT(GPTConfig.from_preset(preset))
            model.to_empty(device="cpu")
            model.lm_head.weight = model.transformer.wte.weight  # to_empty gave each its own storage: tie them again
            for p in model.parameters():
                p.grad = torch.empty_like(p)
            multipliers = {param: 1 + i / 100 for i, (param, _) in enumerate(model.named_parameters())}
            groups = base.param_groups(model, multipliers, 0.1)
            declared = spec(name)
            optimizer = declared.build(TrainConfig(optimizer=name), groups, model.config.n_head, "triton")
            optimizer.found_inf = torch.ones(())
            launches.clear()
            optimizer.step()
            if declared.refresh is not None:  # SophiaG's, which launches its refresh_kernels
                declared.refresh(optimizer)
            recorded[name] = list(launches)
        return recorded
    finally:
        base.launch_kernel, base.FusedOptimizer.use_triton = real_launch, real_use_triton


def launched_builds(recorded) -> list[dict]:
    """Which build (ALIGNED or the scalar fallback) each recorded launch took."""
    return [
        {"optimizer": name, "kernel": kernel.fn.__name__, "aligned": meta["ALIGNED"]}
        for name, launches in recorded.items()
        for kernel, _, _, meta in launches
    ]


def compile_launch(kernel, args, meta, arch: int):
    """The kernel as a real launch with these arguments would compile it for `arch`."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, dict(meta), bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def ptxas_usage(ptx: str, arch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        result = subprocess.run(
            [
                get_ptxas(arch).path,
                "-v",
                f"--gpu-name={sm_arch_from_capability(arch)}",
                path,
                "-o",
                os.path.join(tmp, "kernel.cubin"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    log = result.stdout + result.stderr
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return {"registers": int(re.search(r"Used (\d+) registers", log).group(1)), "spill_bytes": sum(spills)}


GLOBAL_ACCESS = re.compile(r"^\s*(@!?%p\d+\s+)?(ld|st)\.global((?:\.\w+)*)\s", re.MULTILINE)


def global_accesses(ptx: str) -> dict:
    """Element-access bytes by width (per thread, static) and the count of table reads."""
    element_bytes: Counter = Counter()
    table_reads = 0
    for predicate, _, suffixes in GLOBAL_ACCESS.findall(ptx):
        parts = suffixes.strip(".").split(".")
        lanes = int(next((p[1:] for p in parts if re.fullmatch(r"v\d", p)), 1))
        bits = int(next(p[1:] for p in parts if re.fullmatch(r"[bfsu]\d+", p)))
        if not predicate and lanes == 1:
            table_reads += 1
            continue
        element_bytes[lanes * bits // 8] += lanes * bits // 8
    return {"element_bytes_by_width": dict(element_bytes), "table_reads": table_reads}


def occupancy(registers: int, num_warps: int) -> float:
    """Resident warps per SM over 64, from registers (allocated per warp in units of 256) alone."""
    per_warp = math.ceil(registers * 32 / 256) * 256
    programs = min(32, 65536 // (per_warp * num_warps), 64 // num_warps)
    return programs * num_warps / 64


def kernel_rows(recorded) -> list[dict]:
    rows, seen = [], set()
    for optimizer_name, launches in recorded.items():
        for kernel, grid, args, meta in launches:
            for aligned in (True, False):
                name = kernel.fn.__name__
                key = (name, tuple(a is None for a in args), aligned)
                if key in seen:
                    continue
                seen.add(key)
                variant = {**meta, "ALIGNED": aligned}
                elements_per_thread = variant["BLOCK"] // (32 * variant["num_warps"])
                row = {
                    "kernel": name,
                    "launched_by": optimizer_name,
                    "aligned": aligned,
                    "step_sizes": args[10] is not None if name in ("adamw_kernel", "sgd_momentum_kernel") else None,
                    "BLOCK": variant["BLOCK"],
                    "num_warps": variant["num_warps"],
                    "targets": {},
                }
                for arch in ARCHS:
                    compiled = compile_launch(kernel, args, variant, arch)
                    ptx = compiled.asm["ptx"]
                    accesses = global_accesses(ptx)
                    total = sum(accesses["element_bytes_by_width"].values())
                    row["targets"][arch] = {
                        **ptxas_usage(ptx, arch),
                        "shared_bytes": compiled.metadata.shared,
                        **accesses,
                        "vector_share": accesses["element_bytes_by_width"].get(16, 0) / total if total else 0.0,
                        "bytes_per_element": total / elements_per_thread,
                    }
                    row["targets"][arch]["occupancy"] = occupancy(
                        row["targets"][arch]["registers"], variant["num_warps"]
                    )
                rows.append(row)
    return rows


BLOCK_CHOICES = ((512, 4), (1024, 4), (1024, 8), (2048, 8), (4096, 8))


def block_size_sweep(recorded) -> list[dict]:
    """AdamW's ALIGNED build at other (BLOCK, num_warps): how kernels.BLOCK was chosen."""
    kernel, _, args, meta = recorded["adamw"][0]
    rows = []
    for block, num_warps in BLOCK_CHOICES:
        compiled = compile_launch(kernel, args, {**meta, "BLOCK": block, "num_warps": num_warps, "ALIGNED": True}, 90)
        usage = ptxas_usage(compiled.asm["ptx"], 90)
        elements_per_thread = block // (32 * num_warps)
        warps = occupancy(usage["registers"], num_warps) * 64
        rows.append(
            {
                "BLOCK": block,
                "num_warps": num_warps,
                "elements_per_thread": elements_per_thread,
                **usage,
                "occupancy": warps / 64,
                # AdamW's 4 loads of 16 bytes per 4 elements, for every resident thread
                "load_bytes_in_flight_per_sm": int(warps * 32 * elements_per_thread * 16),
            }
        )
    return rows


def parameter_counts(preset: str) -> tuple[int, int]:
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset(preset))
    return sum(p.numel() for p in model.parameters()), sum(1 for _ in model.parameters())


def roofline(recorded) -> list[dict]:
    """Predicted optimizer step time: minimum bytes / achievable bandwidth + launches x launch time. Ours
    launch once per step whatever the groups (Adam-mini twice; SophiaG's Hessian refresh every 10 steps
    adds 12 bytes and a launch, amortized). torch's fused AdamW launches per param group: under a
    layer-wise rate every tensor has its own lr, so one group (at least one launch) per tensor."""
    per_step = {}
    for name in ROOFLINE_OPTIMIZERS:  # a step's kernels (their registry entry), and a refresh's over its interval
        entry = spec(name)
        moved, launches = sum(entry.kernels.values()), len(entry.kernels)
        if entry.refresh_kernels:
            interval = entry.refresh_interval(TrainConfig(optimizer=name))
            moved += sum(entry.refresh_kernels.values()) / interval
            launches += len(entry.refresh_kernels) / interval
        per_step[name] = (moved, launches)
    per_step["torch fused AdamW, one group per tensor"] = (sum(spec("adamw").kernels.values()), None)
    assert {name for name in per_step if not name.startswith("torch")} <= set(recorded)
    rows = []
    for preset in MODELS:
        n_params, n_tensors = parameter_counts(preset)
        for device, datasheet in DEVICES.items():
            for name, (bytes_per_param, launches) in per_step.items():
                launches = n_tensors if launches is None else launches
                seconds = n_params * bytes_per_param / (datasheet["bandwidth"] * ACHIEVABLE) + launches * LAUNCH_SECONDS
                rows.append(
                    {
                        "model": preset,
                        "params": n_params,
                        "device": device,
                        "optimizer": name,
                        "bytes_per_param": bytes_per_param,
                        "launches": launches,
                        "predicted_ms": 1000 * seconds,
                    }
                )
    return rows


def failures(rows, builds) -> list[str]:
    problems = [
        f"{b['optimizer']} launches the scalar fallback of {b['kernel']} on gpt2" for b in builds if not b["aligned"]
    ]
    for row in rows:
        for arch, result in row["targets"].items():
            label = f"{row['kernel']} (ALIGNED={row['aligned']}, sm_{arch})"
            if result["spill_bytes"]:
                problems.append(f"{label}: {result['spill_bytes']} bytes of spills")
            if row["aligned"] and result["registers"] > MAX_REGISTERS:
                problems.append(f"{label}: {result['registers']} registers > {MAX_REGISTERS}")
            if row["aligned"] and result["vector_share"] < MIN_VECTOR_SHARE:
                problems.append(
                    f"{label}: {100 * result['vector_share']:.0f}% of element bytes in 128-bit accesses < 80%"
                )
    return problems


def markdown(rows, builds, sweep, predictions) -> str:
    lines = [
        "# Optimizer kernels, compiled for A100 and H100 (static analysis, no GPU)",
        "",
        f"Triton {triton.__version__}, torch {torch.__version__}; `python -m bench.kernel_report`.",
        "",
        "| kernel | build | BLOCK / warps | sm_80 regs | sm_90 regs | spills | occupancy (sm_90) | 128-bit share | "
        "bytes/element (min) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        a, h = row["targets"][80], row["targets"][90]
        build = "ALIGNED" if row["aligned"] else "fallback"
        if row["step_sizes"]:
            build += ", LW-AS step sizes"
        lines.append(
            f"| `{row['kernel']}` | {build} | {row['BLOCK']} / {row['num_warps']} | {a['registers']} | "
            f"{h['registers']} |"
            f" {a['spill_bytes'] + h['spill_bytes']} | {100 * h['occupancy']:.0f}% | {100 * h['vector_share']:.0f}% |"
            f" {h['bytes_per_element']:.0f} ({minimum_bytes()[row['kernel']]}) |"
        )
    lines += [
        "",
        "128-bit share and bytes/element count each branch once (Adam-mini's bias and block paths both;",
        "the reduction's per-block store). Occupancy counts registers only.",
        "",
        "## Builds a gpt2 run launches (a multiplier per tensor, as lr_rule=lwlr)",
        "",
        "| optimizer | kernel | build |",
        "|---|---|---|",
    ]
    lines += [f"| {b['optimizer']} | `{b['kernel']}` | {'ALIGNED' if b['aligned'] else 'fallback'} |" for b in builds]
    lines += [
        "",
        "## Block size (AdamW, ALIGNED, sm_90)",
        "",
        "| BLOCK | warps | elements/thread | registers | occupancy | load bytes in flight per SM |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['BLOCK']} | {r['num_warps']} | {r['elements_per_thread']} | {r['registers']} | "
        f"{100 * r['occupancy']:.0f}% |"
        f" {r['load_bytes_in_flight_per_sm'] // 1024} KiB |"
        for r in sweep
    ]
    lines += [
        "",
        "Little's law asks about 3.35 TB/s x ~1 us / 132 SMs = 25 KB in flight per SM of an H100.",
        "",
        "## Predicted optimizer step time (a static prediction, not a measurement)",
        "",
        f"bytes / ({100 * ACHIEVABLE:.0f}% of peak bandwidth) + launches x {LAUNCH_SECONDS * 1e6:.0f} us. Peak "
        f"bandwidth: "
        + "; ".join(datasheet["source"] for datasheet in DEVICES.values())
        + ". The additive launch term is an upper bound where",
        "launches overlap GPU work.",
        "",
        "| model | device | optimizer | bytes/param | launches | predicted ms |",
        "|---|---|---|---:|---:|---:|",
    ]
    for p in predictions:
        lines.append(
            f"| {p['model']} | {p['device']} | {p['optimizer']} | {p['bytes_per_param']:g} | {p['launches']:g} | "
            f"{p['predicted_ms']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 unless every kernel meets the targets")
    parser.add_argument(
        "--out",
        default=os.path.join(LOCAL, "kernels"),
        help="results path without extension (committed: bench/results/kernels)",
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels were built for the interpreter, not a GPU
        parser.error("unset TRITON_INTERPRET: this compiles the kernels for GPU targets")
    recorded = record_launches()
    rows = kernel_rows(recorded)
    builds = launched_builds(recorded)
    sweep = block_size_sweep(recorded)
    predictions = roofline(recorded)
    report = markdown(rows, builds, sweep, predictions)
    print(report)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(
            {
                "triton": triton.__version__,
                "torch": torch.__version__,
                "kernels": rows,
                "gpt2_builds": builds,
                "block_sizes": sweep,
                "predictions": predictions,
            },
            f,
            indent=1,
        )
    with open(args.out + ".md", "w") as f:
        f.write(report)
    problems = failures(rows, builds)
    for problem in problems:
        print(f"target missed: {problem}", file=sys.stderr)
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
