"""Sharded checkpoints, the layout of parallel=fsdp runs: each rank writes its own shards of the model and the
optimizer state, all ranks at once, through torch.distributed.checkpoint (DCP), while training goes on.

A step folder of this layout (meta.json's format_version 3, layout "sharded") holds

    __R_0.distcp   rank R's shards of every tensor (DCP's files; a tensor every rank holds whole, as Adam-mini's
                   per-block second moments, is written once)
    .metadata      DCP's index of them: which chunk of which tensor lies where (rank 0 writes it)
    rest.pt        what no rank shards: the optimizer's param groups and scalar state, and the names of the
                   tied tensors (wte / lm_head, stored once)
    meta.json      as every checkpoint's (training/checkpoint.py), with each file's size and SHA-256

and is written under checkpoint.py's protocol: a temporary folder, every file fsynced, each rank hashing its own
files, meta.json written last by rank 0 once every rank reports done, then one rename. So a folder named step-*
is complete by construction, whichever rank is killed when.

A save (ShardedSaver.save) stalls the step only to copy this rank's shards to host memory; a background
thread writes them, over a process group of its own, so the step's collectives and the save's never meet. At
most one save is in flight: the next one, a stop and the end of training wait for it, and its outcome (a full
disk is exit 74) is raised there, on every rank together.

Reading one needs no process group and no sharding (checkpoint.read_sharded): full tensors, on any number of
ranks, under DDP or fsdp or in one process.
"""

import dataclasses
import glob
import os
import shutil
import threading
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

from runtime.files import DiskFullError, disk_full, free_bytes, no_space
from training import checkpoint
from training.checkpoint import SHARDED_VERSION, TENSOR

# ---- what a checkpoint holds, as DCP's flat dict of tensors and rest.pt's remainder


def flatten(model_state: dict, optimizer_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """({key: tensor} for DCP, rest): the model's tensors as model/NAME (a tensor under two names, the tied
    embedding, once: rest["tied"] names the other), the optimizer state's tensors as optimizer/PATH, each
    replaced in rest["optimizer"] by the string tensor:KEY."""
    tensors, tied, first_name = {}, {}, {}
    for name, value in model_state.items():
        if id(value) in first_name:
            tied[name] = first_name[id(value)]
            continue
        first_name[id(value)] = name
        tensors[f"model/{name}"] = value

    def strip(item, path):
        if torch.is_tensor(item):
            key = "optimizer/" + "/".join(path)
            tensors[key] = item
            return TENSOR + key
        if isinstance(item, dict):
            return {k: strip(v, (*path, str(k))) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return type(item)(strip(v, (*path, str(i))) for i, v in enumerate(item))
        return item

    return tensors, {"tied": tied, "optimizer": strip(optimizer_state, ())}


def stage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy in host memory of this rank's part of every tensor, laid out as before (a DTensor stays one, over
    its copy): what the background write reads while the step updates the originals in place."""
    staged = {}
    for key, t in tensors.items():
        if isinstance(t, DTensor):
            copy = t.to_local().detach().to("cpu", copy=True)
            staged[key] = DTensor.from_local(
                copy, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
            )
        else:
            staged[key] = t.detach().to("cpu", copy=True)
    return staged


def local_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors.values())


# ---- the background save


class ShardedSaver:
    """Every rank's saves under fsdp. Creating one is a collective (its process group)."""

    def __init__(self, rt, out_dir: str):
        self.rt, self.out_dir = rt, out_dir
        # The save's collectives run in a thread beside the step's: on a group of their own (gloo, host tensors).
        self.group = dist.new_group(backend="gloo")
        owner = [os.getpid()]  # the temporary folder's name, the same on every rank
        dist.broadcast_object_list(owner, src=0, group=self.group)
        self.owner = owner[0]
        self._thread: threading.Thread | None = None
        self._outcome: BaseException | None = None

    def tmp_dir(self, step: int) -> str:
        return os.path.join(self.out_dir, f"{checkpoint.TMP_PREFIX}{step:08d}-{self.owner}")

    def save(self, step: int, model_state: dict, optimizer_state: dict, meta: dict | None, keep_last: int, reason: str):
        """Begins writing the checkpoint of `step` (meta: rank 0's meta.json content, None elsewhere) after
        the save in flight, if any, has landed; returns once this rank's shards are copied."""
        self.wait()
        began = time.perf_counter()
        tensors, rest = flatten(model_state, optimizer_state)
        size = local_bytes(tensors)
        self._refuse_what_cannot_fit(step, size, meta)
        job = _Save(step, self.tmp_dir(step), stage(tensors), rest, size, meta, keep_last, reason, began)
        job.stall = time.perf_counter() - began
        shutil.rmtree(job.tmp, ignore_errors=True)  # a killed save's, of this step (remove_stale_temporaries missed)
        os.makedirs(job.tmp, exist_ok=True)
        self._outcome = None
        # daemon: a run that fails elsewhere does not wait for it; its temporary folder is removed later
        self._thread = threading.Thread(target=self._write, args=(job,), name=f"checkpoint-{step}", daemon=True)
        self._thread.start()

    def _refuse_what_cannot_fit(self, step: int, this_rank_bytes: int, meta: dict | None) -> None:
        """A save whose shards cannot fit in out_dir's free space is refused before a byte is written, on every
        rank together (no save is in flight: this group is free). Found only once the background write has
        filled the disk, it would fail rank 0's next log line first."""
        sizes = [None] * self.rt.world_size
        dist.all_gather_object(sizes, this_rank_bytes, group=self.group)
        verdict = [None]
        if self.rt.is_main and free_bytes(self.out_dir) < sum(sizes):
            cause = "the save's shards do not fit in the free space"
            full = no_space(self.out_dir, sum(sizes), cause)
            verdict = [str(checkpoint.disk_full_error(self.out_dir, step, full, meta.get("run_id")))]
        dist.broadcast_object_list(verdict, src=0, group=self.group)
        if verdict[0] is not None:
            raise said_once(DiskFullError(verdict[0]))

    def wait(self) -> None:
        """Returns once no save is in flight; raises what the last one met (the same on every rank)."""
        if self._thread is None:
            return
        self._thread.join()
        self._thread = None
        outcome, self._outcome = self._outcome, None
        if outcome is not None:
            raise outcome

    def _write(self, job: "_Save") -> None:
        try:
            self._outcome = self._written(job)
        except BaseException as e:  # noqa: BLE001 a bug's traceback, raised again in the main thread by wait()
            self._outcome = e

    def _written(self, job: "_Save") -> BaseException | None:
        """What the save came to, the same on every rank: None once the folder is in place, else the error to
        raise (this rank's own exception where it had one, so a bug keeps its traceback)."""
        rank, error, report = self.rt.rank, None, None
        try:
            writer = dcp.FileSystemWriter(job.tmp, single_file_per_rank=True, sync_files=True, thread_count=1)
            dcp.save(job.staged, storage_writer=writer, process_group=self.group)
            pattern = os.path.join(glob.escape(job.tmp), f"__{rank}_*.distcp")
            names = [os.path.basename(path) for path in glob.glob(pattern)]
            if rank == 0:
                checkpoint.write_file(os.path.join(job.tmp, "rest.pt"), lambda f: torch.save(job.rest, f))
                names += [".metadata", "rest.pt"]
            files = {name: checkpoint.file_entry(os.path.join(job.tmp, name)) for name in names}
        except Exception as e:  # noqa: BLE001 every rank learns of any rank's failure below
            error, files = e, None
            cause = underlying(e)
            report = (disk_full(cause, self.out_dir, needed=job.size) is not None, f"{type(cause).__name__}: {cause}")
        reports = [None] * self.rt.world_size
        dist.all_gather_object(reports, (files, report, job.size), group=self.group)
        kind, message, own_error = self._finish(job, reports) if rank == 0 else (None, None, None)
        verdict = [(kind, message)]
        dist.broadcast_object_list(verdict, src=0, group=self.group)
        kind, message = verdict[0]
        if kind == "saved":
            self.rt.print0(
                f"saved {message} ({job.reason}; sharded over {self.rt.world_size} ranks: the step waited "
                f"{job.stall:.2f} s, written in {time.perf_counter() - job.began:.2f} s)"
            )
            return None
        if kind == "disk full":
            return said_once(DiskFullError(message))
        return error or own_error or RuntimeError(f"rank {rank}: saving step {job.step} failed: {message}")

    def _finish(self, job: "_Save", reports) -> tuple[str, str, BaseException | None]:
        """Rank 0, once every rank reported: meta.json and the rename, or the folder removed after a failure.
        ("saved", the folder, None) or ("disk full" | "failed", what to say, rank 0's own exception if any)."""
        failed = [(rank, report) for rank, (_, report, _) in enumerate(reports) if report is not None]
        needed = sum(size for _, _, size in reports)
        own_error = None
        try:
            if not failed:
                files = {name: entry for rank_files, _, _ in reports for name, entry in rank_files.items()}
                meta = {"format_version": SHARDED_VERSION, "layout": "sharded", "step": job.step, **job.meta}
                final = checkpoint.commit(job.tmp, self.out_dir, job.step, {**meta, "files": files}, self.rt.print0)
                checkpoint.remove_old(self.out_dir, job.meta.get("run_id"), job.keep_last)
                return "saved", final, None
        except Exception as e:  # noqa: BLE001 meta.json's write or the rename: as a rank's own failure
            own_error = e
            failed = [(0, (disk_full(e, self.out_dir, needed=needed) is not None, f"{type(e).__name__}: {e}"))]
        shutil.rmtree(job.tmp, ignore_errors=True)
        cause = next((text for _, (full, text) in failed if full), None)
        if cause is not None:
            full = no_space(self.out_dir, needed, cause)
            message = str(checkpoint.disk_full_error(self.out_dir, job.step, full, job.meta.get("run_id")))
            return "disk full", message, own_error
        return "failed", "; ".join(f"rank {rank}: {text}" for rank, (_, text) in failed), own_error


@dataclasses.dataclass
class _Save:
    """One save in flight: what the background thread writes, and what it says when done."""

    step: int
    tmp: str  # the temporary folder, the same on every rank
    staged: dict  # this rank's copies of its shards
    rest: dict  # rank 0's rest.pt
    size: int  # the bytes of this rank's shards
    meta: dict | None  # rank 0's meta.json content, None elsewhere
    keep_last: int
    reason: str
    began: float
    stall: float = 0.0


def said_once(error: DiskFullError) -> DiskFullError:
    """An error every rank raises with rank 0's words: rank 0 alone says it (runtime.exits.say)."""
    error.same_on_every_rank = True
    return error


def underlying(error: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's CheckpointException (which gathers every rank's), else error."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict):
        for wrapped in failures.values():
            inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
            if isinstance(inner, BaseException):
                return inner
    return error
