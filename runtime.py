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
import time
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


class DeviceError(UserError):
    """A device the config asks for that this machine does not have."""


class HungRankError(UserError):
    """A collective that waited dist_timeout seconds for a rank that never came: frozen, dead, or far behind."""


@dataclass
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    # Launched by torchrun (a process group), even at world size 1: DDP and the all-reduces run, so one GPU
    # exercises the multi-GPU code path (bench/gpu_check.sh) at the cost of a no-op all-reduce per step.
    distributed: bool = False
    timeout_s: int = 600  # how long a collective waits for every rank (dist_timeout)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def print0(self, *args, **kwargs) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def unanswering_ranks(self) -> list[int] | None:
        """After a collective timed out: the ranks that did not time out with it. Each rank still alive reaches
        its timeout within moments of the others and says so in the process group's store; the ranks that
        say nothing within a few seconds are frozen, dead, or somewhere else entirely. None when the store
        cannot be reached (it may live in the hung rank's process)."""
        try:
            store = dist.distributed_c10d._get_default_store()
            store.set_timeout(datetime.timedelta(seconds=5))
            store.set(f"lwlr/timed-out/{self.rank}", "1")
            time.sleep(3)
            return [rank for rank in range(self.world_size) if not store.check([f"lwlr/timed-out/{rank}"])]
        except Exception:  # noqa: BLE001 (the store's errors share no type): the message says less, no more
            return None

    @contextlib.contextmanager
    def waiting_for_ranks(self, collective: str):
        """A RuntimeError after dist_timeout seconds inside this block is the process group's timeout (gloo
        says "Timed out waiting ... for recv"): a HungRankError naming the collective and the ranks that did
        not answer. On NCCL, torch's watchdog ends the process first, with a message naming the collective."""
        start = time.monotonic()
        try:
            yield
        except RuntimeError:
            waited = time.monotonic() - start
            if not self.distributed or waited < self.timeout_s:
                raise
            silent = self.unanswering_ranks()
            ranks = f"rank{'s' * (len(silent or []) > 1)} {', '.join(map(str, silent or []))}"
            named = f"{ranks}, which" if silent else "a rank that"
            raise HungRankError(
                f"rank {self.rank}: {collective} waited {waited:.0f} s (dist_timeout={self.timeout_s}) for {named} "
                "did not answer; the run stops, the last checkpoint stands. Look at that rank's host (frozen, out "
                "of memory, dead), then run the same command to resume"
            ) from None


def init_runtime(device: str = "auto", timeout_s: int = 600) -> Runtime:
    """Single process, or one rank of a torchrun launch (RANK/WORLD_SIZE/LOCAL_RANK in the environment):
    NCCL across GPUs, gloo across CPU processes. A collective waits timeout_s for every rank."""
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
            backend, timeout=datetime.timedelta(seconds=timeout_s), device_id=run_device if backend == "nccl" else None
        )
    return Runtime(rank, local_rank, world_size, run_device, distributed=True, timeout_s=timeout_s)


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
        # a CPU's vector width decides its speed and bf16, and so whether two machines' fp32 sums match
        **({"cpu_capability": torch.backends.cpu.get_cpu_capability()} if device.type == "cpu" else {}),
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
    code = 1
    try:
        code = main()
    except UserError as e:
        if not (e.same_on_every_rank and int(os.environ.get("RANK", "0")) != 0):
            print(f"error: {e}", file=sys.stderr)
        code = e.exit_code
    finally:  # code stays 1 for a bug, whose traceback follows
        if dist.is_initialized():
            dist.destroy_process_group()
        report_exit_code(code)
    sys.exit(code)


EXIT_CODE_FILE = "LWLR_EXIT_CODE_FILE"  # set by launch.py, which torchrun's own exit code cannot replace


def report_exit_code(code: int) -> None:
    """Rank 0 writes its exit code where launch.py reads it: torchrun itself exits 1 after any stop."""
    path = os.environ.get(EXIT_CODE_FILE)
    if path and int(os.environ.get("RANK", "0")) == 0:
        with open(path, "w") as f:
            f.write(str(code))


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
    """A stop signal before the first step is done, or anywhere in a sweep: nothing worth saving yet (a
    BaseException, so that no `except Exception` on the way swallows it)."""


# What schedulers and shells send before they stop a job: SIGTERM (Slurm, Kubernetes, torchrun), SIGINT
# (Ctrl-C), SIGHUP (a dropped ssh session), SIGUSR1 (Slurm's --signal=USR1@90 early warning). Each means:
# save and exit 75.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


class StopRequest:
    """A stop signal (STOP_SIGNALS) sets a flag, which the training loop reads after every step and every
    eval batch (StopVote), so a stop is answered within a step plus the save. Until the first step is done
    (the lwlr measurement, the kernel self-check, compilation: minutes, while schedulers grant about 30 s
    between SIGTERM and SIGKILL) the signal stops the run at once instead: Preempted unwinds whatever
    runs, every file being written is removed or left whole, and the run exits 75."""

    def __init__(self):
        self.requested = False
        self.reason = ""  # the signal's name, or why the run stops without one
        self.immediate = True
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.request(signal.Signals(signum).name)

    def request(self, reason: str) -> None:
        self.requested, self.reason = True, self.reason or reason
        if self.immediate:
            raise Preempted(reason)


class StopVote:
    """Whether to stop now, the same answer on every rank at the same point, without stalling the device.

    One process reads its own flag. Ranks must stop at the same step, and a host read of an all-reduced
    flag at every step would wait for the device each time; so every call all-reduces this rank's vote
    (asynchronous on NCCL) and answers with the previous call's result, copied to host memory behind
    it: the host waits only for work the device finished a step ago, and every rank stops one poll
    after the first one voted. A launcher that went away (kill -9 of torchrun) counts as a stop, so
    orphaned ranks save, exit, and free out_dir's lock."""

    def __init__(self, rt: Runtime, stop: StopRequest):
        self.rt, self.stop = rt, stop
        self.parent = os.getppid()
        self.pending = None  # the last vote: (host copy, its CUDA event or None)

    def poll(self, where: str) -> bool:
        if self.rt.distributed and os.getppid() != self.parent:
            self.stop.request(f"its launcher, pid {self.parent}, exited")
        if not self.rt.distributed:
            return self.stop.requested
        vote = torch.full((), float(self.stop.requested), device=self.rt.device)
        with self.rt.waiting_for_ranks(f"the stop vote at {where}"):
            dist.all_reduce(vote, op=dist.ReduceOp.MAX)
        previous, self.pending = self.pending, self._to_host(vote)
        if previous is None:
            return False
        host, event = previous
        if event is not None:
            event.synchronize()
        return bool(host.item())

    def _to_host(self, vote: torch.Tensor):
        if vote.device.type != "cuda":
            return vote, None
        host = vote.to("cpu", non_blocking=True)  # into pinned memory, behind the all-reduce on the stream
        event = torch.cuda.Event()
        event.record()
        return host, event
