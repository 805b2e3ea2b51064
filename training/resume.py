"""Whether a checkpoint may continue under this config, decided before the run touches out_dir, and
the run's record of each resume.

A resume continues one optimization. config.MAY_CHANGE_ON_RESUME names the keys that only say
how a run executes; every other key, and the data (each split's fingerprint, data/tokenfile.py), must
be what the checkpoint recorded, unless allow_resume_changes names it (`data` for the token files).
A refusal names every differing key with both values; an allowed change is said, and config.json
keeps it in the run's history.
"""

import datetime
import json
import os

from data.tokenfile import fingerprint
from runtime.files import write_atomically, write_json
from training.build import data_dir
from training.config import FIELDS, MAY_CHANGE_ON_RESUME, ConfigError, TrainConfig

SPLITS = ("train", "val")


class ResumeRefused(ConfigError):
    """A resume whose config or data differs from its checkpoint's in what defines the run."""


def data_fingerprints(c: TrainConfig) -> dict[str, str | None]:
    """Each split's fingerprint, from its token file's header (None for a file written before they existed)."""
    return {split: fingerprint(os.path.join(data_dir(c), f"{split}.bin")) for split in SPLITS}


def changes(c: TrainConfig, meta: dict, fingerprints: dict, computes_in: str | None = None) -> dict[str, tuple]:
    """{key: (checkpoint's value, this config's)}, as each acts, for every key that differs, and `data` when a split's
    fingerprint does. A key the checkpoint predates counts at its default, which kept the old behaviour.
    computes_in: the precision this run computes in (dtype resolved on this machine), compared with the one
    the checkpoint's run computed in, whatever either typed (dtype=auto may resolve otherwise elsewhere)."""
    saved = {key: meta["config"].get(key, field.default) for key, field in FIELDS.items()}
    now = c.as_dict()
    differ = {key: (acting(saved, key), acting(now, key)) for key in FIELDS if acting(saved, key) != acting(now, key)}
    # Checkpoints before the precision was recorded: an explicit dtype is its precision; auto's is unknown,
    # and the keys as typed are compared instead.
    then = meta.get("precision") or (saved["dtype"] if saved["dtype"] != "auto" else None)
    if computes_in is not None and then is not None:
        differ.pop("dtype", None)
        if then != computes_in:
            differ["dtype"] = (then, computes_in)
    recorded = meta.get("data_fingerprints") or {}
    if any(recorded.get(split) and fingerprints[split] and recorded[split] != fingerprints[split] for split in SPLITS):
        differ["data"] = (recorded, fingerprints)
    return differ


def acting(config: dict, key: str):
    """A key's value as it acts: lr_decay_steps=0 means max_steps (a run stopped early and resumed
    without it is the same run), and a constant schedule has no decay to end."""
    if key == "lr_decay_steps":
        return (config[key] or config["max_steps"]) if config["schedule"] == "cosine" else None
    return config[key]


def check(
    c: TrainConfig, meta: dict, path: str, fingerprints: dict, say=print, computes_in: str | None = None
) -> dict[str, tuple]:
    """The changes this resume makes (for config.json's history), after refusing any that the config
    does not allow; says each allowed one."""
    found = changes(c, meta, fingerprints, computes_in)
    allowed = set(c.resume_changes_allowed())
    refused = [key for key in found if key not in MAY_CHANGE_ON_RESUME and key not in allowed]
    if refused:
        listed = "; ".join(describe(key, *found[key]) for key in refused)
        raise ResumeRefused(
            f"cannot resume from {path}: {listed}. A resume continues the checkpoint's run: give its values, "
            f"or another out_dir, or --allow_resume_changes={','.join(refused)} to change them on purpose"
        )
    for key, (old, new) in found.items():
        why = MAY_CHANGE_ON_RESUME.get(key, "allowed by allow_resume_changes")
        say(f"resume: {describe(key, old, new)} ({why})")
    recorded = meta.get("data_fingerprints") or {}
    unchecked = [split for split in SPLITS if not recorded.get(split) or fingerprints[split] is None]
    if unchecked:
        say(
            f"resume: the {' and '.join(unchecked)} data cannot be compared with the checkpoint's: its token file or "
            "the checkpoint predates fingerprints (run the dataset's prepare again to record one)"
        )
    return found


def describe(key: str, old, new) -> str:
    if key == "data":
        splits = [split for split in SPLITS if old.get(split) != new.get(split)]
        return "; ".join(
            f"{split}.bin is fingerprint {new[split]}, the checkpoint's was {old[split]}" for split in splits
        )
    if key == "dtype":
        return f"the checkpoint's run computed in {old}, this one would in {new} (dtype, as resolved on each machine)"
    if key == "lr_decay_steps":
        ends = [f"at step {end}" if end is not None else "nowhere (schedule=constant)" for end in (old, new)]
        return f"the cosine ends {ends[0]} in the checkpoint, {ends[1]} now (lr_decay_steps, or max_steps if 0)"
    return f"{key}={old!r} in the checkpoint, {key}={new!r} now"


def timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def record_config(out_dir: str, c: TrainConfig, step: int, found: dict[str, tuple] | None) -> None:
    """config.json: the config the run now runs with, and its history: the start, then each resume with
    what it changed. A resume drops the entries past its checkpoint (a resume that was itself killed
    before its first save changed nothing that lasted)."""
    path = os.path.join(out_dir, "config.json")
    if step == 0:
        history = [{"step": 0, "time": timestamp(), "event": "start"}]
    else:
        try:
            with open(path) as f:
                history = [entry for entry in json.load(f)["history"] if entry["step"] < step]
        except (OSError, ValueError, KeyError, TypeError):  # absent, or written by an older version: begin anew
            history = []
        changed = {key: [old, new] for key, (old, new) in (found or {}).items()}
        history.append({"step": step, "time": timestamp(), "event": "resume", "changes": changed})
    write_json(path, {"config": c.as_dict(), "history": history})


LOGS = ("log.jsonl", "layers.jsonl")  # the run's records by step, each trimmed on a resume


def trim_logs(out_dir: str, step: int) -> None:
    for name in LOGS:
        trim_log(os.path.join(out_dir, name), step)


def trim_log(path: str, step: int) -> None:
    """A log (log.jsonl, layers.jsonl) as of the checkpoint at `step`: records past it (the steps a resume
    runs again), an earlier start at it, and a line cut off by a kill are dropped, so each (kind, step)
    appears once."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        at = record.get("step", -1)
        if line.endswith("\n") and (at < step or (at == step and record.get("kind") != "start")):
            kept.append(line)
    if kept != lines:
        write_atomically(path, lambda f: f.writelines(kept))
