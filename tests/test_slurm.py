"""scripts/slurm.sbatch without Slurm: stub srun, scontrol and python first on PATH record what the script
runs. srun's stub plays a two-node step, running its task once per node with that node's SLURM_NODEID, as
slurmstepd would; python's stub records its arguments and exits with the code the test gives it."""

import json
import os
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT
from runtime.exits import EXIT_PREEMPTED

SCRIPT = os.path.join(ROOT, "scripts", "slurm.sbatch")
JOB_ID = "4242"
TRAIN_ARGS = ["config/train_gpt2.py", "--parallel=fsdp", "--out_dir=out dir with space"]

SRUN = r"""#!/usr/bin/env bash
{record} srun "$@"
while [[ $1 == -* ]]; do shift; done  # srun's options; the task's command follows
code=0
for node in 0 1; do  # srun exits with its tasks' highest code
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" || { rc=$?; (( rc > code )) && code=$rc; }
done
exit $code
"""
SCONTROL = r"""#!/usr/bin/env bash
{record} scontrol "$@"
if [[ $1 == show && $2 == hostnames ]]; then printf 'hostA\nhostB\n'; fi
if [[ $1 == requeue ]]; then exit "${STUB_REQUEUE_EXIT:-0}"; fi
"""
PYTHON = r"""#!/usr/bin/env bash
{record} python "$@"
exit "$STUB_PYTHON_EXIT"
"""
# Appends one JSON line, [name, arg, ...], to $STUB_CALLS: every call of every stub, in order.
RECORD = "import json, os, sys; open(os.environ['STUB_CALLS'], 'a').write(json.dumps(sys.argv[1:]) + '\\n')"


@pytest.fixture
def stub_bin(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    record = f"{shlex.quote(sys.executable)} -c {shlex.quote(RECORD)}"
    for name, text in [("srun", SRUN), ("scontrol", SCONTROL), ("python", PYTHON)]:
        path = folder / name
        path.write_text(text.replace("{record}", record))
        path.chmod(0o755)
    return folder


def submit(stub_bin, python_exit, *args, **env):
    """The batch script as Slurm's batch step runs it on the first of two nodes of 4 GPUs each: its return
    code and every stub call, [name, arg, ...] each."""
    calls = stub_bin.parent / "calls.jsonl"
    calls.unlink(missing_ok=True)
    # This machine's own Slurm job, if the tests run in one, and the script's settings stay out.
    settings = ("GPUS_PER_NODE", "PORT")
    outside = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_")) and k not in settings}
    batch_step = dict(
        SLURM_JOB_ID=JOB_ID,
        SLURM_JOB_NODELIST="hostA,hostB",
        SLURM_NNODES="2",
        SLURM_GPUS_ON_NODE="4",
        SLURM_NODEID="0",  # the batch step's own: a --node_rank read here rather than in each task is 0 twice
    )
    result = subprocess.run(
        ["bash", SCRIPT, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={
            **outside,
            **batch_step,
            "PATH": f"{stub_bin}{os.pathsep}{os.environ['PATH']}",
            "STUB_CALLS": str(calls),
            "STUB_PYTHON_EXIT": str(python_exit),
            **env,
        },
    )
    lines = calls.read_text().splitlines() if calls.exists() else []
    return result, [json.loads(line) for line in lines]


def launches(calls):
    return [call[1:] for call in calls if call[0] == "python"]


def torchrun_line(node_rank, nproc=4, endpoint="hostA:29500"):
    return [
        "launch.py",
        "--nnodes=2",
        f"--node_rank={node_rank}",
        f"--nproc_per_node={nproc}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={endpoint}",
        f"--rdzv_id={JOB_ID}",
        "train.py",
        "config/train_gpt2.py",
        "--parallel=fsdp",
        "--out_dir=out dir with space",
    ]


def test_one_launch_per_node_with_its_own_node_rank_and_the_arguments_intact(stub_bin):
    result, calls = submit(stub_bin, 0, *TRAIN_ARGS)
    assert result.returncode == 0, result.stderr
    assert launches(calls) == [torchrun_line(0), torchrun_line(1)]
    assert [call[0] for call in calls].count("srun") == 1
    assert "--ntasks-per-node=1" in next(call for call in calls if call[0] == "srun")


def test_gpus_per_node_and_port_override_slurms_figures(stub_bin):
    result, calls = submit(stub_bin, 0, *TRAIN_ARGS, GPUS_PER_NODE="2", PORT="31234")
    assert result.returncode == 0, result.stderr
    assert launches(calls) == [torchrun_line(n, nproc=2, endpoint="hostA:31234") for n in (0, 1)]


@pytest.mark.parametrize(
    "python_exit, script_exit, requeued",
    [(EXIT_PREEMPTED, 0, True), (0, 0, False), (2, 2, False), (74, 74, False)],
)
def test_a_clean_stop_requeues_the_job_and_every_other_code_passes_through(
    stub_bin, python_exit, script_exit, requeued
):
    result, calls = submit(stub_bin, python_exit, *TRAIN_ARGS)
    assert result.returncode == script_exit, result.stderr
    assert len(launches(calls)) == 2
    requeues = [call for call in calls if call[:2] == ["scontrol", "requeue"]]
    assert requeues == ([["scontrol", "requeue", JOB_ID]] if requeued else [])


def test_a_failed_requeue_exits_75_so_the_job_shows_it_must_be_resubmitted(stub_bin):
    result, calls = submit(stub_bin, EXIT_PREEMPTED, *TRAIN_ARGS, STUB_REQUEUE_EXIT="1")
    assert result.returncode == EXIT_PREEMPTED
    assert ["scontrol", "requeue", JOB_ID] in calls and "requeue failed" in result.stderr


def test_outside_a_slurm_job_the_script_refuses_before_running_anything(stub_bin):
    result, calls = submit(stub_bin, 0, *TRAIN_ARGS, SLURM_JOB_ID="")
    assert result.returncode == 2 and "sbatch" in result.stderr
    assert calls == []


def sbatch_options(path) -> list[str]:
    """The options sbatch reads from a script: its #SBATCH lines before the first command."""
    options = []
    with open(path) as f:
        for line in f.read().splitlines()[1:]:  # past the #! line
            if line.strip() and not line.startswith("#"):
                break
            if line.startswith("#SBATCH"):
                options += line.removeprefix("#SBATCH").split()
    return options


def test_the_header_asks_for_the_early_signal_a_requeue_and_one_task_a_node():
    options = sbatch_options(SCRIPT)
    for option in ["--signal=USR1@90", "--requeue", "--open-mode=append", "--ntasks-per-node=1"]:
        assert option in options
    assert any(option.startswith("--time=") for option in options)


def test_the_header_reader_stops_at_the_first_command(tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text("#!/bin/bash\n# about\n#SBATCH --nodes=2\n\necho hi\n#SBATCH --requeue\n")
    assert sbatch_options(script) == ["--nodes=2"]
