"""The kernels' self-check (self_check.py), run on a CPU through Triton's interpreter: a planted fault in
any one kernel is caught, sends the run to the torch path under optimizer_backend=auto and stops it under
triton; a pass is cached, and a change to the kernels' source checks again."""

import json
import subprocess
import sys

import pytest
import torch

import train
from conftest import ROOT, root_on_path, tiny_run_args
from optimizers import adam_mini, adamw, base, lion, lwas, self_check, sophiag
from training import build, checkpoint
from training.config import TrainConfig

CPU = torch.device("cpu")


def make_for(optimizer: str):
    c = TrainConfig(optimizer=optimizer, kernel_check="force")
    return lambda groups, backend: build.build_optimizer(c, groups, self_check.N_HEAD, backend)


def plant(monkeypatch, kernel, fault: str) -> list:
    """Every launch of `kernel` runs twice ("twice": a wrong update) or raises ("raise"); returns the launch log."""
    launched, real = [], base.launch_kernel

    def faulty(k, grid, *args, **meta):
        launched.append(k)
        if k is kernel and fault == "raise":
            raise RuntimeError("planted launch error")
        real(k, grid, *args, **meta)
        if k is kernel and fault == "twice":
            real(k, grid, *args, **meta)

    monkeypatch.setattr(base, "launch_kernel", faulty)
    return launched


@pytest.mark.parametrize(
    "optimizer, kernel",
    [
        ("adamw", adamw.adamw_kernel),
        ("lion", lion.lion_kernel),
        ("sophiag", sophiag.sophiag_kernel),
        ("sophiag", sophiag.ema_of_square_kernel),
        ("adam_mini", adam_mini.block_mean_square_kernel),
        ("adam_mini", adam_mini.adam_mini_kernel),
        ("sgdm_lw", lwas.sgd_momentum_kernel),
        ("adamw_lw", adamw.adamw_kernel),
    ],
)
def test_a_wrong_update_in_any_one_kernel_is_caught(optimizer, kernel, monkeypatch, tmp_path):
    assert self_check.check(optimizer, make_for(optimizer), CPU, str(tmp_path / "clean"))[0]
    launched = plant(monkeypatch, kernel, "twice")
    passed, finding = self_check.check(optimizer, make_for(optimizer), CPU, str(tmp_path / "planted"))
    assert kernel in launched and not passed
    assert (
        f"{optimizer}'s Triton kernels ({self_check.kernel_names(optimizer)}) differ from the torch path by up to"
        in finding
    )
    assert "beyond the tolerance rtol 1e-05 / atol 1e-06" in finding


def test_a_launch_error_is_caught_and_named(monkeypatch, tmp_path):
    plant(monkeypatch, lion.lion_kernel, "raise")
    passed, finding = self_check.check("lion", make_for("lion"), CPU, str(tmp_path))
    assert (
        not passed
        and finding == "lion's Triton kernels (lion_kernel) failed to run: RuntimeError: planted launch error"
    )


def test_a_pass_is_cached_and_a_change_to_the_kernels_source_checks_again(monkeypatch, tmp_path):
    source = tmp_path / "kernels.py"
    source.write_text("# the kernels, version 1\n")
    monkeypatch.setattr(self_check, "source_files", lambda optimizer: [str(source)])
    launched = plant(monkeypatch, None, "none")
    passed, finding = self_check.check("lion", make_for("lion"), CPU, str(tmp_path / "cache"))
    checked = len(launched)  # one launch per step, two steps, two sets of tensors
    assert passed and finding.startswith("self-check passed in") and checked == 4
    passed, finding = self_check.check("lion", make_for("lion"), CPU, str(tmp_path / "cache"))
    assert (
        passed
        and finding
        == f"self-check passed before on this machine (cached in {tmp_path / 'cache' / 'kernel-check.json'})"
    )
    assert len(launched) == checked  # nothing launched
    source.write_text("# the kernels, version 2\n")
    assert self_check.check("lion", make_for("lion"), CPU, str(tmp_path / "cache"))[0] and len(launched) == 2 * checked


def test_a_failure_is_not_cached(monkeypatch, tmp_path):
    plant(monkeypatch, lion.lion_kernel, "twice")
    assert not self_check.check("lion", make_for("lion"), CPU, str(tmp_path))[0]
    monkeypatch.undo()
    assert self_check.check("lion", make_for("lion"), CPU, str(tmp_path))[1].startswith("self-check passed in")


def test_a_corrupt_or_unwritable_cache_is_a_warning_never_an_error(tmp_path):
    said = []
    (tmp_path / "kernel-check.json").write_text("{ not json")
    passed, finding = self_check.check("lion", make_for("lion"), CPU, str(tmp_path), say=said.append)
    assert passed and finding.startswith("self-check passed in")
    assert len(said) == 1 and said[0].startswith(
        f"warning: kernel self-check cache {tmp_path / 'kernel-check.json'} is unreadable"
    )
    (tmp_path / "kernel-check.json").write_text(json.dumps({self_check.cache_key(CPU, "lion"): "not a record"}))
    assert self_check.check("lion", make_for("lion"), CPU, str(tmp_path))[1].startswith("self-check passed in")
    assert self_check.check("lion", make_for("lion"), CPU, str(tmp_path))[1].startswith("self-check passed before")
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    said.clear()
    passed, _ = self_check.check("lion", make_for("lion"), CPU, str(blocked / "cache"), say=said.append)
    assert passed and len(said) == 1
    assert said[0].startswith(
        f"warning: cannot write the kernel self-check cache {blocked / 'cache' / 'kernel-check.json'} ("
    )
    assert said[0].endswith("); the next run checks again")


def test_each_backend_choice_says_why(monkeypatch, tmp_path):
    def choose(**settings):
        c = TrainConfig(**settings)
        return self_check.choose_backend(c, CPU, make_for(c.optimizer), str(tmp_path))

    assert choose(optimizer="adamw_torch") == ("torch", "adamw_torch has no Triton path")
    assert choose(optimizer_backend="torch", kernel_check="force") == ("torch", "optimizer_backend=torch")
    assert choose() == ("torch", "optimizer_backend=auto on a cpu: the Triton kernels run on CUDA")
    assert choose(optimizer_backend="triton") == (
        "triton",
        "optimizer_backend=triton on the CPU through Triton's interpreter; kernel_check=auto, not checked",
    )
    backend, why = choose(optimizer="lion", kernel_check="force")
    assert backend == "triton" and why.startswith(
        "optimizer_backend=auto on the CPU through Triton's interpreter; self-check passed"
    )
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(self_check.KernelCheckError, match="optimizer_backend=triton needs a CUDA device"):
        choose(optimizer_backend="triton")


def test_a_run_whose_kernel_fails_the_check_trains_on_the_torch_path_to_the_same_weights(
    tmp_path, token_dir, monkeypatch, capsys
):
    reference = tmp_path / "torch"
    assert train.main(tiny_run_args(reference, token_dir, max_steps=3, eval_interval=3, optimizer_backend="torch")) == 0
    plant(monkeypatch, adamw.adamw_kernel, "twice")
    checked = tmp_path / "checked"
    assert train.main(tiny_run_args(checked, token_dir, max_steps=3, eval_interval=3, kernel_check="force")) == 0
    printed = capsys.readouterr().out
    warning = [line for line in printed.splitlines() if line.startswith("warning: kernel self-check:")]
    assert (
        len(warning) == 1
        and "differ from the torch path by up to" in warning[0]
        and "uses the torch path instead" in warning[0]
    )
    assert "report it" in warning[0]
    assert (
        "optimizer: adamw on the torch path (optimizer_backend=auto, the torch path: the kernel self-check failed"
        in printed
    )
    a, b = (checkpoint.load_tensors(checkpoint.step_dir(str(out), 3), "model") for out in (reference, checked))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_optimizer_backend_triton_stops_before_the_first_step_and_leaves_out_dir_alone(tmp_path, token_dir):
    # A kernel that raises, planted through a wrapper script: the run is a subprocess so its exit code is real.
    script = tmp_path / "planted.py"
    script.write_text(
        "import sys, train\n"
        "from optimizers import adamw, base\n"
        "from runtime.exits import run_main\n"
        "real = base.launch_kernel\n"
        "def faulty(kernel, grid, *args, **meta):\n"
        "    if kernel is adamw.adamw_kernel:\n"
        "        raise RuntimeError('planted launch error')\n"
        "    real(kernel, grid, *args, **meta)\n"
        "base.launch_kernel = faulty\n"
        "run_main(lambda: train.main(sys.argv[1:]))\n"
    )
    out = tmp_path / "run"
    args = tiny_run_args(out, token_dir, optimizer_backend="triton", kernel_check="force")
    result = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=root_on_path(TRITON_INTERPRET="1"),
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(
        "error: kernel self-check: adamw's Triton kernels"
    )
    assert "planted launch error" in result.stderr and "optimizer_backend=auto" in result.stderr
    assert not out.exists()
