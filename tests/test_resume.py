"""What a resume may change (training.config.MAY_CHANGE_ON_RESUME, training/resume.py): every key that defines the
run is refused with both values unless allow_resume_changes names it, the data is compared by
fingerprint, and config.json and log.jsonl keep an honest record. Every run is gpt2-tiny on CPU."""

import json
import shutil

import numpy as np
import pytest

import train
from conftest import read_log, tiny_run_args, tree_digest
from data.tokenfile import fingerprint, write_tokens
from training import checkpoint, resume
from training.config import FIELDS, MAY_CHANGE_ON_RESUME, ConfigError, TrainConfig

# A value other than tiny_run_args' (or the default) that still makes a valid config for gpt2-tiny.
OTHER_VALUE = {"model": "gpt2-mini", "block_size": 16, "tokens_per_step": 512, "lr_decay_steps": 1, "dtype": "bfloat16"}


def other_value(key: str, value):
    if key in OTHER_VALUE:
        return OTHER_VALUE[key]
    choices = FIELDS[key].metadata.get("choices")
    if choices:
        return next(choice for choice in choices if choice != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    return 0.1 if value == 0 else value / 2


@pytest.fixture
def finished_run(tmp_path, token_dir):
    out = tmp_path / "run"
    assert train.main(tiny_run_args(out, token_dir, max_steps=3)) == 0
    return out


def test_every_key_that_defines_the_run_is_refused_on_resume_naming_both_values(finished_run, token_dir):
    out = finished_run
    base = tiny_run_args(out, token_dir, max_steps=3)
    started = json.loads((out / "config.json").read_text())["config"]
    before = tree_digest(out)
    defining = [key for key in FIELDS if key not in MAY_CHANGE_ON_RESUME]
    assert {"lr", "seed", "max_steps", "dtype", "beta2", "schedule", "grad_clip", "dropout"} <= set(defining)
    unrefused = []
    for key in defining:
        old, new = started[key], other_value(key, started[key])
        try:
            train.main([*base, f"--{key}={new}"])
            unrefused.append(key)
        except resume.ResumeRefused as e:
            named = (
                "the cosine ends at step 3 in the checkpoint, at step 1 now"
                if key == "lr_decay_steps"
                else "the checkpoint's run computed in float32, this one would in bfloat16"
                if key == "dtype"
                else f"{key}={old!r} in the checkpoint, {key}={new!r} now"
            )
            assert named in str(e) and f"--allow_resume_changes={key}" in str(e), str(e)
    assert not unrefused
    assert tree_digest(out) == before  # a refused run leaves out_dir byte for byte (no .lock either)


def test_allowed_and_run_only_changes_proceed_are_said_and_kept_in_config_json(tmp_path, token_dir, capsys):
    out = tmp_path / "run"
    assert train.main(tiny_run_args(out, token_dir, max_steps=2, lr_decay_steps=4)) == 0
    changed = dict(max_steps=4, lr=2e-3, log_interval=2, allow_resume_changes="max_steps, lr")
    assert train.main(tiny_run_args(out, token_dir, lr_decay_steps=4, **changed)) == 0
    said = capsys.readouterr().out
    assert "resume: lr=0.001 in the checkpoint, lr=0.002 now (allowed by allow_resume_changes)" in said
    assert "resume: log_interval=1 in the checkpoint, log_interval=2 now (when to report)" in said
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["lr"] == 2e-3
    assert [(e["step"], e["event"]) for e in record["history"]] == [(0, "start"), (2, "resume")]
    assert record["history"][1]["changes"]["lr"] == [1e-3, 2e-3]
    assert record["history"][1]["changes"]["log_interval"] == [1, 2]
    assert read_log(out, "train")[-1]["lr"] > 1e-3  # the new peak rate took effect (warmup over, cosine at 4)


def test_unknown_keys_in_allow_resume_changes_are_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match="allow_resume_changes: unknown key 'max_step'; did you mean max_steps"):
        TrainConfig(allow_resume_changes="max_step")


def test_a_resume_on_other_data_is_refused_naming_both_fingerprints(tmp_path, token_dir):
    out = tmp_path / "run"
    assert train.main(tiny_run_args(out, token_dir, max_steps=2, lr_decay_steps=4)) == 0
    recorded = checkpoint.latest(str(out))[1]["data_fingerprints"]
    assert recorded["train"] == fingerprint(str(token_dir / "train.bin"))
    rng = np.random.default_rng(1)  # the same size and vocabulary, other tokens
    write_tokens(str(token_dir / "train.bin"), rng.integers(0, 50257, 20_000), 50257)
    rewritten = fingerprint(str(token_dir / "train.bin"))
    assert rewritten != recorded["train"]
    before = tree_digest(out)
    allow = dict(allow_resume_changes="max_steps", lr_decay_steps=4)
    with pytest.raises(resume.ResumeRefused) as refused:
        train.main(tiny_run_args(out, token_dir, max_steps=4, **allow))
    message = str(refused.value)
    assert f"train.bin is fingerprint {rewritten}, the checkpoint's was {recorded['train']}" in message
    assert "val.bin" not in message and "--allow_resume_changes=data" in message
    assert tree_digest(out) == before
    allow["allow_resume_changes"] += ",data"
    assert train.main(tiny_run_args(out, token_dir, max_steps=4, **allow)) == 0


def test_a_token_fingerprint_is_the_tokens_sha256_read_from_the_header(tmp_path):
    import hashlib

    tokens = np.arange(1000) % 65
    write_tokens(str(tmp_path / "a.bin"), tokens, 65)
    expected = hashlib.sha256(tokens.astype("<u2").tobytes()).hexdigest()[:32]
    assert fingerprint(str(tmp_path / "a.bin")) == expected


def test_the_log_holds_each_step_once_after_a_kill_and_resume(tmp_path, token_dir):
    """A kill -9 after step 5 of a run saved at step 3: the resume repeats steps 4 and 5; a cut-off line
    from the kill is dropped too."""
    out = tmp_path / "run"
    straight = tmp_path / "straight"
    assert train.main(tiny_run_args(straight, token_dir, max_steps=6, layer_stats_interval=1)) == 0
    assert train.main(tiny_run_args(out, token_dir, max_steps=6, layer_stats_interval=1)) == 0
    shutil.rmtree(checkpoint.step_dir(str(out), 6))  # back to a kill after step 5: checkpoint 3, logs up to 5
    for log, cut in (("log.jsonl", '{"kind": "train", "step": 6, "lo'), ("layers.jsonl", '{"step":6,"names":["tr')):
        lines = (out / log).read_text().splitlines(keepends=True)
        kept = [line for line in lines if json.loads(line)["step"] <= 5]
        (out / log).write_text("".join(kept) + cut)
    (out / "model.safetensors").unlink()
    assert train.main(tiny_run_args(out, token_dir, max_steps=6, layer_stats_interval=1)) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    keys = [(r["kind"], r["step"]) for r in records]
    assert len(keys) == len(set(keys)), keys
    assert [r["loss"] for r in read_log(out, "train")] == [r["loss"] for r in read_log(straight, "train")]
    assert [r["step"] for r in read_log(out, "start")] == [0, 3]
    layers, uninterrupted = ((run / "layers.jsonl").read_text().splitlines() for run in (out, straight))
    assert [json.loads(line)["step"] for line in layers] == [1, 2, 3, 4, 5, 6]  # each step once, in order
    assert layers == uninterrupted  # the repeated steps 4 and 5 recorded as the uninterrupted run did
