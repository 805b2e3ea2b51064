"""How a run stops for a signal: a stop request that saves within a step once the first step is done (and
stops at once before it), the vote that makes every rank stop at the same step, and exit code 75."""

import os
import signal

import torch
import torch.distributed as dist

from runtime.exits import EXIT_PREEMPTED  # noqa: F401 (75, the code a stop exits with; defined without torch)
from runtime.ranks import Runtime


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
        self.steps_done = 0  # kept by the training loop: where the run was when the stop came
        self.came_after_step = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.request(signal.Signals(signum).name)

    def request(self, reason: str) -> None:
        if not self.requested:
            self.came_after_step = self.steps_done
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
