"""Failures a user, a disk or an attacker can cause, met as they meet them: nothing that cannot be read is
destroyed, no write follows a planted link, a run that never trained is no success, a rank that went
away is one line, and every malformed input is one `error:` line naming the file. gpt2-tiny on CPU."""

import errno
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import export
import train
from conftest import ROOT, read_log, root_on_path, tiny_run_args, tree_digest
from data import tokenfile
from data.tokenfile import HEADER_BYTES, TokenFileError, read_tokens, write_tokens
from model import GPT, GPTConfig
from multipliers import LwlrFileError
from runtime import device
from runtime.errors import UserError
from runtime.files import PlantedFileError, open_for_append, write_atomically
from test_operations import wait_for_line
from test_reliability import assert_one_line_error, nan_on_steps, run_train
from test_stopping import free_port, two_ranks
from training import checkpoint, hf, outdir, resume
from training.config import ConfigError
from training.metrics import EXIT_DIVERGED, DivergedError


def flip_a_byte(path) -> None:
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))


# ---- never destroy what cannot be read ------------------------------------------------------------------


def test_an_out_dir_whose_checkpoints_all_fail_verification_is_refused_and_left_as_it_was(tmp_path, token_dir):
    out = tmp_path / "run"
    assert train.main(tiny_run_args(out, token_dir, max_steps=6, eval_interval=3)) == 0
    for step in (3, 6):
        flip_a_byte(os.path.join(checkpoint.step_dir(str(out), step), "model.pt"))
    os.remove(out / "model.safetensors")  # as if stopped before its export: a restart would train again
    before = tree_digest(out)
    refused = run_train(tiny_run_args(out, token_dir, max_steps=6, eval_interval=3))
    assert_one_line_error(refused, "holds 2 checkpoints, and none verifies", "step-00000006:", "step-00000003:")
    assert "checksum mismatch" in refused.stderr and "Nothing was changed" in refused.stderr
    assert tree_digest(out) == before  # the checkpoints, and the old run's log, byte for byte
    with pytest.raises(
        ConfigError, match="init_from=scratch, but .* already holds step folders, none of which verifies"
    ):
        train.main(tiny_run_args(out, token_dir, max_steps=6, init_from="scratch"))
    assert tree_digest(out) == before


def test_a_read_error_is_said_as_one_and_the_checkpoint_it_hid_is_kept(tmp_path, token_dir, monkeypatch, capsys):
    out = tmp_path / "run"
    assert train.main(tiny_run_args(out, token_dir, max_steps=6, eval_interval=3)) == 0
    newest = checkpoint.step_dir(str(out), 6)
    kept = tree_digest(newest)
    real_sha256 = checkpoint._sha256

    def failing_disk(path):  # what a bad sector does to the read of step 6's files
        if path.startswith(newest + os.sep):
            raise OSError(errno.EIO, "Input/output error", path)
        return real_sha256(path)

    monkeypatch.setattr(checkpoint, "_sha256", failing_disk)
    os.remove(out / "model.safetensors")
    assert train.main(tiny_run_args(out, token_dir, max_steps=6, eval_interval=3)) == 0
    said = capsys.readouterr().out
    assert f"skipping unreadable checkpoint {newest}: " in said
    assert "cannot be read (Input/output error): a disk or permission error, not a damaged checkpoint" in said
    (aside,) = [name for name in os.listdir(out) if name.startswith("step-00000006.unverified-")]
    assert tree_digest(out / aside) == kept


def test_retention_removes_only_the_runs_own_checkpoints(tmp_path, token_dir):
    out = tmp_path / "run"
    assert train.main(tiny_run_args(out, token_dir, max_steps=4, eval_interval=2, lr_decay_steps=8)) == 0
    damaged = checkpoint.step_dir(str(out), 1)
    os.makedirs(damaged)
    open(os.path.join(damaged, "meta.json"), "wb").write(b"\x00garbage")
    other_run = checkpoint.step_dir(str(out), 0)  # another run's checkpoint, complete and valid
    os.rename(checkpoint.step_dir(str(out), 2), other_run)
    meta = json.loads(open(os.path.join(other_run, "meta.json")).read())
    open(os.path.join(other_run, "meta.json"), "w").write(json.dumps({**meta, "run_id": "another run"}))
    further = dict(max_steps=8, eval_interval=2, lr_decay_steps=8, allow_resume_changes="max_steps")
    assert train.main(tiny_run_args(out, token_dir, **further)) == 0
    assert checkpoint.complete_steps(str(out)) == [8, 6, 1, 0]  # keep_last=2 of its own; 4 was its own too
    assert open(os.path.join(damaged, "meta.json"), "rb").read() == b"\x00garbage"


def test_a_folder_where_a_file_belongs_is_damage_not_a_disk_error(tmp_path, token_dir):
    out = tmp_path / "run"
    assert train.main(tiny_run_args(out, token_dir, max_steps=3, eval_interval=3)) == 0
    meta = os.path.join(checkpoint.step_dir(str(out), 3), "meta.json")
    os.remove(meta)
    os.mkdir(meta)
    _, ((_, error),) = checkpoint.scan(str(out))
    assert error.kind == "damaged" and "Is a directory" in str(error)


@pytest.mark.parametrize(
    "edit, said",
    [
        (lambda files: files.pop("model.pt"), "its file list does not name model.pt"),
        (lambda files: files.update({"../model.pt": files["model.pt"]}), "'../model.pt' in its file list"),
    ],
)
def test_a_file_list_must_name_every_required_file_and_only_the_checkpoints_own(tmp_path, token_dir, edit, said):
    out = tmp_path / "run"
    assert train.main(tiny_run_args(out, token_dir, max_steps=3, eval_interval=3)) == 0
    path = checkpoint.step_dir(str(out), 3)
    meta = json.loads(open(os.path.join(path, "meta.json")).read())
    edit(meta["files"])
    open(os.path.join(path, "meta.json"), "w").write(json.dumps(meta))
    flip_a_byte(os.path.join(path, "model.pt"))  # altered, and no longer covered by a checksum
    with pytest.raises(checkpoint.CheckpointError, match=said):
        checkpoint.verify(path)


# ---- no write follows a link ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", outdir.WRITTEN_NAMES)
def test_a_link_planted_in_out_dir_is_refused_and_its_target_untouched(tmp_path, token_dir, name):
    out, victim = tmp_path / "shared", tmp_path / "victim.txt"
    victim.write_text("precious")
    out.mkdir()
    os.symlink(victim, out / name)
    with pytest.raises(PlantedFileError, match=f"{out / name} is a symbolic link"):
        train.main(tiny_run_args(out, token_dir, max_steps=1))
    assert victim.read_text() == "precious" and sorted(os.listdir(out)) == [name]


def test_each_writer_refuses_a_planted_link_itself(tmp_path):
    """Past the check at the start: the lock, an atomic write, its temporary, an append, the export."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in (".lock", "config.json", "log.jsonl", "model.safetensors", f"lwlr.json.tmp-{os.getpid()}"):
        os.symlink(victim, tmp_path / name)
    with pytest.raises(PlantedFileError), outdir.lock(str(tmp_path)):
        pass
    with pytest.raises(PlantedFileError):
        write_atomically(str(tmp_path / "config.json"), lambda f: f.write("{}"))
    with pytest.raises(PlantedFileError):
        write_atomically(str(tmp_path / "lwlr.json"), lambda f: f.write("{}"))  # through its temporary name
    with pytest.raises(PlantedFileError):
        open_for_append(str(tmp_path / "log.jsonl"))
    with pytest.raises(PlantedFileError):
        checkpoint.export_safetensors(GPT(GPTConfig.from_preset("gpt2-tiny")), str(tmp_path / "model.safetensors"))
    assert victim.read_text() == "precious"


def test_a_hard_linked_log_and_a_linked_logger_folder_are_refused(tmp_path, token_dir):
    out, backup = tmp_path / "run", tmp_path / "backup"
    assert train.main(tiny_run_args(out, token_dir, max_steps=1, eval_interval=1, lr_decay_steps=2)) == 0
    backup.mkdir()
    os.link(out / "log.jsonl", backup / "log.jsonl")  # a backup made with hard links (cp -al, rsync --link-dest)
    kept = (backup / "log.jsonl").read_bytes()
    further = tiny_run_args(out, token_dir, max_steps=2, lr_decay_steps=2, allow_resume_changes="max_steps")
    with pytest.raises(PlantedFileError, match="log.jsonl is a hard link"):
        train.main(further)
    assert (backup / "log.jsonl").read_bytes() == kept
    os.remove(backup / "log.jsonl")
    os.symlink(backup, out / "tensorboard")
    with pytest.raises(PlantedFileError, match="tensorboard is a symbolic link"):
        train.main(further)


def test_a_symlinked_out_dir_still_works(tmp_path, token_dir):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "out")
    assert train.main(tiny_run_args(tmp_path / "out", token_dir, max_steps=1, eval_interval=1)) == 0
    assert checkpoint.complete_steps(str(tmp_path / "real")) == [1]


# ---- divergence is a failure ----------------------------------------------------------------------------


def test_a_rate_that_blows_the_weights_up_at_the_first_update_fails_and_exports_nothing(tmp_path, token_dir):
    out = tmp_path / "run"
    diverged = run_train(tiny_run_args(out, token_dir, max_steps=4, eval_interval=10, lr=1e30, lr_rule="single"))
    assert_one_line_error(diverged, "the run diverged", "no checkpoint of this run exists yet", code=EXIT_DIVERGED)
    assert "stands" not in diverged.stdout and "previous checkpoint" not in diverged.stdout
    assert not (out / "model.safetensors").exists() and checkpoint.complete_steps(str(out)) == []


def test_a_run_whose_every_step_was_non_finite_fails_below_max_bad_steps(tmp_path, token_dir, monkeypatch):
    nan_on_steps(monkeypatch, set(range(1, 100)))  # every training forward, from the first
    out = tmp_path / "run"
    with pytest.raises(DivergedError, match="3 consecutive steps .* the starting weights give a non-finite loss"):
        train.main(tiny_run_args(out, token_dir, max_steps=3, eval_interval=10, max_bad_steps=10, lr_rule="single"))
    assert not (out / "model.safetensors").exists() and checkpoint.complete_steps(str(out)) == []


def test_a_run_whose_steps_after_the_first_were_all_non_finite_fails(tmp_path, token_dir, monkeypatch):
    nan_on_steps(monkeypatch, set(range(3, 100)))  # two forwards a step: every step after the first
    out = tmp_path / "run"
    with pytest.raises(DivergedError, match="5 consecutive steps .* the update at step 1 left weights whose loss"):
        train.main(tiny_run_args(out, token_dir, max_steps=6, eval_interval=10, max_bad_steps=10, lr_rule="single"))
    assert not (out / "model.safetensors").exists()


def test_non_finite_weights_are_refused_on_the_way_in_and_on_the_way_out(tmp_path, token_dir, gpt2_dir):
    weights = load_file(str(gpt2_dir / "model.safetensors"))
    weights["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    save_file(weights, str(gpt2_dir / "model.safetensors"))
    with pytest.raises(hf.PretrainedError, match="h.0.mlp.c_fc.weight holds NaN or infinite values"):
        train.main(tiny_run_args(tmp_path / "run", token_dir, init_from=str(gpt2_dir), max_steps=1))
    assert not (tmp_path / "run").exists()
    model = GPT(GPTConfig.from_preset("gpt2-tiny"))
    with torch.no_grad():
        model.transformer.wpe.weight[0, 0] = float("inf")
    out = tmp_path / "nan"
    meta = {"config": dict(model="gpt2-tiny", block_size=64), "run_id": None}
    checkpoint.save(str(out), 1, {"model": model.state_dict(), "optimizer": {}}, meta, keep_last=2)
    with pytest.raises(checkpoint.CheckpointError, match="weights hold NaN or infinite values .*wpe.weight"):
        export.main([f"--out_dir={out}", f"--hf_dir={tmp_path / 'hf'}"])
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("multiplier", [1e300, 1e-300, float("inf")])
def test_a_multiplier_float32_cannot_hold_is_refused(tmp_path, token_dir, multiplier):
    out = tmp_path / "measured"
    assert train.main(tiny_run_args(out, token_dir, max_steps=1, eval_interval=1)) == 0
    data = json.loads((out / "lwlr.json").read_text())
    data["layers"][3]["multiplier"] = multiplier
    (tmp_path / "lwlr.json").write_text(json.dumps(data))
    with pytest.raises(LwlrFileError, match=f"multipliers of {data['layers'][3]['name']} are not positive finite"):
        train.main(tiny_run_args(tmp_path / "run", token_dir, lwlr_file=tmp_path / "lwlr.json"))


# ---- a rank that went away ------------------------------------------------------------------------------


def worker_pid(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker of the given rank, found through /proc."""
    todo = [launcher_pid]
    while todo:
        pid = todo.pop()
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                todo += [int(child) for child in f.read().split()]
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and pid != launcher_pid:
            return pid
    raise AssertionError(f"no worker of rank {rank}")


def kill_a_worker(args, rank: int, after_line: str) -> tuple[int, list[str], str]:
    """launch.py on two ranks; kill -9 of one worker once rank 0 prints a line starting after_line: the
    launch's exit code, the error lines, and all of stderr."""
    launcher = subprocess.Popen(
        [sys.executable, "launch.py", "--standalone", "--nproc_per_node=2", "train.py", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=root_on_path(OMP_NUM_THREADS="1"),
    )
    try:
        wait_for_line(launcher, after_line)
        os.kill(worker_pid(launcher.pid, rank), signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return launcher.returncode, errors, stderr


@pytest.mark.parametrize("killed", [0, 1])
def test_a_killed_rank_is_one_error_line_from_the_other_and_launch_exits_2(tmp_path, token_dir, killed):
    out = tmp_path / "run"
    common = dict(eval_interval=2, lr_decay_steps=2000, lr_rule="single")
    code, errors, stderr = kill_a_worker(
        tiny_run_args(out, token_dir, max_steps=2000, **common), killed, "step      3/"
    )
    survivor = 1 - killed
    assert code == 2, stderr[-3000:]  # rank 0's code, or the survivor's when rank 0 is the one lost
    assert errors[0].startswith(f"error: rank {survivor}: rank {killed} went away during "), errors[0]
    assert "the stop vote at step" in errors[0] or "all-reduce" in errors[0], errors[0]  # the collective it was in
    resumed = run_train(tiny_run_args(out, token_dir, max_steps=5, **common, allow_resume_changes="max_steps"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]  # the same run (here on one process) goes on
    assert "resuming from" in resumed.stdout


def test_a_rank_killed_outside_the_training_steps_is_one_error_line(tmp_path, token_dir):
    """During the lwlr measurement, whose one all-reduce comes at its end. Two ranks started directly:
    torchrun would stop the survivor with SIGTERM first (a stop before the first step: exit 75)."""
    args = tiny_run_args(tmp_path / "run", token_dir, max_steps=4, lwlr_T=400)
    rank0, rank1 = two_ranks(args, free_port())
    try:
        wait_for_line(rank0, "lwlr: measuring")
        rank1.kill()
        _, stderr = rank0.communicate(timeout=120)
    finally:
        for child in (rank0, rank1):
            child.kill()
            child.wait()
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert rank0.returncode == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert errors[0].startswith("error: rank 0: rank 1 went away during a collective"), errors[0]


# ---- token files ----------------------------------------------------------------------------------------


def test_a_token_body_that_contradicts_its_header_is_refused_before_training(tmp_path, token_dir):
    path = token_dir / "train.bin"
    raw = bytearray(path.read_bytes())
    raw[HEADER_BYTES + 1000 : HEADER_BYTES + 1002] = np.array([60000], dtype="<u2").tobytes()
    path.write_bytes(bytes(raw))
    out = tmp_path / "run"
    refused = run_train(tiny_run_args(out, token_dir, max_steps=2))
    assert_one_line_error(refused, f"{path}: its tokens reach id 60000, past the largest its header records")
    assert not out.exists()


def test_the_body_scan_is_read_back_from_its_cache_until_the_file_changes(tmp_path):
    path, cache = str(tmp_path / "a.bin"), str(tmp_path / "cache.json")
    write_tokens(path, np.arange(1000) % 97, 50257)
    assert tokenfile.body_max_id(path, 1000, cache) == 96
    entries = json.loads(open(cache).read())
    entries[os.path.realpath(path)]["max_id"] = 12345  # what the cache says is what a restart takes
    open(cache, "w").write(json.dumps(entries))
    assert tokenfile.body_max_id(path, 1000, cache) == 96  # this process remembers its own scan
    tokenfile._SCANNED.clear()  # a restart
    assert tokenfile.body_max_id(path, 1000, cache) == 12345
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # the file changed: read again
    assert tokenfile.body_max_id(path, 1000, cache) == 96


def test_character_level_tokens_without_their_vocabulary_are_refused(tmp_path):
    write_tokens(str(tmp_path / "train.bin"), np.arange(5000) % 65, 65)
    with pytest.raises(TokenFileError, match="vocabulary of 65 tokens, but the model's has 50257 .*vocab.json"):
        read_tokens(str(tmp_path / "train.bin"), 50257)


# ---- malformed Hugging Face directories -----------------------------------------------------------------


class Payload:
    """A pickle that would run code when loaded (it creates the file `mark`): weights_only must refuse it."""

    def __init__(self, mark):
        self.mark = mark

    def __reduce__(self):
        return (os.system, (f"touch {self.mark}",))


def damage_config(directory, change):
    config = json.loads((directory / "config.json").read_text())
    change(config)
    (directory / "config.json").write_text(json.dumps(config))


def damage_weights(directory, change):
    weights = load_file(str(directory / "model.safetensors"))
    change(weights)
    save_file(weights, str(directory / "model.safetensors"))


DAMAGES = {
    "config not JSON": (lambda d: (d / "config.json").write_text("{not json"), "config.json: not a readable JSON"),
    "config key missing": (lambda d: damage_config(d, lambda c: c.pop("n_embd")), "config.json: no n_embd"),
    "config value wrong": (lambda d: damage_config(d, lambda c: c.update(n_head="2")), "n_head='2'"),
    "tensor missing": (
        lambda d: damage_weights(d, lambda w: w.pop("transformer.h.1.mlp.c_proj.weight")),
        "holds no h.1.mlp.c_proj.weight",
    ),
    "tensor of another shape": (
        lambda d: damage_weights(d, lambda w: w.update({"transformer.h.0.attn.c_attn.weight": torch.zeros(5, 7)})),
        "h.0.attn.c_attn.weight is [5, 7]",
    ),
    "tensor of another rank": (
        lambda d: damage_weights(d, lambda w: w.update({"transformer.h.0.mlp.c_fc.weight": torch.zeros(2, 3, 4)})),
        "h.0.mlp.c_fc.weight is [2, 3, 4], not a tensor of GPT-2's layout",
    ),
    "float64 weights float32 cannot hold": (
        lambda d: damage_weights(
            d, lambda w: w.update({"transformer.wpe.weight": torch.full((64, 32), 1e300, dtype=torch.float64)})
        ),
        "wpe.weight holds NaN or infinite values (as torch.float32)",
    ),
    "integer weights": (
        lambda d: damage_weights(d, lambda w: w.update({"transformer.ln_f.bias": torch.zeros(32, dtype=torch.int32)})),
        "ln_f.bias holds torch.int32 values, not floating-point weights",
    ),
    "weights file of garbage": (
        lambda d: (d / "model.safetensors").write_bytes(b"\x07garbage" * 100),
        "model.safetensors: not a readable weights file",
    ),
    "a pickle payload": (
        lambda d: (os.remove(d / "model.safetensors"), torch.save({"w": Payload(d / "ran")}, d / "pytorch_model.bin")),
        "pytorch_model.bin: holds more than tensors, so it is not loaded",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_malformed_pretrained_directory_is_one_error_naming_the_file(tmp_path, token_dir, gpt2_dir, damage):
    make, said = DAMAGES[damage]
    make(gpt2_dir)
    with pytest.raises(UserError, match=re.escape(said)):  # init_from: a ConfigError naming the file
        train.main(tiny_run_args(tmp_path / "run", token_dir, init_from=str(gpt2_dir), max_steps=1))
    assert not (tmp_path / "run").exists()


def test_sample_refuses_a_pickle_payload_in_one_line_without_running_it(tmp_path, gpt2_dir):
    DAMAGES["a pickle payload"][0](gpt2_dir)
    command = [sys.executable, "sample.py", f"--pretrained={gpt2_dir}", "--device=cpu", "--max_new_tokens=2"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert_one_line_error(result, "pytorch_model.bin: holds more than tensors")
    assert not (gpt2_dir / "ran").exists()
    pickle.loads(pickle.dumps(Payload(tmp_path / "ran")))  # the payload runs under plain pickle
    assert (tmp_path / "ran").exists()


# ---- the log, and the precision a resume compares -------------------------------------------------------

FILL_THE_LOG = """
import json, os, resource, signal, torch
from runtime.ranks import Runtime
from training.runlog import RunLog
log = RunLog(Runtime(0, 0, 1, torch.device("cpu")), {out!r}, echo=lambda line: None)
log.record("train", {{"step": 1, "loss": 1.0}})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails as on a full disk
size = os.path.getsize(os.path.join({out!r}, "log.jsonl"))
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 40, resource.RLIM_INFINITY))
try:
    log.record("train", {{"step": 2, "loss": 2.0, "note": "x" * 200}})
except OSError as e:
    print("refused:", e.errno)
"""


def test_a_log_write_cut_short_leaves_only_whole_records(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", FILL_THE_LOG.format(out=str(tmp_path))],
        capture_output=True,
        text=True,
        env=root_on_path(),
    )
    assert "refused: 27" in result.stdout, result.stderr[-2000:]  # EFBIG, after a short write
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines(keepends=True)] == [1]
    assert (tmp_path / "log.jsonl").read_text().endswith("\n")


def test_a_resume_compares_the_precision_each_run_computes_in(tmp_path, token_dir, monkeypatch):
    out = tmp_path / "run"
    args = dict(max_steps=2, eval_interval=1, dtype="bfloat16", lr_rule="single")
    assert train.main(tiny_run_args(out, token_dir, **args)) == 0
    further = dict(args, max_steps=3, lr_decay_steps=2, dtype="auto", allow_resume_changes="max_steps")
    monkeypatch.setattr(device, "cpu_computes_bf16", lambda: False)  # auto comes to float32 on this machine
    before = tree_digest(out)
    with pytest.raises(resume.ResumeRefused, match="computed in bfloat16, this one would in float32"):
        train.main(tiny_run_args(out, token_dir, **further))
    assert tree_digest(out) == before
    monkeypatch.setattr(device, "cpu_computes_bf16", lambda: True)  # auto comes to bfloat16: the same run
    assert train.main(tiny_run_args(out, token_dir, **further)) == 0
    assert read_log(out, "start")[-1]["precision"] == "bfloat16"
