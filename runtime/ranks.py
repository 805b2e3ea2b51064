"""Which process this is: one, or a rank of a torchrun launch, on which device; and what a collective
that waits too long for a rank, or whose peer went away, becomes (one line naming that rank)."""

import contextlib
import datetime
import os
import re
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from runtime import host_memory, threads
from runtime.errors import UserError


class DeviceError(UserError):
    """A device the config asks for that this machine does not have."""


class HungRankError(UserError):
    """A collective that waited dist_timeout seconds for a rank that never came: frozen, dead, or far behind."""


class VanishedRankError(UserError):
    """A collective whose connection to another rank closed: that rank was killed, crashed, or lost its host."""


# What gloo (and NCCL's socket transport) say when the other end of a connection went away.
PEER_GONE = re.compile(r"Connection (reset|closed) by peer|Broken pipe")


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
    threads: tuple[int, str] = (0, "")  # torch's CPU threads and why (runtime.threads)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def print0(self, *args, **kwargs) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def unanswering_ranks(self, event: str) -> list[int] | None:
        """After a collective failed (event: "timed-out", "peer-gone"): the ranks that did not fail with it.
        Each rank still alive meets the failure within moments of the others and says so in the process
        group's store; the ranks that say nothing within a few seconds are frozen, dead, or somewhere else
        entirely. None when the store cannot be reached (it may live in the lost rank's process)."""
        try:
            store = dist.distributed_c10d._get_default_store()
            store.set_timeout(datetime.timedelta(seconds=5))
            store.set(f"lwlr/{event}/{self.rank}", "1")
            time.sleep(3)
            return [rank for rank in range(self.world_size) if not store.check([f"lwlr/{event}/{rank}"])]
        except Exception:  # noqa: BLE001 (the store's errors share no type): the message says less, no more
            return None

    def vanished(self, error: BaseException, collective: str) -> VanishedRankError | None:
        """The VanishedRankError that `error`, raised in `collective`, amounts to; None if it is no lost peer."""
        if not (self.distributed and isinstance(error, RuntimeError) and PEER_GONE.search(str(error))):
            return None
        gone = self.unanswering_ranks("peer-gone")
        named = f"rank{'s' * (len(gone) > 1)} {', '.join(map(str, gone))}" if gone else "another rank"
        return VanishedRankError(
            f"rank {self.rank}: {named} went away during {collective} (its connection closed: killed, crashed, or "
            "its host lost); the run stops, the last checkpoint stands. Look at that rank's log and host, then run "
            "the same command to resume"
        )

    @contextlib.contextmanager
    def waiting_for_ranks(self, collective: str):
        """A RuntimeError inside this block that says a peer's connection closed is a VanishedRankError; one
        after dist_timeout seconds is the process group's timeout (gloo says "Timed out waiting ... for
        recv"): a HungRankError. Each names the collective and the ranks that went silent. On NCCL, torch's
        watchdog ends the process first, with a message naming the collective."""
        start = time.monotonic()
        try:
            yield
        except RuntimeError as e:
            waited = time.monotonic() - start
            lost = self.vanished(e, collective)
            if lost is not None:
                raise lost from None
            if not self.distributed or waited < self.timeout_s:
                raise
            silent = self.unanswering_ranks("timed-out")
            ranks = f"rank{'s' * (len(silent or []) > 1)} {', '.join(map(str, silent or []))}"
            named = f"{ranks}, which" if silent else "a rank that"
            raise HungRankError(
                f"rank {self.rank}: {collective} waited {waited:.0f} s (dist_timeout={self.timeout_s}) for {named} "
                "did not answer; the run stops, the last checkpoint stands. Look at that rank's host (frozen, out "
                "of memory, dead), then run the same command to resume"
            ) from None


def init_runtime(device: str = "auto", timeout_s: int = 600, cpu_threads: int = 0) -> Runtime:
    """Single process, or one rank of a torchrun launch (RANK/WORLD_SIZE/LOCAL_RANK in the environment):
    NCCL across GPUs, gloo across CPU processes. A collective waits timeout_s for every rank. On a CPU,
    torch computes with cpu_threads threads (0: runtime.threads chooses)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(
            f"device={device}, but torch sees no CUDA device here (torch {torch.__version__}); use device=cpu "
            "or device=auto"
        )
    if not device.startswith("cuda"):  # the step's tensors live in host memory: keep its pages mapped
        host_memory.retain_freed_memory()
    if "RANK" not in os.environ:
        return Runtime(0, 0, 1, torch.device(device), threads=set_threads(device, cpu_threads, 1))
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    # Ranks on one host share its cores; oversubscribed threads slow every rank down.
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    threads = set_threads(device, cpu_threads, local_world)
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        run_device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        run_device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend, timeout=datetime.timedelta(seconds=timeout_s), device_id=run_device if backend == "nccl" else None
        )
    return Runtime(rank, local_rank, world_size, run_device, distributed=True, timeout_s=timeout_s, threads=threads)


def set_threads(device: str, cpu_threads: int, ranks_on_host: int) -> tuple[int, str]:
    """torch's CPU threads, as runtime.threads chooses them for a CPU run (a GPU run keeps torch's own)."""
    if device.startswith("cuda"):
        return torch.get_num_threads(), "torch's default beside a GPU"
    count, why = threads.choose(cpu_threads, ranks_on_host)
    torch.set_num_threads(count)
    return count, why


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor averaged over the ranks, in place (LW-AS's curvature terms, each rank's own batch's)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.AVG)
    return tensor
