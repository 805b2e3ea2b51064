"""Files written whole or not at all, and a full disk said clearly: any write that fails for lack of space
becomes a DiskFullError, one line naming the folder and the figures, exit code 74 (EX_IOERR), and
leaves no partial file behind. Also where measurements are cached between runs (cache_dir)."""

import contextlib
import errno
import json
import os
import shutil

from runtime.errors import UserError

EXIT_DISK_FULL = 74  # EX_IOERR (sysexits.h): a write failed for lack of space
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(UserError):
    """A write of the run failed because its file system is full; the last complete checkpoint stands."""

    exit_code = EXIT_DISK_FULL


def megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def free_bytes(folder: str) -> int:
    return shutil.disk_usage(folder).free


def disk_full(error: BaseException, folder: str, needed: int | None = None) -> DiskFullError | None:
    """The DiskFullError that `error` (raised by a write into folder) amounts to, or None. torch.save
    reports a full disk as a RuntimeError without an errno ("unexpected pos ..."), so a failed write of
    `needed` bytes that no longer fit in the free space counts too."""
    free = free_bytes(folder)
    if not (isinstance(error, OSError) and error.errno in NO_SPACE) and not (needed is not None and free < needed):
        return None
    wanted = f"needed {megabytes(needed)}, " if needed is not None else ""
    return DiskFullError(
        f"no space left on the file system of {folder}: {wanted}{megabytes(free)} free "
        f"({type(error).__name__}: {error}). Free space and run the same command to resume."
    )


def file_mode() -> int:
    """The mode a new file gets under this process's umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomically(path: str, write, mode: str = "w") -> None:
    """path gets what write(file) writes, whole: a temporary file beside it is renamed into place, and
    removed on any failure (a full disk, a signal)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        full = disk_full(e, os.path.dirname(path) or ".") if isinstance(e, OSError) else None
        if full is not None:
            raise full from None
        raise


def write_json(path: str, data) -> None:
    write_atomically(path, lambda f: json.dump(data, f, indent=2))


def cache_dir() -> str:
    """Where measurements that depend only on their inputs are kept between runs (lwlr multipliers, the
    kernel self-check): $XDG_CACHE_HOME/lwlr or ~/.cache/lwlr."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lwlr")
