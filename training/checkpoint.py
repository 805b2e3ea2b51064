"""Checkpoints as out_dir/step-XXXXXXXX/ folders, written so that a crash never costs the last good one.

A save writes every file into a hidden temporary folder, fsyncs them, writes meta.json last (format
version, step, config, the run's id, and each file's size and SHA-256), fsyncs, then renames the folder
into place: a folder named step-* is complete by construction. Older checkpoints are removed only after
that, down to the newest `keep_last`, and only those whose meta.json names this run: a folder that does
not verify, or another run's, is never deleted. A folder already at the step a save writes (one that did
not verify when the run began) is moved aside, never removed. Loading walks from the newest folder
down, verifies sizes and checksums, and skips (and reports) any that fail, saying whether a file was
damaged or could not be read at all (a disk or permission error). Tensors are read with
torch.load(weights_only=True), never pickle.

Two layouts. A full checkpoint (one process and DDP; format 2) holds model.pt and optimizer.pt, written by
rank 0. A sharded one (parallel=fsdp; format 3, meta.json's "layout": "sharded", training/sharded.py) holds
each rank's shards, written by every rank at once under the same protocol. Either resumes under any mode and
number of ranks, and load_tensors reads either as full tensors.

Format 2 calls the layer-wise learning-rate multiplier what the code calls it: `multipliers` in
meta.json, `multiplier` in the optimizer's param groups. Format 1 (checkpoints written before) called
them lr_multipliers and lr_scale, and is read as format 2 (verify, load_optimizer_state).
"""

import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import stat
import sys
import time
import warnings

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_model
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, StorageMeta

from model import GPT, non_finite, vocab_size_of
from runtime.errors import UserError
from runtime.files import DiskFullError, disk_full, file_mode, open_new, refuse_planted
from training.build import gpt_config
from training.config import TrainConfig

FORMAT_VERSION = 2
SHARDED_VERSION = 3  # the sharded layout's
READABLE_VERSIONS = (1, 2, SHARDED_VERSION)
STEP_DIR = re.compile(r"^step-(\d{8})$")
TMP_PREFIX = ".tmp-step-"
# What every checkpoint of a layout holds: meta.json's list must name them.
REQUIRED_FILES = ("model.pt", "optimizer.pt")
SHARDED_REQUIRED_FILES = (".metadata", "rest.pt")  # DCP's index; what no rank shards
TENSOR = "tensor:"  # in a sharded checkpoint's rest.pt, where a tensor of its shards goes back


class CheckpointError(UserError):
    """A checkpoint that is missing, damaged, or does not fit the run's config."""

    kind = "damaged"  # how a skipped one is said


class CheckpointUnreadable(CheckpointError):
    """A checkpoint file the system would not let us read (EIO, EACCES): a disk or permission problem,
    not known to be damaged."""

    kind = "unreadable"


# What a read meets in a folder whose shape is wrong (a name missing, a folder or a link loop where a file
# belongs): damage. Any other error of the read (EIO, EACCES, ...) is the disk's or the permissions'.
SHAPE_ERRNOS = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP)


def _read_failure(path: str, error: OSError) -> CheckpointError:
    if error.errno in SHAPE_ERRNOS:
        return CheckpointError(f"{path}: {error.strerror or error}, where the checkpoint has a file")
    return CheckpointUnreadable(
        f"{path}: cannot be read ({error.strerror or error}): a disk or permission error, not a damaged checkpoint"
    )


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str, write) -> dict:
    """path written by write(file) and fsynced; its entry in meta.json's file list."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return file_entry(path)


def file_entry(path: str) -> dict:
    return {"bytes": os.path.getsize(path), "sha256": _sha256(path)}


def _remove(path: str) -> None:
    """Whatever stands at path, a folder or a plain file (a step-* name can be either after damage)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def step_dir(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"step-{step:08d}")


def complete_steps(out_dir: str) -> list[int]:
    """Steps of the step-* folders in out_dir, newest first."""
    if not os.path.isdir(out_dir):
        return []
    steps = [int(m.group(1)) for name in os.listdir(out_dir) if (m := STEP_DIR.match(name))]
    return sorted(steps, reverse=True)


def tensor_bytes(obj) -> int:
    """The bytes of every tensor in a (nested) state dict: a checkpoint's size on disk, to within its
    small pickled structure."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def belongs(path: str, run_id: str | None) -> bool:
    """Whether the step folder at path is one of the run's: its meta.json readable and naming run_id (None:
    a run resumed from a checkpoint written before runs had ids, whose folders name none)."""
    try:
        with open(os.path.join(path, "meta.json"), "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("run_id") == run_id


def own_steps(out_dir: str, run_id: str | None) -> list[int]:
    """The steps of the run's own checkpoints in out_dir, newest first."""
    return [step for step in complete_steps(out_dir) if belongs(step_dir(out_dir, step), run_id)]


def move_aside(path: str, say=print) -> str:
    """A step folder that did not verify, where a save must write: renamed, never deleted (it may hold what
    a disk error hid); the new name is no checkpoint's, so nothing reads or removes it."""
    aside = f"{path}.unverified-{time.strftime('%Y%m%dT%H%M%S')}"
    what = "a link, no checkpoint of the run" if os.path.islink(path) else "which did not verify when the run began"
    os.rename(path, aside)  # a link is renamed itself, never followed
    say(f"moved {path}, {what}, aside to {aside}; delete it once of no use")
    return aside


def save(out_dir: str, step: int, tensors: dict[str, dict], meta: dict, keep_last: int, say=print) -> str:
    """tensors: {"model": state_dict, "optimizer": state_dict, ...}, each saved as <name>.pt; meta: JSON,
    with the run's id (`run_id`), which retention keeps to. A save that fails for lack of space raises
    runtime.files.DiskFullError, its partial folder removed."""
    check_keep_last(keep_last)
    tmp = os.path.join(out_dir, f"{TMP_PREFIX}{step:08d}-{os.getpid()}")
    if os.path.islink(tmp):  # a killed save's folder is removed; a link is nothing the run wrote
        refuse_planted(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        files = {
            f"{name}.pt": write_file(os.path.join(tmp, f"{name}.pt"), lambda f, obj=obj: torch.save(obj, f))
            for name, obj in tensors.items()
        }
        meta = {"format_version": FORMAT_VERSION, "step": step, **meta, "files": files}
        final = commit(tmp, out_dir, step, meta, say)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full(e, out_dir, needed=tensor_bytes(tensors)) if isinstance(e, Exception) else None
        if full is None:
            raise
        raise disk_full_error(out_dir, step, full, meta.get("run_id")) from None
    remove_old(out_dir, meta.get("run_id"), keep_last)
    return final


def check_keep_last(keep_last: int) -> None:
    if keep_last < 2:
        raise ValueError(f"keep_last={keep_last}: keep at least 2 so one survives a failed save")


def commit(tmp: str, out_dir: str, step: int, meta: dict, say=print) -> str:
    """The folder tmp, its files written and fsynced, made the checkpoint of `step`: meta.json written last,
    then one rename. Returns the step folder's path."""
    final = step_dir(out_dir, step)
    write_file(os.path.join(tmp, "meta.json"), lambda f: f.write(json.dumps(meta, indent=2).encode()))
    _fsync_dir(tmp)
    if os.path.lexists(final):  # skipped when the run began: a run saves each step once
        move_aside(final, say)
    os.rename(tmp, final)
    _fsync_dir(out_dir)
    return final


def remove_old(out_dir: str, run_id: str | None, keep_last: int) -> None:
    """The run's own checkpoints past the newest keep_last, once a new one is in place."""
    for old in own_steps(out_dir, run_id)[keep_last:]:
        try:
            _remove(step_dir(out_dir, old))
        except OSError:  # retention is housekeeping: the new checkpoint is already in place
            pass


def disk_full_error(out_dir: str, step: int, full: DiskFullError, run_id: str | None) -> DiskFullError:
    """The one line a save that ran out of space ends the run with: what failed, and what stands."""
    kept = own_steps(out_dir, run_id)
    last = f"the last complete checkpoint, {step_dir(out_dir, kept[0])}, is intact" if kept else None
    stands = last or "no earlier checkpoint exists"
    return DiskFullError(f"saving step {step}: {full} Nothing of this save is left; {stands}.")


STALE_FILE = re.compile(r"\.tmp-\d+$|^\.write-test-\d+$")  # write_atomically's, the export's and outdir.prepare's


def remove_stale_temporaries(out_dir: str) -> None:
    """What writes that were killed left behind (a checkpoint's folder, the export's model.safetensors.tmp-PID,
    config.json.tmp-PID): never complete, safe to delete once this run holds out_dir."""
    if os.path.isdir(out_dir):
        for name in os.listdir(out_dir):
            if name.startswith(TMP_PREFIX):
                shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
            elif STALE_FILE.search(name) and os.path.isfile(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))


def verify(path: str) -> dict:
    """meta.json of the checkpoint at path, after checking that its file list names every file the format
    requires, and each file's size and SHA-256. A file the system cannot read is CheckpointUnreadable."""
    meta_path = os.path.join(path, "meta.json")
    try:
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except (FileNotFoundError, NotADirectoryError):  # a folder without one, or a plain file named step-*
        raise CheckpointError(f"{meta_path}: missing, so this is no complete checkpoint") from None
    except OSError as e:
        raise _read_failure(meta_path, e) from None
    except ValueError as e:  # JSON syntax and undecodable bytes (UnicodeDecodeError) alike
        raise CheckpointError(f"{meta_path}: not JSON ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format_version") not in READABLE_VERSIONS:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(
            f"{meta_path}: format version {version}, expected one of {', '.join(map(str, READABLE_VERSIONS))}"
        )
    files = meta.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(e, dict) and {"bytes", "sha256"} <= e.keys() for e in files.values()
    ):
        raise CheckpointError(f"{meta_path}: no valid file list")
    required = SHARDED_REQUIRED_FILES if is_sharded(meta) else REQUIRED_FILES
    missing = [name for name in required if name not in files]
    if missing:
        raise CheckpointError(f"{meta_path}: its file list does not name {', '.join(missing)}")
    for name in files:
        if os.path.basename(name) != name or name in ("", ".", ".."):  # a list must not point out of the folder
            raise CheckpointError(f"{meta_path}: {name!r} in its file list is not a file of the checkpoint")
    for name, expected in files.items():
        file_path = os.path.join(path, name)
        try:
            status = os.stat(file_path)
            if stat.S_ISREG(status.st_mode) and status.st_size == expected["bytes"]:
                digest = _sha256(file_path)
        except FileNotFoundError:
            raise CheckpointError(f"{file_path}: missing") from None
        except OSError as e:
            raise _read_failure(file_path, e) from None
        if not stat.S_ISREG(status.st_mode):
            raise CheckpointError(f"{file_path}: not a plain file")
        if status.st_size != expected["bytes"]:
            raise CheckpointError(f"{file_path}: {status.st_size} bytes, expected {expected['bytes']}")
        if digest != expected["sha256"]:
            raise CheckpointError(f"{file_path}: checksum mismatch, the file was altered")
    if meta["format_version"] == 1:
        meta["multipliers"] = meta.pop("lr_multipliers", None)
    return meta


def scan(out_dir: str) -> tuple[tuple[str, dict] | None, list[tuple[str, CheckpointError]]]:
    """(path, meta) of the newest checkpoint that verifies (None if none does), and each newer one that
    did not, with why."""
    rejected = []
    for step in complete_steps(out_dir):
        path = step_dir(out_dir, step)
        try:
            return (path, verify(path)), rejected
        except CheckpointError as e:
            rejected.append((path, e))
    return None, rejected


def skipped_line(path: str, error: CheckpointError) -> str:
    return f"skipping {error.kind} checkpoint {path}: {error}"


def none_verifies(out_dir: str, rejected: list[tuple[str, CheckpointError]]) -> CheckpointError:
    """The refusal of an out_dir whose checkpoints all fail verification: each named with why. Starting
    over there would replace them and drop their run's log; a disk error may be what failed."""
    listed = "; ".join(f"{os.path.basename(path)}: {error}" for path, error in rejected)
    return CheckpointError(
        f"{out_dir} holds {len(rejected)} checkpoint{'s' * (len(rejected) > 1)}, and none verifies ({listed}). "
        "Nothing was changed. If the disk or its permissions failed, fix that and run the same command again; "
        f"to start over, move the step-* folders out of {out_dir}, or give another out_dir"
    )


def latest(out_dir: str, report=print) -> tuple[str, dict] | None:
    """(path, meta) of the newest checkpoint that verifies; the ones that fail are reported and skipped."""
    found, rejected = scan(out_dir)
    for path, error in rejected:
        report(skipped_line(path, error))
    return found


def is_sharded(meta: dict) -> bool:
    return meta.get("format_version") == SHARDED_VERSION and meta.get("layout") == "sharded"


def load_tensors(path: str, name: str) -> dict:
    """<name>.pt's tensors (a sharded checkpoint's `name`, gathered from its shards: read_sharded).
    weights_only refuses anything but plain tensors and containers: a file whose checksums match but which
    carries other objects (written by other code, or poisoned) is a CheckpointError in one line, its payload
    never run."""
    with open(os.path.join(path, "meta.json"), "rb") as f:
        if is_sharded(json.loads(f.read().decode("utf-8"))):
            return read_sharded(path, name)
    return load_weights_only(os.path.join(path, f"{name}.pt"))


def load_weights_only(file_path: str):
    try:
        return torch.load(file_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise refused_pickle(file_path, e) from None


def refused_pickle(file_path: str, error: pickle.UnpicklingError) -> CheckpointError:
    lines = [line for line in str(error).splitlines() if line.strip()]  # torch's reason is its second paragraph
    reason = lines[1] if len(lines) > 1 else lines[0] if lines else type(error).__name__
    return CheckpointError(f"{file_path}: holds more than tensors, so it is not loaded ({reason})")


# What DCP's index pickles: its metadata classes, torch's sizes, dtypes and layouts, and the path it was
# written to. Anything else in a .metadata file is refused before it is built.
INDEX_MODULE = "torch.distributed.checkpoint.metadata"
INDEX_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
}


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in INDEX_GLOBALS or dtype:
            return super().find_class(module, name)
        if module == INDEX_MODULE and "." not in name:  # a class defined there, nothing it imports
            value = super().find_class(module, name)
            if isinstance(value, type) and value.__module__ == INDEX_MODULE:
                return value
        raise pickle.UnpicklingError(f"{module}.{name} is no part of a checkpoint's index")


class SafeReader(dcp.FileSystemReader):
    """DCP's reader, its index read through _IndexUnpickler instead of pickle.load."""

    def read_metadata(self, *args, **kwargs):
        path = os.path.join(self.path, ".metadata")
        with open(path, "rb") as f:
            try:
                metadata = _IndexUnpickler(f).load()
            except pickle.UnpicklingError as e:
                raise refused_pickle(path, e) from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_sharded(path: str, name: str) -> dict:
    """The full tensors of a sharded checkpoint's (training/sharded.py) `name` ("model": its state dict, tied
    names included; "optimizer": its state dict), on the CPU, read by this process alone. Nothing is unpickled:
    DCP loads each tensor with weights_only, rest.pt loads so too, and its index goes through _IndexUnpickler."""
    reader = SafeReader(path)
    index = reader.read_metadata().state_dict_metadata
    pickled = [key for key, entry in index.items() if isinstance(entry, BytesStorageMetadata)]
    if pickled:  # this project's saves write tensors alone; DCP would unpickle these
        raise CheckpointError(f"{path}: holds more than tensors ({', '.join(pickled[:3])}), so it is not loaded")
    prefix = f"{name}/"
    targets = {
        key: torch.empty(entry.size, dtype=entry.properties.dtype)
        for key, entry in index.items()
        if key.startswith(prefix)
    }
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.load(targets, storage_reader=reader, no_dist=True)
    rest = load_weights_only(os.path.join(path, "rest.pt"))
    if name == "model":
        state = {key[len(prefix) :]: t for key, t in targets.items()}
        state.update({alias: state[original] for alias, original in rest["tied"].items()})
        return state

    def restore(item):
        if isinstance(item, str) and item.startswith(TENSOR):
            return targets[item[len(TENSOR) :]]
        if isinstance(item, dict):
            return {k: restore(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return type(item)(restore(v) for v in item)
        return item

    return restore(rest["optimizer"])


def load_optimizer_state(path: str, meta: dict) -> dict:
    """optimizer.pt's state dict, as format 2 holds it: a format 1 checkpoint's param groups name each
    group's multiplier lr_scale (an optimizer of parts, Muon's, holds one state dict per part)."""
    state = load_tensors(path, "optimizer")
    if meta["format_version"] == 1:
        for part in state.values() if "param_groups" not in state else [state]:
            for group in part["param_groups"] if part else []:
                group["multiplier"] = group.pop("lr_scale", 1.0)
    return state


def restore_weights(model: torch.nn.Module, path: str) -> None:
    """The checkpoint's weights into model, after checking that every tensor fits: a tensor of another shape
    (the dataset's vocabulary changed, so vocab_size did) is a CheckpointError naming it."""
    saved = load_tensors(path, "model")
    own = model.state_dict()
    wrong = [
        f"{name} {list(saved[name].shape)} there, {list(own[name].shape)} in this run's model"
        for name in own
        if name in saved and saved[name].shape != own[name].shape
    ]
    if wrong:
        raise CheckpointError(
            f"{path}: the model does not fit this run's: {'; '.join(wrong[:3])}. Did the dataset's vocabulary "
            "(vocab_size) or the model change? Resume with what the run started with, or give another out_dir"
        )
    model.load_state_dict(saved)


def export_safetensors(model: torch.nn.Module, path: str) -> None:
    """The model's weights as safetensors, whole or not at all; save_model stores the tied wte / lm_head
    once and load_model restores the tie. Non-finite weights are refused: nothing is written."""
    refuse_non_finite(model.state_dict(), path)
    refuse_planted(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    os.close(open_new(tmp))  # the run's own file, never a link planted at that name, which save_model then fills
    try:
        save_model(model, tmp)
        os.chmod(tmp, file_mode())  # safetensors creates it 0600; the run's other files are 0644
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        full = (
            disk_full(e, os.path.dirname(path) or ".", needed=tensor_bytes(model.state_dict()))
            if isinstance(e, Exception)
            else None
        )
        if full is None:
            raise
        raise full from None


def refuse_non_finite(state_dict: dict, destination: str) -> None:
    bad = non_finite(state_dict)
    if bad:
        raise CheckpointError(
            f"not writing {destination}: the weights hold NaN or infinite values ({', '.join(bad[:3])}"
            f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}), a diverged model"
        )


def find(out_dir: str | None = None, path: str | None = None) -> tuple[str, dict]:
    """(path, meta) of the checkpoint at path, verified, or of the newest complete one in out_dir; the
    ones skipped are reported on stderr (sample.py and export.py print their results on stdout)."""
    if path:
        return path, verify(path)
    found, rejected = scan(out_dir)
    if found is None and rejected:
        raise none_verifies(out_dir, rejected)
    if found is None:
        raise CheckpointError(f"{out_dir} holds no complete checkpoint; train first")
    for skipped, error in rejected:
        print(skipped_line(skipped, error), file=sys.stderr)
    return found


def load_model(path: str, meta: dict):
    """The GPT a checkpoint holds: built from the training config saved with it, weights loaded."""
    tensors = load_tensors(path, "model")
    # The vocabulary from the weights themselves: the data folder may have moved since.
    model = GPT(gpt_config(TrainConfig(**meta["config"]), vocab_size_of(tensors)))
    model.load_state_dict(tensors)
    return model
