"""The README's two-node torchrun lines, rehearsed as two launches on one machine (c10d rendezvous on
127.0.0.1, 2 gloo ranks a node, 4 in all): the run trains and writes sharded checkpoints, they resume on one
node of two; when one node's launcher dies the run stops and saves on every rank (exit 75), and when the whole
node is lost the other node's ranks end with one error line each and exit 2."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, root_on_path, tiny_run_args
from runtime.signals import EXIT_PREEMPTED
from test_operations import wait_for_line
from test_stopping import free_port, start
from training import checkpoint

SETTINGS = dict(parallel="fsdp", lr_rule="single", eval_interval=3, eval_steps=1, micro_batch_size=2, dist_timeout=60)


def node(node_rank: int, port: int, args: list[str]) -> subprocess.Popen:
    """One node's launch.py: the README's line with NODE_RANK and MASTER filled in."""
    command = [
        *(sys.executable, "launch.py", "--nnodes=2", f"--node_rank={node_rank}", "--nproc_per_node=2"),
        *("--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=rehearsal-{port}"),
        *("train.py", *args),
    ]
    return start(command, start_new_session=True)  # a node lost is its launcher and its ranks: one process group


def children(pid: int) -> list[int]:
    """The processes whose parent is pid (a launcher's ranks), through /proc."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid:
            found.append(int(entry))
    return found


@pytest.mark.parametrize("lost", ["launcher", "node"])
def test_two_nodes_train_and_when_one_is_lost_the_other_ends_as_documented(tmp_path, token_dir, lost):
    out = tmp_path / "run"
    args = tiny_run_args(out, token_dir, max_steps=2000, lr_decay_steps=2000, **SETTINGS)
    port = free_port()
    first = node(0, port, args)
    wait_for_port(port)  # node 0 hosts the rendezvous, as the first node does on a cluster
    second = node(1, port, args)
    try:
        said = wait_for_line(first, "gpt2-tiny")
        wait_for_line(first, f"saved {checkpoint.step_dir(str(out), 3)}")
        if lost == "node":  # its ranks too: node 0's lose their peers mid-collective
            for rank_pid in children(second.pid):
                os.kill(rank_pid, signal.SIGKILL)
        os.killpg(second.pid, signal.SIGKILL)
        stdout, stderr = first.communicate(timeout=300)
    finally:
        for child in (first, second):
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    assert "4 ranks" in said  # node 0 holds rank 0, which says the run's shape
    meta = checkpoint.verify(checkpoint.step_dir(str(out), 3))
    assert meta["layout"] == "sharded" and meta["world_size"] == 4
    assert sorted(name for name in meta["files"] if name.endswith(".distcp")) == [f"__{r}_0.distcp" for r in range(4)]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    if lost == "node":  # each of node 0's ranks says which ranks went away; launch.py exits with rank 0's 2
        assert first.returncode == 2 and "Traceback" not in stderr, stderr[-3000:]
        assert sorted(line.split(":")[1] for line in errors) == [" rank 0", " rank 1"], errors
        for line in errors:  # the lost node's ranks, and rank 0 too where it ended first
            gone = re.search(r"ranks? ([\d, ]+) went away during", line)
            assert gone and {2, 3} <= {int(rank) for rank in gone.group(1).split(", ")}, line
        return
    # The launcher lost: its ranks notice within a step and vote a stop, all four save it and exit 75 ...
    assert first.returncode == EXIT_PREEMPTED and not errors, stderr[-3000:]
    stop = [line for line in stdout.splitlines() if line.startswith("stop ")][0]
    step = int(re.search(r"at step (\d+)", stop).group(1))
    assert checkpoint.verify(checkpoint.step_dir(str(out), step))["world_size"] == 4
    # ... and the 4 ranks' shards resume on one node of 2.
    resumed = subprocess.run(
        [
            *(sys.executable, "launch.py", "--standalone", "--nproc_per_node=2", "train.py"),
            *tiny_run_args(
                out, token_dir, max_steps=step + 2, lr_decay_steps=2000, allow_resume_changes="max_steps", **SETTINGS
            ),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=root_on_path(OMP_NUM_THREADS="1"),
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming a run of 4 processes on 2" in resumed.stdout
    assert checkpoint.verify(checkpoint.step_dir(str(out), step + 2))["world_size"] == 2


def wait_for_port(port: int, attempts: int = 600) -> None:
    for _ in range(attempts):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port}")
