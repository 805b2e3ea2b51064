"""Where a run executes: torchrun ranks, device, precision, peak FLOPs for MFU, and the run log.
Shared by train.py, multipliers.py and the benchmarks."""

import contextlib
import datetime
import json
import os
import platform
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import triton

from errors import UserError

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
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)  # longer than any eval or checkpoint save


class DeviceError(UserError):
    """A device the config asks for that this machine does not have."""


@dataclass
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    # Launched by torchrun (a process group), even at world size 1: DDP and the all-reduces run, so one GPU
    # exercises the multi-GPU code path (bench/gpu_check.sh) at the cost of a no-op all-reduce per step.
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def print0(self, *args, **kwargs) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)


def init_runtime(device: str = "auto") -> Runtime:
    """Single process, or one rank of a torchrun launch (RANK/WORLD_SIZE/LOCAL_RANK in the environment):
    NCCL across GPUs, gloo across CPU processes."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(
            f"device={device}, but torch sees no CUDA device here (torch {torch.__version__}); use device=cpu "
            "or device=auto"
        )
    if "RANK" not in os.environ:
        return Runtime(0, 0, 1, torch.device(device))
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        run_device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        run_device, backend = torch.device("cpu"), "gloo"
        # Ranks on one host share its cores; oversubscribed threads slow every rank down.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        dist.init_process_group(
            backend, timeout=PROCESS_GROUP_TIMEOUT, device_id=run_device if backend == "nccl" else None
        )
    return Runtime(rank, local_rank, world_size, run_device, distributed=True)


def cache_dir() -> str:
    """Where measurements that depend only on their inputs are kept between runs (lwlr multipliers, the
    kernel self-check): $XDG_CACHE_HOME/lwlr or ~/.cache/lwlr."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lwlr")


def cpu_computes_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic natively (AVX512-BF16 or AMX-BF16), as torch's cpuinfo sees it.
    Elsewhere bf16 on a CPU is emulated through fp32 conversions and runs slower than fp32 itself."""
    capability = getattr(torch._C._cpu, "_get_cpu_capability", dict)()
    return bool(capability.get("avx512_bf16") or capability.get("amx_bf16"))


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
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": sys.version.split()[0],
        "commit": git_commit(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run_main(main) -> None:
    """Run a script's main(): a UserError (errors.py) prints one `error:` line and exits with its class's
    exit_code, 2 unless it says otherwise; anything else is a bug and keeps its traceback. The process
    group is always torn down so torchrun ranks exit cleanly."""
    try:
        code = main()
    except UserError as e:
        if not (e.same_on_every_rank and int(os.environ.get("RANK", "0")) != 0):
            print(f"error: {e}", file=sys.stderr)
        code = e.exit_code
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code)


class RunLog:
    """Console lines plus the same records as JSON lines in out_dir/log.jsonl (rank 0 only), and
    wandb or tensorboard when asked for."""

    def __init__(
        self,
        runtime: Runtime,
        out_dir: str,
        logger: str = "none",
        config: dict | None = None,
        project: str = "lwlr",
        echo=print,
    ):
        self.runtime, self.file, self.backend, self.echo = runtime, None, None, echo
        if not runtime.is_main:
            return
        self.file = open(os.path.join(out_dir, "log.jsonl"), "a")
        if logger == "wandb":
            import wandb

            self.backend = wandb.init(project=project, config=config, dir=out_dir)
        elif logger == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.backend = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        elif logger != "none":
            raise ValueError(f"logger={logger!r}: choose none, wandb or tensorboard")

    def record(self, kind: str, values: dict, line: str | None = None) -> None:
        if not self.runtime.is_main:
            return
        if line:
            self.echo(line)
        end = self.file.tell()
        try:
            self.file.write(json.dumps({"kind": kind, **values}) + "\n")
            self.file.flush()
        except OSError:  # a full disk: leave no half-written record behind (train.py reports the error)
            self.file.truncate(end)
            raise
        step = values.get("step")
        if self.backend is not None and step is not None:
            numbers = {f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and k != "step"}
            if hasattr(self.backend, "add_scalar"):
                for key, value in numbers.items():
                    self.backend.add_scalar(key, value, step)
            else:
                self.backend.log(numbers, step=step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.backend is not None:
            getattr(self.backend, "finish", getattr(self.backend, "close", lambda: None))()


EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): stopped by a signal, run the same command again


class Preempted(BaseException):
    """A stop signal before the first log step: nothing worth saving yet (a BaseException, so that no
    `except Exception` on the way swallows it)."""


# What schedulers and shells send before they stop a job: SIGTERM (Slurm, Kubernetes, torchrun), SIGINT
# (Ctrl-C), SIGHUP (a dropped ssh session), SIGUSR1 (Slurm's --signal=USR1@90 early warning). Each means:
# save and exit 75.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


class StopRequest:
    """A stop signal (STOP_SIGNALS) sets a flag; the loop acts on it at the next log step, on all ranks together. Until
    the first log step (the lwlr measurement, compilation, the first steps: minutes, while schedulers
    grant about 30 s between SIGTERM and SIGKILL) the signal stops the run at once instead: Preempted
    unwinds whatever runs, every file being written is removed or left whole, and the run exits 75."""

    def __init__(self):
        self.requested = False
        self.immediate = True
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        if self.immediate:
            raise Preempted(signal.Signals(signum).name)
