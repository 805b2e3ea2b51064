"""The rules beside lwlr that name-based tables or lwlr's own measurement make: blockwise (Blockwise LR, ICML
2025) and lwlr_matrices (lwlr among the blocks' matrices, fan_in for the rest)."""

import json

import pytest
import torch

import lwlr
import multipliers
import train
from conftest import tiny_run_args
from model import GPT, GPTConfig
from runtime.errors import UserError
from training import build, checkpoint
from training.config import parse_config

# The paper's table (Wang et al. 2025, section 5): Norm 1, VO 4, FFN 6, QK 8, Embed 10, by the module names of
# this GPT (o_proj is the attention output; c_fc and c_proj the MLP's matrices).
PAPER_RATIOS = {
    "wte": 10,
    "wpe": 10,
    "q_proj": 8,
    "k_proj": 8,
    "c_fc": 6,
    "c_proj": 6,
    "v_proj": 4,
    "o_proj": 4,
    "ln_1": 1,
    "ln_2": 1,
    "ln_f": 1,
}


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("gpt2-tiny"))


def test_blockwise_is_the_papers_table_normalized_to_a_parameter_weighted_mean_of_one():
    model = tiny_gpt()
    params = dict(model.named_parameters())
    raw = {name: PAPER_RATIOS[name.split(".")[-2]] for name in params}
    mean = sum(raw[name] * p.numel() for name, p in params.items()) / sum(p.numel() for p in params.values())
    got = lwlr.baseline_multipliers(model, "blockwise")
    assert got.keys() == params.keys()
    for name, ratio in raw.items():
        assert got[name] == pytest.approx(ratio / mean, rel=1e-12), name
    # the biases take their layer's rate: the attention output's bias 4, the key bias 8
    assert got["transformer.h.1.attn.o_proj.bias"] / got["transformer.h.1.ln_2.weight"] == pytest.approx(4)
    assert got["transformer.h.0.attn.k_proj.bias"] / got["transformer.ln_f.bias"] == pytest.approx(8)


def test_blockwise_names_every_tensor_it_cannot_place():
    model = tiny_gpt()
    model.adapter = torch.nn.Linear(4, 4)  # a module the paper's table has no block type for
    with pytest.raises(lwlr.UnmappedLayersError, match="no block type for adapter.weight, adapter.bias") as raised:
        lwlr.baseline_multipliers(model, "blockwise")
    assert isinstance(raised.value, UserError)  # one `error:` line, never a silent multiplier of 1


def rule_multipliers(tmp_path, token_dir, rule, **overrides):
    """What a run with lr_rule=rule would train with (multipliers.for_config, as train.py calls it)."""
    c = parse_config(tiny_run_args(tmp_path / rule, token_dir, lr_rule=rule, lwlr_T=3, **overrides))
    torch.manual_seed(c.seed)
    model = GPT(build.gpt_config(c))
    lines = []
    found, report = multipliers.for_config(
        c, model, build.token_batches(c, "train", "lwlr", model.config), log=lines.append
    )
    return found, report, model, " ".join(lines)


def test_lwlr_matrices_is_lwlr_on_the_matrices_and_fan_in_elsewhere_each_up_to_one_factor(tmp_path, token_dir):
    cache = tmp_path / "cache"
    measured, _, model, _ = rule_multipliers(tmp_path, token_dir, "lwlr", lwlr_cache_dir=cache)
    fan_in, _, _, _ = rule_multipliers(tmp_path, token_dir, "fan_in")
    hybrid, report, _, said = rule_multipliers(tmp_path, token_dir, "lwlr_matrices", lwlr_cache_dir=cache)
    assert "reusing the multipliers measured" in said  # lwlr's measurement, from lwlr's cache
    numels = {name: p.numel() for name, p in model.named_parameters()}
    matrices = [n for n in numels if n.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj")]
    matrices = [n for n in matrices if n.endswith(".weight")]
    vectors = [n for n in numels if n not in matrices]
    assert len(matrices) == 12 and "transformer.wte.weight" in vectors
    matrix_factor = hybrid[matrices[0]] / measured[matrices[0]]
    vector_factor = hybrid[vectors[0]] / fan_in[vectors[0]]
    for name in matrices:
        assert hybrid[name] / measured[name] == pytest.approx(matrix_factor, rel=1e-12), name
    for name in vectors:
        assert hybrid[name] / fan_in[name] == pytest.approx(vector_factor, rel=1e-12), name
    total = sum(numels.values())
    assert sum(hybrid[n] * numels[n] for n in numels) / total == pytest.approx(1.0, rel=1e-12)
    # lwlr gave the q and k matrices other rates than v (fan_in gives them one): the hybrid keeps lwlr's split
    q, v = (hybrid[f"transformer.h.0.attn.{m}.weight"] for m in ("q_proj", "v_proj"))
    lwlr_q, lwlr_v = (measured[f"transformer.h.0.attn.{m}.weight"] for m in ("q_proj", "v_proj"))
    assert q / v == pytest.approx(lwlr_q / lwlr_v, rel=1e-12)
    assert not q == pytest.approx(v, rel=1e-3)
    # the report says what the run trains with, and how lwlr was measured
    assert {layer["name"]: layer["multiplier"] for layer in report["layers"]} == hybrid
    assert report["rule"] == "lwlr_matrices" and report["T"] == 3
    # the hybrid's own lwlr.json, read back as lwlr_file, gives it again
    own = tmp_path / "own.json"
    own.write_text(json.dumps(report))
    again, _, _, _ = rule_multipliers(tmp_path, token_dir, "lwlr_matrices", lwlr_file=own)
    for name, value in hybrid.items():
        assert again[name] == pytest.approx(value, rel=1e-12), name


@pytest.mark.parametrize("rule", ["blockwise", "lwlr_matrices"])
def test_a_run_with_the_rule_trains_records_it_and_refuses_to_resume_under_another(tmp_path, token_dir, rule, capsys):
    out = tmp_path / "run"
    assert train.main(tiny_run_args(out, token_dir, lr_rule=rule, max_steps=2, eval_interval=2)) == 0
    saved = checkpoint.verify(checkpoint.step_dir(str(out), 2))["multipliers"]
    written = json.loads((out / "lwlr.json").read_text())
    assert saved == {layer["name"]: layer["multiplier"] for layer in written["layers"]}
    assert written["rule"] == rule and (out / "lwlr.png").exists()
    other = "fan_in" if rule == "blockwise" else "lwlr"
    resume = dict(init_from="resume", max_steps=4, allow_resume_changes="max_steps")
    with pytest.raises(UserError, match=f"lr_rule.*{rule}.*{other}"):
        train.main(tiny_run_args(out, token_dir, lr_rule=other, **resume))
