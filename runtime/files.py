"""Files written whole or not at all, and a full disk said clearly: any write that fails for lack of space
becomes a DiskFullError, one line naming the folder and the figures, exit code 74 (EX_IOERR), and
leaves no partial file behind. Appends add whole records or nothing (append_whole).

No write follows a link: a name the run creates or rewrites that holds a symbolic link, a folder or any
other non-regular file is refused (PlantedFileError), and new files are created with O_EXCL and
O_NOFOLLOW, so a link planted in a shared out_dir can never turn a write of the run into a write of
some other file. A folder reached through a link (a symlinked out_dir) is the user's choice and works.

Also where measurements are cached between runs (cache_dir)."""

import contextlib
import errno
import json
import os
import shutil
import stat

from runtime.errors import UserError

EXIT_DISK_FULL = 74  # EX_IOERR (sysexits.h): a write failed for lack of space
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(UserError):
    """A write of the run failed because its file system is full; the last complete checkpoint stands."""

    exit_code = EXIT_DISK_FULL


class PlantedFileError(UserError):
    """A link or other non-regular file at a name the run writes: never written through."""


NO_FOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def refuse_planted(path: str) -> None:
    """Refuse whatever but a regular file stands at path, a name the run is about to create or rewrite."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode):
        return
    kind = "a symbolic link" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode) else "not a regular file"
    raise PlantedFileError(
        f"{path} is {kind}, where the run writes a file of its own; it never writes through one. Remove it (nothing "
        "of the run is in it) and run the same command again"
    )


def refuse_shared(fd: int, path: str) -> None:
    """Refuse a file with another name elsewhere (a hard link, say a backup's): truncating or appending to
    it would change that file too. A rename into place (write_atomically) only unlinks the name, safely."""
    if os.fstat(fd).st_nlink > 1:
        raise PlantedFileError(
            f"{path} is a hard link, shared with another name: the run would write into that file too. Replace it "
            "with a copy of its own (cp, then mv over it) and run the same command again"
        )


def open_new(path: str) -> int:
    """A descriptor of a new, empty regular file at path, the run's own (O_EXCL): a stale regular file of
    that name (a killed write's) is removed first, anything else refused."""
    refuse_planted(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NO_FOLLOW, 0o666)  # the umask applies
    except FileExistsError:  # planted between the check and the open
        refuse_planted(path)
        raise


def open_for_append(path: str) -> int:
    """A descriptor appending to the regular file at path (created if absent), never through a link."""
    refuse_planted(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NO_FOLLOW, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:  # a link planted between the check and the open
            refuse_planted(path)
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        refuse_planted(path)
    try:
        refuse_shared(fd, path)
    except PlantedFileError:
        os.close(fd)
        raise
    return fd


def append_whole(fd: int, data: bytes) -> None:
    """data appended whole, or not at all: a write cut short (a full disk, a file size limit, a signal)
    is truncated back off, so that a reader never meets half a record."""
    end = os.fstat(fd).st_size
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, end)
        raise


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
    return no_space(folder, needed, f"{type(error).__name__}: {error}")


def no_space(folder: str, needed: int | None, cause: str) -> DiskFullError:
    """The DiskFullError of a write into folder that failed with `cause` (an error's type and message)."""
    wanted = f"needed {megabytes(needed)}, " if needed is not None else ""
    return DiskFullError(
        f"no space left on the file system of {folder}: {wanted}{megabytes(free_bytes(folder))} free "
        f"({cause}). Free space and run the same command to resume."
    )


def file_mode() -> int:
    """The mode a new file gets under this process's umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomically(path: str, write, mode: str = "w") -> None:
    """path gets what write(file) writes, whole: a temporary file beside it is renamed into place, and
    removed on any failure (a full disk, a signal). A link or folder at path or at the temporary name is
    refused, never followed."""
    refuse_planted(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = open_new(tmp)
    try:
        with os.fdopen(fd, mode) as f:
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
