"""parallel=fsdp (runtime/fsdp.py), FSDP2 on CPU with gloo under torchrun: the same steps as DDP and as one
process for every optimizer, half the optimizer state per rank on two, checkpoints that move between
fsdp and one process, lwlr's multipliers as one process measures them, and what fsdp refuses."""

import json

import pytest
import safetensors.torch
import torch

import train
from bench.common import random_token_dir
from conftest import read_log, tiny_run_args, torchrun
from optimizers.registry import OPTIMIZERS
from runtime.ranks import Runtime
from training import build, checkpoint
from training.config import ConfigError, parse_config

CASES = [
    *(f"{name}:torch" for name in OPTIMIZERS),  # every registered optimizer
    "adamw:triton",
    "adam_mini:triton",
    "sgdm_lw:triton",  # the SGD-momentum kernel with its per-tensor step sizes (AdamW-LW's is adamw's)
]


def test_fsdp_on_two_ranks_steps_as_ddp_and_one_process_with_half_the_optimizer_state(tmp_path):
    data, report_path = random_token_dir(96, str(tmp_path / "data"), train_tokens=20_000), tmp_path / "report.json"
    cases = [*CASES, "gauss_newton_curvature"]
    result = torchrun(2, [data, str(report_path), *cases], script="tests/fsdp_worker.py", env={"TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    # LW-AS's curvature on two ranks with half a batch each is one process's on the whole batch (block terms
    # and joint term; their fp32 softmax rounds at 1e-7), under DDP and under fsdp.
    for run, difference in report["gauss_newton_curvature"].items():
        assert difference < 1e-6, (run, difference)
    for case in CASES:
        # float64 on the torch path: a missing or partial reduction shows in the leading digits; the Triton
        # kernels run fp32, where the reduction order is worth 1e-7.
        bound = 1e-10 if case.endswith(":torch") else 1e-5
        for measure in ("worst_relative", "worst_state_relative"):
            for run, difference in report[case][measure].items():  # fsdp, and one process, against DDP
                assert difference < bound, (case, measure, run, difference)
        for run, difference in report[case]["worst_scalar_state_relative"].items():  # LW-AS's, in float32
            assert difference < 1e-5, (case, run, difference)
        # Each tensor's gradient, weight and update RMS (training/layer_stats.py), which under fsdp sum each
        # rank's shards: one process's figures, to the 7 digits a record keeps (the Triton path's fp32 steps).
        for run, difference in report[case]["worst_layer_stats_relative"].items():
            assert difference < (2e-6 if case.endswith(":torch") else 1e-5), (case, run, difference)
        state = report[case]["state_bytes"]  # every tensor's dim 0 splits evenly in two here
        if case.startswith("adam_mini"):  # its few second-moment values per row stay whole on every rank
            assert state["ddp"] / 2 < state["fsdp"] < 0.52 * state["ddp"], (case, state)
        else:
            assert state["fsdp"] * 2 == state["ddp"], (case, state)


def test_fsdp_checkpoints_resume_in_one_process_and_the_reverse_with_lwlr_as_one_process_measures(
    tmp_path, token_dir, capsys
):
    # Muon: its optimizer state is two parts, each cut to the shards on a resume (its AdamW part takes the rest)
    settings = dict(
        lr_rule="lwlr",
        optimizer="muon",
        lr=0.02,
        adamw_lr=1e-3,
        muon_ns_dtype="float32",
        eval_interval=3,
        lr_decay_steps=6,
        allow_resume_changes="max_steps",
    )

    def launch(nproc, out, steps, mode, **more) -> str:  # what the run printed; one process runs here, in process
        args = tiny_run_args(out, token_dir, max_steps=steps, parallel=mode, **settings, **more)
        if nproc == 1:
            capsys.readouterr()
            assert train.main(args) == 0
            return capsys.readouterr().out
        result = torchrun(nproc, args)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    from_fsdp, to_fsdp = tmp_path / "from_fsdp", tmp_path / "to_fsdp"
    said = launch(2, from_fsdp, 3, "fsdp")  # lwlr measured on two fsdp ranks, then resumed in one process
    assert "memory per rank (fsdp, 2 ranks" in said
    assert "resuming a run of 2 processes on 1" in launch(1, from_fsdp, 6, "ddp")
    launch(1, to_fsdp, 3, "ddp")  # lwlr measured in one process, then resumed on two fsdp ranks
    resumed = launch(2, to_fsdp, 6, "fsdp", micro_batch_size=2)  # two micro-steps: no reduce-scatter on the first
    assert "resuming a run of 1 processes on 2" in resumed

    measured = {out: checkpoint.verify(checkpoint.step_dir(str(out), 6))["multipliers"] for out in (from_fsdp, to_fsdp)}
    assert measured[from_fsdp].keys() == measured[to_fsdp].keys()
    for name, value in measured[to_fsdp].items():
        assert measured[from_fsdp][name] == pytest.approx(value, rel=1e-6), name
    # Each is the same 6 steps as a run that never changed mode; so the two end equal.
    a, b = (checkpoint.load_tensors(checkpoint.step_dir(str(out), 6), "model") for out in (from_fsdp, to_fsdp))
    # to_fsdp's was written under fsdp, sharded: the tied embedding stored once and read back as one tensor
    assert b["lm_head.weight"].data_ptr() == b["transformer.wte.weight"].data_ptr()
    for name, tensor in a.items():
        if not name.endswith("k_proj.bias"):  # zero gradient by construction: rounding noise
            torch.testing.assert_close(b[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert [r["loss"] for r in read_log(from_fsdp, "train")] == pytest.approx(
        [r["loss"] for r in read_log(to_fsdp, "train")], rel=1e-5
    )
    # The export an fsdp run ends with: the gathered weights, as its last checkpoint holds them.
    exported = safetensors.torch.load_file(str(to_fsdp / "model.safetensors"))
    final = checkpoint.load_tensors(checkpoint.step_dir(str(to_fsdp), 6), "model")
    assert exported.keys() <= final.keys() and "transformer.h.0.attn.q_proj.weight" in exported
    for name, tensor in exported.items():
        assert torch.equal(tensor, final[name]), name


@pytest.mark.parametrize("curvature", ["exact", "rademacher"])
def test_fsdp_refuses_an_lw_curvature_that_needs_a_double_backward(curvature):
    c = parse_config(["--optimizer=adamw_lw", f"--lw_curvature={curvature}", "--parallel=fsdp", "--lr=1"])
    ranks = Runtime(0, 0, 2, torch.device("cpu"), distributed=True)
    with pytest.raises(ConfigError, match=f"parallel=fsdp with lw_curvature={curvature}: its Hessian-vector"):
        build.check_optimizer(c, ranks)
    # One process holds the whole model: nothing to refuse. gauss_newton runs on shards.
    build.check_optimizer(c, Runtime(0, 0, 1, torch.device("cpu")))
    build.check_optimizer(parse_config(["--optimizer=adamw_lw", "--parallel=fsdp", "--lr=1"]), ranks)
    with pytest.raises(ConfigError, match="parallel"):
        parse_config(["--parallel=zero3"])
