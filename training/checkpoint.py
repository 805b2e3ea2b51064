"""Checkpoints as out_dir/step-XXXXXXXX/ folders, written so that a crash never costs the last good one.

A save writes every file into a hidden temporary folder, fsyncs them, writes meta.json last (format
version, step, config, and each file's size and SHA-256), fsyncs, then renames the folder into place:
a folder named step-* is complete by construction. Older checkpoints are removed only after that, down
to the newest `keep_last`. Loading walks from the newest folder down, verifies sizes and checksums, and
skips (and reports) any that fail. Tensors are read with torch.load(weights_only=True), never pickle.

Format 2 calls the layer-wise learning-rate multiplier what the code calls it: `multipliers` in
meta.json, `multiplier` in the optimizer's param groups. Format 1 (checkpoints written before) called
them lr_multipliers and lr_scale, and is read as format 2 (verify, load_optimizer_state).
"""

import hashlib
import json
import os
import pickle
import re
import shutil
import sys

import torch
from safetensors.torch import save_model

from model import GPT, vocab_size_of
from runtime.errors import UserError
from runtime.files import DiskFullError, disk_full, file_mode
from training.build import gpt_config
from training.config import TrainConfig

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
STEP_DIR = re.compile(r"^step-(\d{8})$")
TMP_PREFIX = ".tmp-step-"


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, or does not fit the run's config."""


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


def _write_file(path: str, write) -> dict:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
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


def save(out_dir: str, step: int, tensors: dict[str, dict], meta: dict, keep_last: int) -> str:
    """tensors: {"model": state_dict, "optimizer": state_dict, ...}, each saved as <name>.pt; meta: JSON.
    A save that fails for lack of space raises runtime.files.DiskFullError, its partial folder removed."""
    if keep_last < 2:
        raise ValueError(f"keep_last={keep_last}: keep at least 2 so one survives a failed save")
    final = step_dir(out_dir, step)
    tmp = os.path.join(out_dir, f"{TMP_PREFIX}{step:08d}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        files = {
            f"{name}.pt": _write_file(os.path.join(tmp, f"{name}.pt"), lambda f, obj=obj: torch.save(obj, f))
            for name, obj in tensors.items()
        }
        meta = {"format_version": FORMAT_VERSION, "step": step, **meta, "files": files}
        _write_file(os.path.join(tmp, "meta.json"), lambda f: f.write(json.dumps(meta, indent=2).encode()))
        _fsync_dir(tmp)
        # A re-save of the same step (after a resume), or a damaged entry that was skipped: replace it.
        _remove(final)
        os.rename(tmp, final)
        _fsync_dir(out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full(e, out_dir, needed=tensor_bytes(tensors)) if isinstance(e, Exception) else None
        if full is None:
            raise
        kept = complete_steps(out_dir)
        last = (
            f"the last complete checkpoint, {step_dir(out_dir, kept[0])}, is intact"
            if kept
            else "no earlier checkpoint exists"
        )
        raise DiskFullError(f"saving step {step}: {full} Nothing of this save is left; {last}.") from None
    for old in complete_steps(out_dir)[keep_last:]:
        try:
            _remove(step_dir(out_dir, old))
        except OSError:  # retention is housekeeping: the new checkpoint is already in place
            pass
    return final


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
    """meta.json of the checkpoint at path, after checking each file's size and SHA-256."""
    meta_path = os.path.join(path, "meta.json")
    try:
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as e:  # ValueError: JSON syntax and undecodable bytes (UnicodeDecodeError) alike
        raise CheckpointError(f"{meta_path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format_version") not in READABLE_VERSIONS:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{meta_path}: format version {version}, expected {FORMAT_VERSION}")
    files = meta.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(e, dict) and {"bytes", "sha256"} <= e.keys() for e in files.values()
    ):
        raise CheckpointError(f"{meta_path}: no valid file list")
    for name, expected in files.items():
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path):
            raise CheckpointError(f"{file_path}: missing")
        if os.path.getsize(file_path) != expected["bytes"]:
            raise CheckpointError(f"{file_path}: {os.path.getsize(file_path)} bytes, expected {expected['bytes']}")
        try:
            digest = _sha256(file_path)
        except OSError as e:
            raise CheckpointError(f"{file_path}: unreadable ({e})") from None
        if digest != expected["sha256"]:
            raise CheckpointError(f"{file_path}: checksum mismatch, the file was altered")
    if meta["format_version"] == 1:
        meta["multipliers"] = meta.pop("lr_multipliers", None)
    return meta


def latest(out_dir: str, report=print) -> tuple[str, dict] | None:
    """(path, meta) of the newest checkpoint that verifies; corrupt ones are reported and skipped."""
    for step in complete_steps(out_dir):
        path = step_dir(out_dir, step)
        try:
            return path, verify(path)
        except CheckpointError as e:
            report(f"skipping corrupt checkpoint {path}: {e}")
    return None


def load_tensors(path: str, name: str) -> dict:
    """<name>.pt's tensors. weights_only refuses anything but plain tensors and containers: a file whose
    checksums match but which carries other objects (written by other code, or poisoned) is a
    CheckpointError in one line, its payload never run."""
    file_path = os.path.join(path, f"{name}.pt")
    try:
        return torch.load(file_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line for line in str(e).splitlines() if line.strip()]  # torch's reason is its second paragraph
        reason = lines[1] if len(lines) > 1 else lines[0] if lines else type(e).__name__
        raise CheckpointError(f"{file_path}: holds more than tensors, so it is not loaded ({reason})") from None


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
    once and load_model restores the tie."""
    tmp = f"{path}.tmp-{os.getpid()}"
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


def find(out_dir: str | None = None, path: str | None = None) -> tuple[str, dict]:
    """(path, meta) of the checkpoint at path, verified, or of the newest complete one in out_dir; skipped
    corrupt ones are reported on stderr (sample.py and export.py print their results on stdout)."""
    if path:
        return path, verify(path)
    found = latest(out_dir, report=lambda message: print(message, file=sys.stderr))
    if found is None:
        raise CheckpointError(f"{out_dir} holds no complete checkpoint; train first")
    return found


def load_model(path: str, meta: dict):
    """The GPT a checkpoint holds: built from the training config saved with it, weights loaded."""
    tensors = load_tensors(path, "model")
    # The vocabulary from the weights themselves: the data folder may have moved since.
    model = GPT(gpt_config(TrainConfig(**meta["config"]), vocab_size_of(tensors)))
    model.load_state_dict(tensors)
    return model
