"""The device a run computes on: the precision it takes there, its peak FLOPs (for MFU) and memory, and
the record of the machine and code every result depends on (environment)."""

import contextlib
import datetime
import os
import platform
import resource
import subprocess
import sys

import torch
import triton

# Dense bf16 tensor-core peaks from the vendors' datasheets, matched by substring of the device name,
# most specific first.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("GH200", 989e12),  # before "H200", which its name contains
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 125e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
)


def _cpu_capability() -> dict:
    """torch's cpuinfo flags for this CPU (avx2, avx512_f, avx512_bf16, amx_bf16, ...); empty where torch has none."""
    return getattr(torch._C._cpu, "_get_cpu_capability", dict)()


def cpu_computes_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic natively (AVX512-BF16 or AMX-BF16), as torch's cpuinfo sees it.
    Elsewhere bf16 on a CPU is emulated through fp32 conversions and runs slower than fp32 itself."""
    capability = _cpu_capability()
    return bool(capability.get("avx512_bf16") or capability.get("amx_bf16"))


def cpu_kind() -> str:
    """This CPU's vector kind, as figures measured on it name it: AVX2, AVX512, AVX512-BF16, AVX512-BF16+AMX."""
    capability = _cpu_capability()
    kind = "AVX512" if capability.get("avx512_f") else "AVX2" if capability.get("avx2") else "x86-64 or other"
    if capability.get("avx512_bf16"):
        kind += "-BF16"
    return kind + ("+AMX" if capability.get("amx_bf16") else "")


def precision(device: torch.device, dtype: str) -> tuple[str, str]:
    """The precision dtype=auto|bfloat16|float32 comes to on this device, and why, in words."""
    if dtype not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"dtype={dtype!r}: choose auto, bfloat16 or float32")
    if dtype != "auto":
        return dtype, f"dtype={dtype}"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "dtype=auto on a CUDA device with bf16"
        return "float32", "dtype=auto on a CUDA device without bf16"
    if device.type == "cpu" and cpu_computes_bf16():
        return "bfloat16", "dtype=auto on a CPU that computes bf16 natively (AVX512-BF16 or AMX)"
    return "float32", f"dtype=auto on a {device.type} without native bf16"


def autocast(device: torch.device, dtype: str):
    """bf16 autocast where `precision` says bfloat16 (weights, gradients and optimizer states stay fp32;
    autocast keeps the loss and its log-softmax in fp32), else no autocast."""
    if precision(device, dtype)[0] == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores)"


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of one device, None when unknown (CPUs): MFU is then not reported."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def git_commit() -> str:
    """HEAD's short hash; LWLR_COMMIT where the code travelled without its .git (the GPU machine)."""
    if os.environ.get("LWLR_COMMIT"):
        return os.environ["LWLR_COMMIT"]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    """What a result depends on, recorded with every run and benchmark (Triton's version matters for the
    fused optimizers)."""
    return {
        "device": device_name(device),
        # a CPU's vector width decides its speed and bf16, and so whether two machines' fp32 sums match
        **({"cpu_capability": torch.backends.cpu.get_cpu_capability()} if device.type == "cpu" else {}),
        # a CPU step's speed, on a quiet machine and a busy one (runtime/threads.py)
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": sys.version.split()[0],
        "commit": git_commit(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
