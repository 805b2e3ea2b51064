"""The GPU kit's cheap form, so it cannot rot while no GPU is at hand: its plan fits the GPU machine's
budget and what it sends back, it imports nothing the GPU image lacks, a part writes only under $OUT,
a part over its cap is cut while the next still runs, and the resume check tells a resume from a
restart. The whole rehearsal (`bench/gpu_check.sh --rehearse` on the replica) runs by hand: minutes."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from bench import gpu_kit, gpu_train_check
from conftest import ROOT
from runtime import sources

FILE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # plain file names: a results folder any tool can copy


@pytest.mark.parametrize("kit", list(gpu_kit.PLANS))
def test_each_gpu_plan_fits_eight_minutes_and_one_flat_folder_of_plain_names(kit, tmp_path):
    parts = gpu_kit.PLANS[kit]("python3", str(tmp_path), rehearse=False)
    assert sum(p.predicted_s for p in parts) <= 8 * 60 <= gpu_kit.GPU_BUDGET_S
    assert all(p.predicted_s <= p.cap_s for p in parts)
    out_names = ["summary.json"] + [f"{p.name}.log" for p in parts] + [name for p in parts for name in p.keep.values()]
    assert len(set(out_names)) == len(out_names) and all(FILE_NAME.match(name) for name in out_names)
    assert [p.name for p in gpu_kit.PLANS[kit]("python3", str(tmp_path), rehearse=True)] == [p.name for p in parts]


@pytest.mark.parametrize(
    "kit, reached",
    [
        ("check", {"train.py", "tests/test_optim.py", "bench/bench_train.py", "bench/gpu_train_check.py"}),
        ("science", {"bench/overfit.py"}),
    ],
)
def test_each_kit_imports_only_what_the_gpu_image_has(kit, reached, tmp_path):
    for rehearse in (False, True):
        files = gpu_kit.kit_entry_files(gpu_kit.PLANS[kit]("python3", str(tmp_path), rehearse))
        assert reached <= set(files)
        imported = gpu_kit.third_party_imports(files)
        allowed = set(gpu_kit.IMAGE_MODULES) | set(gpu_kit.WHEEL_MODULES) | set(gpu_kit.OPTIONAL_MODULES)
        assert {name: sorted(where) for name, where in imported.items() if name not in allowed} == {}
        assert {"torch", "triton"} <= set(imported)  # the walk reached the project's modules


def test_the_science_kit_names_the_token_files_to_carry(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_kit, "ROOT", str(tmp_path))  # a checkout without data/shakespeare/*.bin
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert gpu_kit.main(["science", "--rehearse"]) == 2
    assert not (tmp_path / "out").exists()


def test_the_import_walk_follows_project_modules_and_finds_a_missing_package(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "ROOT", str(tmp_path))
    (tmp_path / "entry.py").write_text("import os\nimport helper\n")
    (tmp_path / "helper.py").write_text("def f():\n    import datasets\n    from numpy import linalg\n")
    assert gpu_kit.third_party_imports(["entry.py"]) == {"datasets": {"helper.py"}, "numpy": {"helper.py"}}


def out_files(out):
    return sorted(
        os.path.relpath(os.path.join(folder, name), out) for folder, _, names in os.walk(out) for name in names
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_without_a_gpu_the_kit_refuses_unless_rehearsing(tmp_path):
    result = subprocess.run(
        ["bash", "bench/gpu_check.sh"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OUT": str(tmp_path)},
    )
    assert result.returncode == 1 and "torch sees no CUDA device" in result.stderr and "--rehearse" in result.stderr
    assert out_files(tmp_path) == []


def test_a_rehearsed_part_writes_its_figures_only_under_out(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--rehearse", "--parts=environment"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OUT": str(out), "PYTHON": sys.executable},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert out_files(out) == ["environment.log", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "rehearsal" and summary["device"] and summary["commit"] and summary["peer_libraries"]
    part = summary["parts"]["environment"]
    assert part["status"] == "passed" and part["exit_codes"] == [0]
    figures = {f["name"]: f for f in part["figures"]}
    assert figures["device-to-device copy bandwidth (read + write)"]["unit"] == "GB/s"
    assert figures["device-to-device copy bandwidth (read + write)"]["value"] > 0
    assert all(set(f) == {"name", "value", "unit"} for f in part["figures"])


def test_a_part_over_its_cap_is_cut_and_the_next_still_runs(tmp_path):
    python = sys.executable
    parts = [
        gpu_kit.Part(
            "slow",
            "sleeps past its cap",
            [
                [python, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                [python, "-c", "print('never')"],
            ],
            cap_s=2,
        ),
        gpu_kit.Part("quick", "passes", [[python, "-c", "print('ok')"]], cap_s=30),
    ]
    env = {**os.environ, "PYTHON": python}
    code = gpu_kit.run_plan("test", parts, str(tmp_path / "out"), str(tmp_path / "work"), env, budget=60, rehearse=True)
    assert code == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["parts"]["slow"]["status"] == "cut" and summary["parts"]["slow"]["exit_codes"] == [None]
    assert summary["parts"]["quick"]["status"] == "passed"
    log = (tmp_path / "out" / "slow.log").read_text()
    assert "started" in log and "# cut after" in log and "# not run, no time left" in log
    assert out_files(tmp_path / "out") == ["quick.log", "slow.log", "summary.json"]


def test_the_resume_check_measures_the_deviation_against_the_second_half_update():
    half, uninterrupted = {"w": torch.zeros(4)}, {"w": torch.full((4,), 2.0)}
    assert gpu_train_check.deviation({"w": torch.full((4,), 2.0)}, uninterrupted, half) == (True, 0.0)
    equal, deviation = gpu_train_check.deviation({"w": torch.tensor([2.0, 2.0, 2.0, 3.0])}, uninterrupted, half)
    assert not equal and deviation == pytest.approx(1 / 4)  # |(0, 0, 0, 1)| / |(2, 2, 2, 2)|


def test_a_resumed_cpu_run_ends_bitwise_equal_to_the_uninterrupted_one(tmp_path):
    code = gpu_train_check.main(
        [
            "--device=cpu",
            "--optimizers",
            "adamw",
            "--compile=false",
            "--dtype=float32",
            "--vocab_size=64",
            "--steps=4",
            f"--out={tmp_path}",
        ]
    )
    record = json.loads((tmp_path / "train_check.json").read_text())["runs"][0]
    assert code == 0 and record["passed"] and record["bitwise_equal"] and record["resumed_at"] == 2
    assert record["checkpoints"] == ["step-00000002", "step-00000004"]


def test_the_kits_pytest_runs_without_pytest_xdist(tmp_path):
    """pyproject.toml's addopts asks for pytest-xdist's workers; a bare GPU image has pytest alone."""
    pytest_runs = []
    for kit, plan in gpu_kit.PLANS.items():
        for rehearse in (False, True):
            for part in plan("python3", str(tmp_path), rehearse):
                pytest_runs += [command for command in part.commands if command[1:3] == ["-m", "pytest"]]
    assert len(pytest_runs) == 2  # the check's correctness part, on a GPU and rehearsed
    for command in pytest_runs:
        assert command[command.index("addopts=") - 1] == "-o"
