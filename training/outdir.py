"""What a run may do to its out_dir, safely: hold it alone (an advisory lock), refuse a folder it cannot
write before any work, warn when the disk cannot hold its checkpoints, and say what a failed write
amounts to (a full disk, exit 74; a folder that stopped being writable).

The lock: rank 0 holds an exclusive flock on out_dir/.lock for the whole run, and writes its pid, host
and start time into the file for whoever is refused. The kernel drops the lock with its holder's last
file descriptor: after kill -9, or a crash, the next run is not refused. On NFS, Linux emulates flock
with a lease-backed POSIX lock, which the server releases once a dead client's lease expires (about 90
s). The one case a lock cannot cover is a file system without working locks (NFS mounted `nolock`,
some FUSE and object-store mounts): there flock either fails, and the run warns that out_dir is
unguarded and goes on, or it silently succeeds for both runs, which then share the folder as before.
"""

import contextlib
import errno
import fcntl
import json
import os
import socket
import time

import torch.distributed as dist

from runtime.errors import UserError
from runtime.files import NO_FOLLOW, disk_full, free_bytes, megabytes, open_new, refuse_planted, refuse_shared

LOCK_FILE = ".lock"
# The names a run writes directly in out_dir (its checkpoints go through a temporary folder of its own),
# and the folders its loggers write into, which must be folders of out_dir's own, not links.
WRITTEN_NAMES = (
    LOCK_FILE,
    "config.json",
    "log.jsonl",
    "layers.jsonl",
    "lwlr.json",
    "lwlr.png",
    "model.safetensors",
)
LOGGER_FOLDERS = ("tensorboard", "wandb")


class OutDirInUseError(UserError):
    """Another run holds this out_dir."""


class OutDirNotWritableError(UserError):
    """An out_dir the run cannot write into."""


NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def write_failure(error: OSError, out_dir: str) -> UserError | None:
    """What a failed write into out_dir amounts to for the user: a full disk (DiskFullError, exit 74), an
    out_dir that stopped being writable mid-run (permissions changed, remounted read-only), or None: a
    bug, which keeps its traceback."""
    full = disk_full(error, out_dir)
    if full is not None:
        return full
    if error.errno in NOT_WRITABLE:
        return OutDirNotWritableError(
            f"out_dir={out_dir!r} stopped being writable during the run ({error.strerror}: {error.filename}); "
            "the last complete checkpoint stands. Make it writable and run the same command to resume"
        )
    return None


def space_warning(out_dir: str, checkpoint_bytes: int, keep_last: int) -> str | None:
    """A warning when out_dir's free space cannot hold keep_last + 1 checkpoints of this size (a save
    writes the new one before it removes the oldest)."""
    needed = (keep_last + 1) * checkpoint_bytes
    free = free_bytes(out_dir)
    if free >= needed:
        return None
    return (
        f"warning: {out_dir} has {megabytes(free)} free, less than the {megabytes(needed)} that keep_last + 1 = "
        f"{keep_last + 1} "
        f"checkpoints of {megabytes(checkpoint_bytes)} need: a save will fail for lack of space"
    )


@contextlib.contextmanager
def lock(out_dir: str, log=print):
    """Hold out_dir alone for the block: OutDirInUseError names the holder if another run has it."""
    path = os.path.join(out_dir, LOCK_FILE)
    refuse_planted(path)  # a link there would have the run truncate and write whatever it points at
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | NO_FOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:  # planted between the check and the open
            refuse_planted(path)
        raise
    try:
        refuse_shared(fd, path)  # the lock truncates its file
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutDirInUseError(
                f"out_dir {out_dir} is in use by another run ({holder(path)}); wait for it to end, or choose "
                "another out_dir"
            ) from None
        except OSError as e:  # ENOLCK, EOPNOTSUPP: a file system without working locks
            log(
                f"warning: cannot lock {path} ({e.strerror}): this file system has no working locks, so nothing "
                "stops a second run from writing into the same out_dir"
            )
        os.ftruncate(fd, 0)
        os.write(
            fd,
            json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
            ).encode(),
        )
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays, harmless, for the next run to lock


def holder(path: str) -> str:
    """Who holds the lock, as its holder wrote it."""
    try:
        with open(path) as f:
            info = json.load(f)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError):
        return "its holder did not say who it is"


def prepare(out_dir: str) -> None:
    """Fail before any work if out_dir cannot be written; never touch what is already there."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write-test-{os.getpid()}")
        os.close(open_new(probe))
        os.remove(probe)
        for name in WRITTEN_NAMES:  # refused now, before any work, rather than at their first write
            refuse_planted(os.path.join(out_dir, name))
        for name in LOGGER_FOLDERS:
            if os.path.islink(os.path.join(out_dir, name)):
                refuse_planted(os.path.join(out_dir, name))
    except OSError as e:
        raise OutDirNotWritableError(f"out_dir={out_dir!r} is not writable: {e}") from None


@contextlib.contextmanager
def exclusive(out_dir: str, rt):
    """Rank 0 holds out_dir's lock for the run; the other ranks learn whether it could, and stop with it."""
    with contextlib.ExitStack() as held:
        refused = None
        if rt.is_main:
            try:
                held.enter_context(lock(out_dir, log=rt.print0))
            except OutDirInUseError as e:
                refused = e
        if rt.distributed:
            shared = [str(refused) if refused else None]
            dist.broadcast_object_list(shared, src=0)
            if shared[0] and not rt.is_main:
                raise SystemExit(2)  # rank 0 says why
        if refused:
            raise refused
        yield
