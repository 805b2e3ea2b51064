"""Sharded checkpoints (training/sharded.py) under parallel=fsdp, gpt2-tiny on CPU with gloo under torchrun:
the folder each save writes, a kill -9 while saves are in flight, a bit-exact resume on fsdp and one under DDP,
a shard that goes missing, a full disk during a background save, and what the reader refuses to unpickle."""

import os
import pickle
import shutil
import signal
import sys

import pytest
import safetensors.torch
import torch

import export
from conftest import read_log, tiny_run_args, torchrun
from runtime import files
from test_operations import small_file_system, wait_for_line
from test_reliability import assert_identical_states, final_state
from test_stopping import start
from training import checkpoint

# Adam-mini: its per-block second moments are whole on every rank (written once), the rest sharded.
SETTINGS = dict(optimizer="adam_mini", lr_rule="single", max_steps=6, lr_decay_steps=6, eval_steps=1, keep_last=3)


def launch_fsdp(out, token_dir, nproc=2, **more):
    args = tiny_run_args(out, token_dir, parallel="fsdp", **{**SETTINGS, **more})
    command = [sys.executable, "launch.py", "--standalone", f"--nproc_per_node={nproc}", "train.py", *args]
    return start(command, start_new_session=True)  # one process group: a kill -9 takes the launcher and both ranks


def finished(child, timeout=300) -> str:
    stdout, stderr = child.communicate(timeout=timeout)
    assert child.returncode == 0, stderr[-3000:]
    return stdout


def test_sharded_saves_resume_bit_exact_after_a_kill_9_mid_save_and_under_ddp(tmp_path, token_dir):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    said = finished(launch_fsdp(straight, token_dir))
    # Each rank wrote its shards; rank 0 the index, rest.pt and meta.json, which lists every file.
    path = checkpoint.step_dir(str(straight), 6)
    meta = checkpoint.verify(path)
    assert meta["format_version"] == 3 and meta["layout"] == "sharded" and meta["world_size"] == 2
    assert sorted(meta["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp", "rest.pt"]
    assert sorted(os.listdir(path)) == sorted([*meta["files"], "meta.json"])
    assert "sharded over 2 ranks: the step waited" in said and "written in" in said
    # Read back in this process: the weights the run gathered for its export (another path: fsdp.full), and
    # export.py's Hugging Face directory from the shards.
    gathered = safetensors.torch.load_file(str(straight / "model.safetensors"))
    read = checkpoint.load_model(path, meta).state_dict()
    assert gathered.keys() <= read.keys() and all(torch.equal(read[name], t) for name, t in gathered.items())
    assert export.main(["--out_dir", str(straight), "--hf_dir", str(tmp_path / "hf")]) == 0

    # A save at every step, and kill -9 of the launcher and both ranks once step 3's has landed: step 4's or
    # 5's is in flight or about to be. The same command again resumes from the newest complete folder.
    child = launch_fsdp(killed, token_dir, eval_interval=1)
    try:
        wait_for_line(child, f"saved {checkpoint.step_dir(str(killed), 3)}")
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    shutil.copytree(killed, tmp_path / "to_ddp")
    resumed = finished(launch_fsdp(killed, token_dir, eval_interval=1))
    assert "resuming from" in resumed
    assert not [name for name in os.listdir(killed) if name.startswith(checkpoint.TMP_PREFIX)]
    assert_identical_states(final_state(straight, 6), final_state(killed, 6))
    assert [r["step"] for r in read_log(killed, "train")] == [1, 2, 3, 4, 5, 6]  # each step once

    # The same shards on two DDP ranks: the elastic resume's tolerance (another reduction order).
    args = tiny_run_args(tmp_path / "to_ddp", token_dir, parallel="ddp", **SETTINGS, eval_interval=1)
    assert torchrun(2, args).returncode == 0
    (model_ddp, _), (model_fsdp, _) = final_state(tmp_path / "to_ddp", 6), final_state(straight, 6)
    for name, tensor in model_fsdp.items():
        if not name.endswith("k_proj.bias"):  # zero gradient by construction: rounding noise
            torch.testing.assert_close(model_ddp[name], tensor, rtol=1e-5, atol=1e-6, msg=name)

    # A shard deleted: that folder fails verification, is reported, and the one before it is used.
    os.remove(os.path.join(path, "__1_0.distcp"))
    found, rejected = checkpoint.scan(str(straight))
    assert found[0] == checkpoint.step_dir(str(straight), 3)
    assert rejected[0][0] == path and "__1_0.distcp: missing" in str(rejected[0][1])


def test_a_full_disk_during_a_background_save_is_exit_74_and_leaves_nothing_partial(tmp_path, token_dir):
    with small_file_system(tmp_path / "disk", 16) as disk:  # two checkpoints of 6.7 MB, not three
        out = disk / "run"
        child = launch_fsdp(out, token_dir, max_steps=12, lr_decay_steps=12)
        stdout, stderr = child.communicate(timeout=300)
        assert child.returncode == files.EXIT_DISK_FULL, stderr[-3000:]
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
        assert errors[0].startswith("error: saving step ") and "no space left on the file system of" in errors[0]
        assert "Nothing of this save is left" in errors[0]
        assert not [name for name in os.listdir(out) if name.startswith(checkpoint.TMP_PREFIX)]
        for step in checkpoint.complete_steps(str(out)):  # what did land is whole
            checkpoint.verify(checkpoint.step_dir(str(out), step))


class Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/should-never-exist",))


def test_a_checkpoint_index_holding_anything_but_dcps_metadata_is_refused_unrun(tmp_path):
    folder = tmp_path / "step"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(checkpoint.CheckpointError, match=r"\.metadata: holds more than tensors.*posix.system"):
        checkpoint.SafeReader(str(folder)).read_metadata()
