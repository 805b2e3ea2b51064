"""training/layer_stats.py: each tensor's gradient, weight and update RMS of one step against the same figures
computed here from the gradients the optimizer received and two copies of the weights, for AdamW on the
torch and Triton paths and for Muon; the weight decay is part of the update; what a run writes."""

import json

import pytest
import torch

import train
from bench.common import fresh_trainer
from conftest import tiny_run_args
from training.layer_stats import CPU_CHUNK, FIGURES, LayerStats, by_kind, sum_of_squares


def rms(t: torch.Tensor) -> float:
    return t.double().pow(2).mean().sqrt().item()


@pytest.mark.parametrize(
    "optimizer, backend", [("adamw", "torch"), ("adamw", "triton"), ("muon", "torch")]
)
def test_one_steps_figures_are_those_of_its_gradients_and_two_copies_of_the_weights(token_dir, optimizer, backend):
    trainer = fresh_trainer(
        dict(
            data_dir=token_dir,
            model="gpt2-tiny",
            block_size=32,
            micro_batch_size=4,
            tokens_per_step=256,
            max_steps=4,
            warmup_steps=1,
            device="cpu",
            dtype="float32",
            compile="false",
            optimizer=optimizer,
            optimizer_backend=backend,
            lr=1e-2,
            weight_decay=10.0,  # large: a recorded update without the decay would be far off
            lr_rule="fan_in",  # a multiplier per tensor, scaling its decay too
            lwlr_cache_dir="none",
            muon_ns_dtype="float32",
        ),
        torch.device("cpu"),
    )
    params = dict(trainer.raw_model.named_parameters())
    seen = {}
    step_of_the_optimizer = trainer.optimizer.step

    def spy(*args, **kwargs):  # what the optimizer receives, as it receives it
        seen["grads"] = {name: p.grad.detach().clone() for name, p in params.items()}
        seen["before"] = {name: p.detach().clone() for name, p in params.items()}
        return step_of_the_optimizer(*args, **kwargs)

    trainer.optimizer.step = spy
    trainer.step(0)  # Adam's second step has state; Muon's momentum too
    record = trainer.step(1, LayerStats(trainer.raw_model))[4]
    assert record["step"] == 2 and record["names"] == list(params)
    for i, name in enumerate(record["names"]):
        after, before, grad = params[name].detach(), seen["before"][name], seen["grads"][name]
        expected = (rms(grad), rms(before), rms(after - before), rms(after - before) / rms(before))
        for figure, value in zip(FIGURES, expected):
            assert record[figure][i] == pytest.approx(value, rel=1e-5, abs=1e-30), (name, figure)
    # The decay is in the update: lr * multiplier * 10 * w per step. Without it a decayed matrix's update
    # RMS would differ by more than the tolerance above.
    group_of = {name: group for group in trainer.optimizer.param_groups for name in group["names"]}
    name = "transformer.h.0.mlp.c_fc.weight"
    group = group_of[name]
    decay = group["lr"] * group["multiplier"] * group["weight_decay"] * seen["before"][name]
    assert group["weight_decay"] > 0
    undecayed = rms(params[name].detach() - seen["before"][name] + decay)
    recorded = record["update_rms"][record["names"].index(name)]
    assert abs(undecayed - recorded) > 1e-3 * recorded


def test_a_sum_of_squares_over_chunks_is_float64s_to_float32s_precision():
    # Two and a half chunks: the short last one counts; a bf16 tensor sums in fp32.
    g = torch.Generator().manual_seed(0)
    values = torch.randn(5 * CPU_CHUNK // 2, generator=g) * torch.linspace(0.01, 10, 5 * CPU_CHUNK // 2)
    for t in (values, values.view(-1, 5), values.bfloat16()):
        exact = t.double().square().sum().item()
        assert sum_of_squares(t).dtype == torch.float32
        assert sum_of_squares(t).item() == pytest.approx(exact, rel=1e-6)
    assert sum_of_squares(torch.empty(0)).item() == 0.0  # an empty fsdp shard


def test_the_loggers_summary_is_each_kinds_median():
    record = {
        "names": ["transformer.h.0.attn.q_proj.weight", "transformer.h.1.attn.q_proj.weight", "x.bias"],
        "update_to_weight": [1e-3, 3e-3, 5.0],
        "grad_rms": [0.1, 0.2, 7.0],
    }
    summary = by_kind(record)
    assert summary["q/update_to_weight"] == 3e-3 and summary["bias/grad_rms"] == 7.0


def test_a_run_writes_one_record_per_interval(tmp_path, token_dir):
    out = tmp_path / "run"
    assert train.main(tiny_run_args(out, token_dir, max_steps=6, layer_stats_interval=3)) == 0
    records = [json.loads(line) for line in (out / "layers.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6]
    assert all(len(r[figure]) == len(r["names"]) for r in records for figure in FIGURES)
    off = tmp_path / "off"
    assert train.main(tiny_run_args(off, token_dir, max_steps=3, layer_stats_interval=0)) == 0
    assert not (off / "layers.jsonl").exists()
