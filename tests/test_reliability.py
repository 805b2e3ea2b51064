"""Issue 4's guarantees, each by fault injection: a failing or killed save, corrupted files, NaN
losses, SIGTERM, mismatched resumes, bad input. Every run here is gpt2-tiny on CPU."""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from conftest import ROOT, read_log, root_on_path, tiny_run_args, torchrun, tree_digest
from model import GPT
from optimizers import sampled_labels
from runtime.signals import EXIT_PREEMPTED
from training import checkpoint, metrics, outdir
from training.config import ConfigError
from training.metrics import EXIT_DIVERGED


def final_state(out_dir, step):
    path = checkpoint.step_dir(str(out_dir), step)
    return checkpoint.load_tensors(path, "model"), checkpoint.load_tensors(path, "optimizer")


def assert_identical_states(a, b):
    (model_a, opt_a), (model_b, opt_b) = a, b
    for name in model_a:
        assert torch.equal(model_a[name], model_b[name]), name
    assert_identical_optimizer_states(opt_a, opt_b)


def assert_identical_optimizer_states(opt_a, opt_b):
    if "param_groups" not in opt_a:  # an optimizer of parts (muon.py): each part's state dict
        assert opt_a.keys() == opt_b.keys()
        for part in opt_a:
            assert_identical_optimizer_states(opt_a[part], opt_b[part])
        return
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for index, state in opt_a["state"].items():
        for key, value in state.items():
            other = opt_b["state"][index][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (index, key)


@pytest.mark.parametrize(
    "optimizer, lr_rule",
    [
        ("adamw", "lwlr"),
        ("lion", "single"),
        ("sophiag", "fan_in"),
        ("adamw_lw", "lwlr"),
        ("adamw_torch", "depth_decreasing"),
        ("muon", "lwlr"),
        ("adam_mini", "blockwise"),
        ("lion", "lwlr_matrices"),
    ],
)
def test_stop_and_resume_equals_a_straight_run(tmp_path, token_dir, optimizer, lr_rule):
    common = dict(
        optimizer=optimizer,
        lr_rule=lr_rule,
        lwlr_T=2,
        hess_interval=3,
        eval_interval=4,
        log_interval=1,
        lw_interval=3,
        lw_warmup_steps=2,
    )
    straight, resumed, older = tmp_path / "straight", tmp_path / "resumed", tmp_path / "format-1"
    assert train.main(tiny_run_args(straight, token_dir, max_steps=8, **common)) == 0
    assert train.main(tiny_run_args(resumed, token_dir, max_steps=4, lr_decay_steps=8, **common)) == 0
    if lr_rule != "single":
        os.remove(resumed / "lwlr.json")  # the resume must take the multipliers from the checkpoint
    if optimizer in FORMAT_1_CASES:  # the same checkpoint as the code before format 2 wrote it
        shutil.copytree(resumed, older)
        as_format_1(checkpoint.step_dir(str(older), 4))
    resume = dict(init_from="resume", allow_resume_changes="max_steps")
    assert train.main(tiny_run_args(resumed, token_dir, max_steps=8, **common, **resume)) == 0
    assert not (resumed / "lwlr.json").exists()
    straight_losses = [r["loss"] for r in read_log(straight, "train")]
    resumed_losses = [r["loss"] for r in read_log(resumed, "train")]
    assert resumed_losses == straight_losses  # exactly: no batch replayed or skipped
    assert_identical_states(final_state(straight, 8), final_state(resumed, 8))
    if optimizer in FORMAT_1_CASES:
        assert train.main(tiny_run_args(older, token_dir, max_steps=8, **common, **resume)) == 0
        assert [r["loss"] for r in read_log(older, "train")] == straight_losses
        assert_identical_states(final_state(straight, 8), final_state(older, 8))


# A flat optimizer state, one of two parts, and LW-AS's per-tensor scalars, each resumed from format 1.
FORMAT_1_CASES = ("adamw", "muon", "adamw_lw")


def as_format_1(path: str) -> None:
    """The checkpoint at path rewritten as checkpoints were before format 2, by hand: the multiplier called
    lr_scale in the optimizer's param groups and lr_multipliers in meta.json, each file's checksum to match."""
    optimizer = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True)
    for part in [optimizer] if "param_groups" in optimizer else [part for part in optimizer.values() if part]:
        for group in part["param_groups"]:
            group["lr_scale"] = group.pop("multiplier")
    torch.save(optimizer, os.path.join(path, "optimizer.pt"))
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    meta["format_version"] = 1
    meta["lr_multipliers"] = meta.pop("multipliers")
    with open(os.path.join(path, "optimizer.pt"), "rb") as f:
        data = f.read()
    meta["files"]["optimizer.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)


# adamw_lw: its curvature terms are all-reduced besides the gradients (plain DDP's resume is also
# tests/test_operations.py's, on another number of processes)
@pytest.mark.parametrize("optimizer", ["adamw_lw"])
def test_stop_and_resume_equals_a_straight_run_under_ddp(tmp_path, token_dir, optimizer):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for out, steps in ((straight, 6), (resumed, 3), (resumed, 6)):
        result = torchrun(
            2,
            tiny_run_args(
                out,
                token_dir,
                max_steps=steps,
                lr_decay_steps=6,
                allow_resume_changes="max_steps",
                eval_interval=3,
                optimizer=optimizer,
                lw_interval=2,
                lw_warmup_steps=2,
            ),
        )
        assert result.returncode == 0, result.stderr[-3000:]
    assert [r["loss"] for r in read_log(straight, "train")] == [r["loss"] for r in read_log(resumed, "train")]
    assert_identical_states(final_state(straight, 6), final_state(resumed, 6))


def test_a_save_that_fails_leaves_the_previous_checkpoint(tmp_path, token_dir, monkeypatch):
    out = tmp_path / "run"
    assert train.main(tiny_run_args(out, token_dir, max_steps=3, eval_interval=3)) == 0
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if "state" in obj:  # the optimizer file: the model file was already written
            raise OSError("disk full")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train.main(
            tiny_run_args(out, token_dir, max_steps=6, eval_interval=3, allow_resume_changes="max_steps,lr_decay_steps")
        )
    assert checkpoint.complete_steps(str(out)) == [3]
    assert checkpoint.verify(checkpoint.step_dir(str(out), 3))["step"] == 3
    assert not [name for name in os.listdir(out) if name.startswith(".tmp")]


KILL_DURING_SAVE = """
import os, signal, torch
from training import checkpoint
def save_then_die(obj, f, *a, **k):
    f.write(b"partial bytes")
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_then_die
checkpoint.save({out!r}, 6, {{"model": {{"w": torch.zeros(3)}}}}, {{}}, keep_last=2)
"""


def test_a_save_killed_midway_is_never_picked_up(tmp_path, token_dir):
    out = tmp_path / "run"
    assert train.main(tiny_run_args(out, token_dir, max_steps=3, lr_decay_steps=6, eval_interval=3)) == 0
    child = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SAVE.format(out=str(out))],
        capture_output=True,
        env=root_on_path(),
    )
    assert child.returncode == -signal.SIGKILL
    assert any(name.startswith(".tmp-step-00000006") for name in os.listdir(out))  # the partial folder is there
    path, meta = checkpoint.latest(str(out))
    assert meta["step"] == 3
    resumed = tiny_run_args(
        out, token_dir, max_steps=4, lr_decay_steps=6, eval_interval=3, allow_resume_changes="max_steps"
    )
    assert train.main(resumed) == 0
    assert not any(name.startswith(".tmp") for name in os.listdir(out))  # cleaned on the next start


def test_retention_keeps_the_last_k_complete_checkpoints(tmp_path, token_dir):
    out = tmp_path / "run"
    assert train.main(tiny_run_args(out, token_dir, max_steps=8, eval_interval=2, keep_last=3)) == 0
    assert checkpoint.complete_steps(str(out)) == [8, 6, 4]
    with pytest.raises(ValueError, match="keep_last=1"):
        checkpoint.save(str(out), 10, {"model": {}}, {}, keep_last=1)


@pytest.mark.parametrize("damage", ["truncate", "flip", "meta"])
def test_a_corrupt_checkpoint_is_reported_and_the_previous_one_used(tmp_path, token_dir, damage):
    out = tmp_path / "run"
    assert train.main(tiny_run_args(out, token_dir, max_steps=6, eval_interval=3)) == 0
    newest = checkpoint.step_dir(str(out), 6)
    target = os.path.join(newest, "meta.json" if damage == "meta" else "model.pt")
    data = bytearray(open(target, "rb").read())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[:-5]
    open(target, "wb").write(bytes(data))
    path, meta = checkpoint.latest(str(out), report=lambda message: None)
    assert meta["step"] == 3 and path == checkpoint.step_dir(str(out), 3)
    messages = []
    checkpoint.latest(str(out), report=messages.append)
    assert len(messages) == 1 and "step-00000006" in messages[0]


def test_init_from_scratch_on_an_out_dir_with_a_checkpoint_is_refused_and_changes_nothing(tmp_path, token_dir):
    out = tmp_path / "run"
    assert train.main(tiny_run_args(out, token_dir, max_steps=3, eval_interval=3)) == 0
    before = tree_digest(out)
    with pytest.raises(ConfigError, match="already holds .*step-00000003"):
        train.main(tiny_run_args(out, token_dir, max_steps=6, init_from="scratch"))
    assert tree_digest(out) == before


def test_explicit_resume_without_a_checkpoint_exits_nonzero(tmp_path, token_dir):
    result = subprocess.run(
        [sys.executable, "train.py", *tiny_run_args(tmp_path / "empty", token_dir, init_from="resume")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "holds no complete checkpoint" in result.stderr
    assert not (tmp_path / "empty").exists()  # a refused run leaves no folder, and no .lock in one


def nan_on_steps(monkeypatch, bad_calls):
    """Make the training loss NaN on the given forward calls (counting training forwards only)."""
    real_forward = GPT.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None):
        logits, loss = real_forward(self, idx, targets)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] in bad_calls:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)


def test_a_nan_step_is_skipped_and_logged(tmp_path, token_dir, monkeypatch):
    nan_on_steps(monkeypatch, {5})  # 2 micro-steps per step: step 3's first
    out = tmp_path / "run"
    assert train.main(tiny_run_args(out, token_dir, max_steps=6, eval_interval=6, lr_rule="single")) == 0
    records = read_log(out, "train")
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 0, 0, 0]
    model, _ = final_state(out, 6)
    assert all(torch.isfinite(t).all() for t in model.values())


def test_consecutive_nan_steps_stop_the_run_without_a_checkpoint(tmp_path, token_dir, monkeypatch):
    nan_on_steps(monkeypatch, set(range(5, 100)))
    out = tmp_path / "run"
    with pytest.raises(metrics.DivergedError, match="3 consecutive steps .*\\(max_bad_steps=3\\)"):
        train.main(tiny_run_args(out, token_dir, max_steps=20, eval_interval=2, max_bad_steps=3, lr_rule="single"))
    assert checkpoint.complete_steps(str(out)) == [2]  # the last good one; none after the NaNs began
    model, _ = final_state(out, 2)
    assert all(torch.isfinite(t).all() for t in model.values())


def test_sigterm_saves_exits_75_and_the_run_resumes_exactly(tmp_path, token_dir):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    args = dict(max_steps=40, eval_interval=40)
    assert train.main(tiny_run_args(straight, token_dir, **args)) == 0
    child = subprocess.Popen(
        [sys.executable, "train.py", *tiny_run_args(stopped, token_dir, **args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in child.stdout:  # wait until training is under way
        if line.startswith("step      3/"):
            break
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == EXIT_PREEMPTED, stderr
    saved = checkpoint.complete_steps(str(stopped))
    assert len(saved) == 1 and 3 <= saved[0] < 40
    assert train.main(tiny_run_args(stopped, token_dir, **args)) == 0
    assert [r["loss"] for r in read_log(stopped, "train")] == [r["loss"] for r in read_log(straight, "train")]
    assert_identical_states(final_state(straight, 40), final_state(stopped, 40))


def test_unwritable_out_dir_and_missing_val_split_fail_fast(tmp_path, token_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(outdir.OutDirNotWritableError, match="out_dir=.*a_file/run.* is not writable"):
        train.main(tiny_run_args(blocker / "run", token_dir))
    os.remove(token_dir / "val.bin")
    from data.tokenfile import TokenFileError

    with pytest.raises(TokenFileError, match="val.bin: no such token file"):
        train.main(tiny_run_args(tmp_path / "run", token_dir))


def test_safetensors_export_keeps_the_tied_weights(tmp_path):
    from safetensors.torch import load_model

    from model import GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2-tiny"))
    checkpoint.export_safetensors(model, str(tmp_path / "model.safetensors"))
    restored = GPT(GPTConfig.from_preset("gpt2-tiny"))
    load_model(restored, str(tmp_path / "model.safetensors"))
    assert restored.lm_head.weight is restored.transformer.wte.weight
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), name


def run_train(args, timeout=300):
    """train.py as a user runs it: a subprocess, its exit code and output."""
    return subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(result, *fragments, code=2):
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in error[0], error[0]


@pytest.mark.parametrize("damage", ["binary meta.json", "file in place of the folder"])
def test_a_damaged_newest_checkpoint_is_named_skipped_and_moved_aside_never_deleted(tmp_path, token_dir, damage):
    straight, damaged = tmp_path / "straight", tmp_path / "damaged"
    assert train.main(tiny_run_args(straight, token_dir, max_steps=6)) == 0
    newest = checkpoint.step_dir(str(damaged), 6)
    if damage == "binary meta.json":  # a finished run whose newest meta.json became garbage
        assert train.main(tiny_run_args(damaged, token_dir, max_steps=6)) == 0
        with open(os.path.join(newest, "meta.json"), "wb") as f:
            f.write(bytes([0xFF, 0xFE, 0x00, 0x81]) * 64)
    else:  # a run stopped at step 3, and a plain file where the step-6 folder will be saved
        assert train.main(tiny_run_args(damaged, token_dir, max_steps=3, lr_decay_steps=6)) == 0
        with open(newest, "wb") as f:
            f.write(b"not a checkpoint")
    kept = tree_digest(newest) if os.path.isdir(newest) else open(newest, "rb").read()
    restart = run_train(tiny_run_args(damaged, token_dir, max_steps=6, allow_resume_changes="max_steps"))
    assert restart.returncode == 0, restart.stderr[-3000:]
    assert restart.stdout.count(f"skipping damaged checkpoint {newest}") == 1  # verified once, said once
    assert f"resuming from {checkpoint.step_dir(str(damaged), 3)} at step 3" in restart.stdout
    assert os.path.isdir(newest) and checkpoint.verify(newest)["step"] == 6
    (aside,) = [name for name in os.listdir(damaged) if name.startswith("step-00000006.unverified-")]
    assert f"moved {newest}, which did not verify when the run began, aside to {damaged / aside}" in restart.stdout
    aside = damaged / aside
    assert (tree_digest(aside) if aside.is_dir() else aside.read_bytes()) == kept  # every byte of it kept
    assert_identical_states(final_state(straight, 6), final_state(damaged, 6))


# Rates far past divergence: the first steps are finite and blow the weights up, then every loss is NaN.
DIVERGING = {"sophiag": dict(lr=1e8), "adamw_lw": dict(lr=1e20, lw_alpha_max=1e10)}


@pytest.mark.parametrize("optimizer", sorted(DIVERGING))
def test_a_diverging_run_with_curvature_refreshes_stops_on_the_guard_and_restarts(tmp_path, token_dir, optimizer):
    common = dict(
        optimizer=optimizer, hess_interval=2, lw_interval=2, lw_warmup_steps=2, eval_interval=4, lr_rule="single"
    )
    straight, diverged = tmp_path / "straight", tmp_path / "diverged"
    assert train.main(tiny_run_args(straight, token_dir, max_steps=8, **common)) == 0
    assert train.main(tiny_run_args(diverged, token_dir, max_steps=4, lr_decay_steps=8, **common)) == 0
    allowed = dict(allow_resume_changes="max_steps,lr" + (",lw_alpha_max" if optimizer == "adamw_lw" else ""))
    blowup = run_train(
        tiny_run_args(diverged, token_dir, max_steps=8, max_bad_steps=2, **common, **DIVERGING[optimizer], **allowed)
    )
    assert_one_line_error(blowup, "consecutive steps", "max_bad_steps=2", code=EXIT_DIVERGED)
    assert checkpoint.complete_steps(str(diverged)) == [4]  # nothing saved after the blow-up
    restart = run_train(tiny_run_args(diverged, token_dir, max_steps=8, **common, allow_resume_changes="max_steps"))
    assert restart.returncode == 0, restart.stderr[-3000:]
    assert_identical_states(final_state(straight, 8), final_state(diverged, 8))


def test_a_transient_nan_at_a_hessian_refresh_is_a_skipped_step_not_a_poisoned_hessian(
    tmp_path, token_dir, monkeypatch
):
    real_loss, calls = sampled_labels.sampled_label_loss, {"n": 0}

    def nan_on_the_second_refresh(logits):
        calls["n"] += 1
        loss = real_loss(logits)
        return loss * float("nan") if calls["n"] in (3, 4) else loss  # 2 micro-batches per refresh

    monkeypatch.setattr(sampled_labels, "sampled_label_loss", nan_on_the_second_refresh)
    out = tmp_path / "run"
    assert (
        train.main(
            tiny_run_args(
                out, token_dir, optimizer="sophiag", hess_interval=2, max_steps=6, eval_interval=6, lr_rule="single"
            )
        )
        == 0
    )
    assert [r["skipped_steps"] for r in read_log(out, "train")] == [0, 0, 0, 1, 0, 0]  # the refresh after step 4
    model, optimizer_state = final_state(out, 6)
    assert all(torch.isfinite(t).all() for t in model.values())
    hessians = [s["hessian"] for s in optimizer_state["state"].values()]
    assert all(torch.isfinite(h).all() for h in hessians) and any(h.abs().sum() > 0 for h in hessians)


def test_bad_command_line_input_is_one_line_naming_the_file_or_key(tmp_path, token_dir):
    assert_one_line_error(run_train(["--lr=1e39"]), "lr=1e+39", "float32")
    config_file = tmp_path / "broken.py"
    config_file.write_text("lr = 3e-4\nmax_steps = (\n")
    assert_one_line_error(run_train([str(config_file)]), f"config file {config_file}, line 2", "syntax error")
    config_file.write_text("lr = 3e-4\nmax_steps = steps_per_epoch * 2\n")
    assert_one_line_error(run_train([str(config_file)]), f"config file {config_file}, line 2", "NameError")


def test_multipliers_measured_on_another_model_are_refused(tmp_path, token_dir):
    measured = tmp_path / "measured"
    assert train.main(tiny_run_args(measured, token_dir, max_steps=1)) == 0
    data = json.loads((measured / "lwlr.json").read_text())
    for layer in data["layers"]:  # the same layer names with n_embd 64 instead of 32
        layer["shape"] = [2 * n if n == 32 else n for n in layer["shape"]]
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    out = tmp_path / "run"
    result = run_train(tiny_run_args(out, token_dir, lwlr_file=other))
    assert_one_line_error(
        result,
        f"lwlr_file {other} was measured on another model",
        "transformer.wte.weight [50257, 64] (model [50257, 32])",
    )
    assert not out.exists()  # refused before out_dir was made


def test_a_lock_file_that_is_a_directory_is_one_error_line(tmp_path, token_dir):
    out = tmp_path / "run"
    (out / ".lock").mkdir(parents=True)
    assert_one_line_error(run_train(tiny_run_args(out, token_dir, max_steps=1)), f"{out}/.lock is a folder")


def test_a_changed_vocabulary_on_resume_is_one_error_naming_the_tensor(tmp_path):
    from data.tokenfile import write_tokens
    from data.vocab import save_chars

    data, out = tmp_path / "chars", tmp_path / "run"
    data.mkdir()
    chars = [chr(ord("a") + i) for i in range(20)]
    rng = np.random.default_rng(0)
    tokens = {split: rng.integers(0, 20, count) for split, count in (("train", 5000), ("val", 1000))}
    for split in tokens:
        write_tokens(str(data / f"{split}.bin"), tokens[split], 20)
    save_chars(str(data), chars)
    assert train.main(tiny_run_args(out, data, max_steps=2, lr_decay_steps=4, lr_rule="single")) == 0
    save_chars(str(data), [*chars, "!"])  # the same tokens, prepared again with a vocabulary one larger
    for split in tokens:
        write_tokens(str(data / f"{split}.bin"), tokens[split], 21)
    before = tree_digest(out)
    with pytest.raises(checkpoint.CheckpointError, match=r"transformer.wte.weight \[20, 32\] there, \[21, 32\]"):
        train.main(
            tiny_run_args(out, data, max_steps=4, lr_decay_steps=4, lr_rule="single", allow_resume_changes="max_steps")
        )
    assert tree_digest(out) == before


def test_an_out_dir_that_stops_being_writable_mid_run_is_one_error(tmp_path, token_dir, monkeypatch):
    def refused(*args, **kwargs):  # what a chmod or a read-only remount does to a non-root run's save
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "run" / ".tmp-step-00000002"))

    monkeypatch.setattr(checkpoint, "save", refused)
    with pytest.raises(outdir.OutDirNotWritableError, match="stopped being writable during the run"):
        train.main(tiny_run_args(tmp_path / "run", token_dir, max_steps=2, eval_interval=2, lr_rule="single"))


POISON = """
import hashlib, json, os, sys, torch
class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
path = sys.argv[1]
torch.save({"w": torch.zeros(2), "payload": Payload()}, os.path.join(path, "model.pt"))
meta = json.load(open(os.path.join(path, "meta.json")))
data = open(os.path.join(path, "model.pt"), "rb").read()
meta["files"]["model.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
json.dump(meta, open(os.path.join(path, "meta.json"), "w"))
"""


def test_a_poisoned_checkpoint_with_matching_checksums_is_one_error_and_never_runs(tmp_path, token_dir):
    out, marker = tmp_path / "run", tmp_path / "payload-ran"
    first = dict(max_steps=2, lr_decay_steps=4, eval_interval=2, lr_rule="single")
    assert train.main(tiny_run_args(out, token_dir, **first)) == 0
    newest = checkpoint.step_dir(str(out), 2)
    subprocess.run([sys.executable, "-c", POISON, newest, str(marker)], check=True, cwd=ROOT)
    resumed = dict(max_steps=4, lr_decay_steps=4, lr_rule="single", allow_resume_changes="max_steps")
    result = run_train(tiny_run_args(out, token_dir, **resumed))
    assert_one_line_error(result, f"{newest}/model.pt: holds more than tensors", "posix.system")
    assert not marker.exists()
