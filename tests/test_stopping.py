"""Every stop answered within a step, wherever the run is: a stop signal during a step or an eval, a
rank that hangs, a launcher that dies, a scheduler waiting for exit code 75 through torchrun, a sweep.
Each as the user meets it, a subprocess; gpt2-tiny on CPU. How soon is counted in steps and eval
batches, never in seconds: the suite passes on a machine another heavy job shares."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import train
from conftest import ROOT, read_log, tiny_run_args
from runtime.signals import EXIT_PREEMPTED
from test_operations import wait_for_line
from test_reliability import assert_identical_states, final_state
from training import checkpoint, outdir


def start(command, env=None, **popen):
    return subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        **popen,
    )


def stop_and_wait(child, sig, timeout=300):
    """Send sig; (exit code, rest of stdout, stderr). The timeout only ends a hung test."""
    child.send_signal(sig)
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    finally:
        child.kill()
    return child.returncode, stdout, stderr


@pytest.mark.parametrize(
    "sig, during",
    # a dropped ssh session, a scheduler; SIGUSR1 (Slurm's warning) goes through launch.py below
    [("SIGHUP", "training"), ("SIGTERM", "eval")],
)
def test_a_stop_signal_during_a_step_or_an_eval_saves_within_a_step_exits_75_and_resumes_exactly(
    tmp_path, token_dir, sig, during
):
    # In training: the signal comes after step 5's log line, seven steps before the only eval. In an eval:
    # once step 6's eval of 3,000 batches (about a minute) says its progress; the stop must not wait for it.
    # Evals and log lines change nothing in training, so the straight run does 2.
    args = dict(max_steps=12, lr_rule="single")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert train.main(tiny_run_args(straight, token_dir, **args)) == 0
    in_eval = dict(eval_interval=6, log_interval=6, eval_steps=3000)
    when = in_eval if during == "eval" else dict(eval_interval=12, log_interval=5)
    child = start([sys.executable, "train.py", *tiny_run_args(stopped, token_dir, **args, **when)])
    wait_for_line(child, "eval: " if during == "eval" else "step      5/")  # the eval's first progress line
    code, stdout, stderr = stop_and_wait(child, getattr(signal, sig))
    assert code == EXIT_PREEMPTED, stderr[-3000:]
    assert f"stop ({sig}) at step" in stdout and f"during {during}" in stdout, stdout
    stop_record = read_log(stopped, "stop")[-1]
    assert stop_record["during"] == during and stop_record["reason"] == sig
    assert stop_record["step"] - stop_record["came_after_step"] <= 1  # within the step the signal came in
    assert checkpoint.complete_steps(str(stopped))[0] == stop_record["step"]
    if during == "eval":  # the cut-short eval is said, not recorded
        assert "its val loss is not recorded" in stdout
        assert stop_record["step"] not in [r["step"] for r in read_log(stopped, "eval")]
    assert train.main(tiny_run_args(stopped, token_dir, **args)) == 0
    assert_identical_states(final_state(straight, 12), final_state(stopped, 12))


def two_ranks(args, port, env=None):
    """Two gloo ranks of train.py started directly (no torchrun), so a test can freeze one of them."""
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    return [
        start([sys.executable, "train.py", *args], env={**common, "RANK": str(r), "LOCAL_RANK": str(r), **(env or {})})
        for r in range(2)
    ]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_frozen_rank_ends_the_run_within_the_timeout_naming_the_collective_and_the_rank(tmp_path, token_dir):
    out = tmp_path / "run"
    args = tiny_run_args(out, token_dir, max_steps=2000, eval_interval=1000, lr_rule="single", dist_timeout=3)
    rank0, rank1 = two_ranks(args, free_port())
    try:
        wait_for_line(rank0, "step      3/")
        rank1.send_signal(signal.SIGSTOP)
        _, stderr = rank0.communicate(timeout=300)
    finally:
        for child in (rank0, rank1):
            child.kill()
            child.wait()
    assert rank0.returncode == 2, stderr[-3000:]
    error = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert re.search(r"rank 0: .* waited \d+ s \(dist_timeout=3\) for rank 1, which did not answer", error[0])
    assert "all-reduce" in error[0] or "stop vote" in error[0]  # the collective it waited in


def test_ranks_whose_launcher_died_save_stop_and_free_the_lock(tmp_path, token_dir):
    out = tmp_path / "run"
    args = tiny_run_args(out, token_dir, max_steps=2000, eval_interval=1000, lr_rule="single")
    launcher = start(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args]
    )
    try:
        wait_for_line(launcher, "step      3/")
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        for _ in range(1500):  # the workers, orphans now, notice at their next step, save and free the lock
            try:
                with outdir.lock(str(out)):
                    break
            except outdir.OutDirInUseError:
                time.sleep(0.2)
    finally:
        launcher.kill()
    stop_record = read_log(out, "stop")[-1]
    assert "launcher" in stop_record["reason"] and stop_record["reason"].endswith("exited")
    assert checkpoint.complete_steps(str(out))[0] == stop_record["step"] < 2000


def test_launch_py_turns_a_clean_stop_under_torchrun_into_exit_75(tmp_path, token_dir):
    """torchrun alone exits 1 here; SIGUSR1 would kill it outright."""
    out = tmp_path / "run"
    args = tiny_run_args(out, token_dir, max_steps=2000, eval_interval=1000, lr_rule="single")
    launcher = start([sys.executable, "launch.py", "--standalone", "--nproc_per_node=2", "train.py", *args])
    wait_for_line(launcher, "step      3/")
    code, stdout, stderr = stop_and_wait(launcher, signal.SIGUSR1)
    assert code == EXIT_PREEMPTED, stderr[-3000:]
    assert "launch.py: the run stopped and saved (exit 75); run the same command" in stderr
    assert "SignalException" not in stderr  # torchrun's own exception after a clean stop, said as a crash
    stop_record = read_log(out, "stop")[-1]
    assert checkpoint.complete_steps(str(out))[0] == stop_record["step"]
    assert stop_record["step"] - stop_record["came_after_step"] <= 2  # the ranks' vote answers one poll late


def test_a_stop_signal_ends_an_overfit_sweep_at_once_keeping_its_finished_points(tmp_path, token_dir):
    out = tmp_path / "sweep"
    command = [
        sys.executable,
        "-m",
        "bench.overfit",
        "--preset=tiny-cpu",
        f"--out_dir={out}",
        f"--data_dir={token_dir}",
    ]
    command += ["--optimizers", "adamw", "--rules", "single", "--lrs", "1e-3", "3e-3", "1e-2", "--steps=150"]
    command += [
        "--subset_batches=2",
        "--micro_batch_size=2",
        "--block_size=32",
        "--device=cpu",
        "--jobs=2",
        "--threads=1",
    ]
    child = start(command)
    wait_for_line(child, "[1/3]")  # two workers: the second point about to finish, the third to start
    time.sleep(1)
    code, stdout, stderr = stop_and_wait(child, signal.SIGTERM)
    assert code == EXIT_PREEMPTED, stderr[-3000:]
    assert "the sweep stopped" in stdout
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert 1 <= len(runs) <= 2  # what finished is kept; the rest runs on the next start
