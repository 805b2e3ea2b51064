"""What an operator of a shared cluster meets every week, each as the user meets it (a subprocess):
a disk that fills up during a save, a second run on the same out_dir, a restart on another number of
processes, and preemption in the first minutes. gpt2-tiny on CPU throughout."""

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
import torch

import train
from conftest import ROOT, read_log, tiny_run_args, torchrun
from runtime import files
from runtime.signals import EXIT_PREEMPTED
from training import checkpoint, outdir


def start_train(*args, **popen):
    return subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def wait_for_line(child, prefix, timeout=120):
    deadline = time.monotonic() + timeout
    for line in child.stdout:
        if line.startswith(prefix):
            return line
        assert time.monotonic() < deadline, f"no line starting {prefix!r}"
    raise AssertionError(f"the run ended before a line starting {prefix!r}: {child.stderr.read()[-2000:]}")


@contextlib.contextmanager
def small_file_system(path, megabytes):
    """A tmpfs of the given size at path (root only: skipped elsewhere)."""
    path.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)], capture_output=True
    ).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_is_one_error_line_exit_74_and_a_resume_after_space_is_freed(tmp_path, token_dir):
    args = dict(max_steps=6, eval_interval=3, keep_last=2)
    straight = tmp_path / "straight"
    assert train.main(tiny_run_args(straight, token_dir, **args)) == 0
    size = sum(
        os.path.getsize(os.path.join(checkpoint.step_dir(str(straight), 3), name))
        for name in os.listdir(checkpoint.step_dir(str(straight), 3))
    )
    with small_file_system(tmp_path / "disk", 64) as disk:
        ballast = disk / "ballast"  # leaves room for one checkpoint and a half
        free = files.free_bytes(str(disk))
        ballast.write_bytes(b"\0" * (free - int(1.5 * size)))
        out = disk / "run"
        result = subprocess.run(
            [sys.executable, "train.py", *tiny_run_args(out, token_dir, **args)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == files.EXIT_DISK_FULL, result.stderr[-3000:]
        error = result.stderr.strip()
        assert error.count("\n") == 0 and "Traceback" not in error
        assert error.startswith("error: saving step 6: no space left on the file system of") and str(out) in error
        assert "needed" in error and "MB free" in error and "step-00000003, is intact" in error
        assert "warning:" in result.stdout and "keep_last + 1 = 3 checkpoints" in result.stdout  # said at the start
        assert sorted(os.listdir(out)) == [
            ".lock",
            "config.json",
            "log.jsonl",
            "lwlr.json",
            "lwlr.png",
            "step-00000003",
        ]
        checkpoint.verify(checkpoint.step_dir(str(out), 3))
        ballast.unlink()  # space freed: the same command resumes and ends where the uninterrupted run did
        assert train.main(tiny_run_args(out, token_dir, **args)) == 0
        a, b = (checkpoint.load_tensors(checkpoint.step_dir(str(run), 6), "model") for run in (straight, out))
        assert all(torch.equal(a[name], b[name]) for name in a)


def test_a_second_run_on_the_same_out_dir_is_refused_while_the_first_holds_it(tmp_path, token_dir):
    out = tmp_path / "run"
    first = start_train(*tiny_run_args(out, token_dir, max_steps=100_000, eval_interval=100_000))
    try:
        wait_for_line(first, "step ")
        second = subprocess.run(
            [sys.executable, "train.py", *tiny_run_args(out, token_dir)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2
        assert (
            f"error: out_dir {out} is in use by another run (pid {first.pid} on {socket.gethostname()}, started "
            in second.stderr
        )
        assert second.stderr.count("\n") == 1
    finally:
        first.kill()  # kill -9: the lock goes with its holder
        first.wait()
    assert train.main(tiny_run_args(out, token_dir, max_steps=2, eval_interval=2)) == 0


# (1, 2) is tests/test_fsdp.py's one-process checkpoint resumed on 2 ranks, and DDP's resume on 2 ranks is
# tests/test_reliability.py's stop and resume under ddp.
@pytest.mark.parametrize("before, after", [(2, 1)])
def test_a_run_resumes_on_another_number_of_processes(tmp_path, token_dir, capsys, before, after):
    """The same global batch per step on either side, so the weights end equal to the uninterrupted run's
    (on `after` processes), up to the order of float additions: DDP averages the ranks' gradients where
    one process accumulates micro-steps, about 1e-7 relative per step. The key biases are left out: their
    gradient is zero by construction, rounding noise that Adam normalizes into full-size steps (docs/lwlr.md,
    "The key bias")."""
    args = dict(
        tokens_per_step=256,
        micro_batch_size=4,
        block_size=32,
        eval_interval=3,
        lr_decay_steps=6,
        allow_resume_changes="max_steps",
    )  # 8 rows a step

    def launch(nproc, out, steps) -> str:  # what the run printed; one process runs here, in process
        run_args = tiny_run_args(out, token_dir, max_steps=steps, **args)
        if nproc == 1:
            capsys.readouterr()
            assert train.main(run_args) == 0
            return capsys.readouterr().out
        result = torchrun(nproc, run_args)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    straight, elastic = tmp_path / "straight", tmp_path / "elastic"
    launch(after, straight, 6)
    launch(before, elastic, 3)
    resumed = launch(after, elastic, 6)
    said = f"resuming a run of {before} processes on {after}: the same 256 tokens per step, grad_accum {2 // after}"
    assert said in resumed
    a, b = (checkpoint.load_tensors(checkpoint.step_dir(str(out), 6), "model") for out in (straight, elastic))
    for name in a:
        if not name.endswith("k_proj.bias"):
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)
    assert [r["loss"] for r in read_log(elastic, "train")][3:] == pytest.approx(
        [r["loss"] for r in read_log(straight, "train")][3:], rel=1e-5
    )


@pytest.mark.parametrize(
    "stop", ["SIGTERM", "SIGHUP", "SIGUSR1"]
)  # a scheduler's, a dropped ssh session's, Slurm's warning
def test_a_stop_signal_during_the_lwlr_measurement_exits_75_at_once_and_leaves_no_file(tmp_path, token_dir, stop):
    out = tmp_path / "run"
    child = start_train(*tiny_run_args(out, token_dir, lwlr_T=100_000))  # a measurement of minutes
    try:
        wait_for_line(child, "lwlr: measuring")
        time.sleep(1)
        child.send_signal(getattr(signal, stop))
        stdout, stderr = child.communicate(timeout=300)  # the measurement's 100,000 batches would take hours
    finally:
        child.kill()  # no stray run if the stop failed
    assert child.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert "lwlr: measured" not in stdout  # it did not wait for the measurement
    assert f"{stop} before the first step was done: stopped at once, nothing saved" in stdout
    assert sorted(os.listdir(out)) == [".lock"]  # no lwlr.json, no config.json, no temporary file
    if stop == "SIGTERM":
        assert (
            train.main(tiny_run_args(out, token_dir, max_steps=2, eval_interval=2)) == 0
        )  # the restart measures again


def test_a_killed_export_leaves_nothing_a_restart_keeps_and_the_export_has_the_files_mode(tmp_path, token_dir):
    out = tmp_path / "run"
    assert train.main(tiny_run_args(out, token_dir, max_steps=2, lr_decay_steps=3, eval_interval=2)) == 0
    for stale in ("model.safetensors.tmp-99999", "config.json.tmp-4242", ".write-test-77"):  # kill -9 mid-write
        (out / stale).write_bytes(b"partial")
    again = tiny_run_args(
        out, token_dir, max_steps=3, lr_decay_steps=3, eval_interval=3, allow_resume_changes="max_steps"
    )
    assert train.main(again) == 0
    names = sorted(os.listdir(out))
    assert not [name for name in names if "tmp-" in name or "write-test" in name], names
    mode = stat.S_IMODE((out / "config.json").stat().st_mode)
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == mode == 0o666 & ~current_umask()


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_the_lock_holder_is_named_and_a_dead_holder_releases_it(tmp_path):
    with outdir.lock(str(tmp_path)):
        with pytest.raises(outdir.OutDirInUseError, match=f"pid {os.getpid()} on "):
            with outdir.lock(str(tmp_path)):
                pass
    assert json.loads((tmp_path / outdir.LOCK_FILE).read_text())["pid"] == os.getpid()
    with outdir.lock(str(tmp_path)):  # released on leaving the block
        pass
