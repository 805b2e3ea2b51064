"""bench/sharpness.py: its estimate of each tensor's mean Gauss-Newton diagonal against the exact one formed
from per-token Jacobians (torch.func), and its command line on a checkpoint and at init."""

import json
import math

import numpy
import pytest
import torch
from torch.func import functional_call, jacrev

import train
from bench import layer_report, sharpness
from conftest import tiny_run_args
from model import GPT, GPTConfig


def exact_gauss_newton_diagonal_means(model, x) -> dict[str, float]:
    """G = (1/N) sum_n J_n^T (diag(p_n) - p_n p_n^T) J_n for the mean loss over N tokens, J_n the Jacobian of
    token n's logits; its diagonal is (1/N) sum_n [sum_a p_a J_ai^2 - (sum_a p_a J_ai)^2]."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    logits_of = lambda ps: functional_call(model, ps, (x,))[0].reshape(-1, model.config.vocab_size)  # noqa: E731
    jacobians = jacrev(logits_of)(params)  # name -> (N, vocab, *shape)
    probs = torch.softmax(logits_of(params), dim=-1).double()  # (N, vocab)
    means = {}
    for name, jacobian in jacobians.items():
        j = jacobian.reshape(*probs.shape, -1).double()  # (N, vocab, numel)
        diagonal = (probs[..., None] * j**2).sum(1) - ((probs[..., None] * j).sum(1)) ** 2  # (N, numel)
        means[name] = diagonal.mean(0).mean().item()
    return means


def test_the_estimate_is_the_exact_gauss_newton_diagonal_of_a_tiny_model():
    torch.manual_seed(0)
    config = GPTConfig(block_size=4, vocab_size=11, n_layer=1, n_head=2, n_embd=8, dropout=0.0, bias=True)
    model = GPT(config).double()  # float64: the comparison measures the estimator, not rounding
    for p in model.parameters():  # away from the init, where q and k have no curvature at all
        p.data.add_(0.3 * torch.randn_like(p))
    x = torch.randint(0, 11, (2, 4))
    exact = exact_gauss_newton_diagonal_means(model, x)
    torch.manual_seed(1)
    estimated = sharpness.gauss_newton_diagonal_means(model, [(x, None)], samples=4000)
    assert estimated.keys() == exact.keys()
    for name, value in exact.items():
        # 4000 draws: the mean of N g^2 over a tensor's elements has a relative standard error of 1-3% here
        assert estimated[name] == pytest.approx(value, rel=0.08), name
    block_types = sharpness.summarize(model, estimated)["block_types"]
    numel = {name: p.numel() for name, p in model.named_parameters()}
    qk = [n for n in exact if ".q_proj." in n or ".k_proj." in n]
    assert block_types["QK"]["sharpness"] == pytest.approx(
        sum(estimated[n] * numel[n] for n in qk) / sum(numel[n] for n in qk), rel=1e-12
    )


def test_the_command_reports_a_checkpoint_and_the_measurement_init(tmp_path, token_dir):
    out = tmp_path / "run"
    assert train.main(tiny_run_args(out, token_dir, lr_rule="single", max_steps=2, eval_interval=2)) == 0
    assert sharpness.main(["--out_dir", str(out), "--batches", "2", "--device", "cpu"]) == 0
    result = json.loads((out / "sharpness.json").read_text())
    assert "step 2" in result["source"] and result["batches"] == 2
    assert {t["block_type"] for t in result["tensors"]} == {"Embed", "QK", "FFN", "VO", "Norm"}
    assert "| Embed |" in (out / "sharpness.md").read_text()
    report = tmp_path / "init"
    args = ["--init", "--batches", "1", "--device", "cpu", "--report_dir", str(report)]
    config = [arg for arg in tiny_run_args(tmp_path, token_dir) if not arg.startswith("--out_dir")]
    assert sharpness.main([*args, *config]) == 0
    assert "lwlr's measurement init (fan_out)" in json.loads((report / "sharpness.json").read_text())["source"]


def test_the_layer_report_draws_runs_beside_their_multipliers_and_sharpness(tmp_path, token_dir):
    runs = {rule: tmp_path / rule for rule in ("single", "lwlr")}
    for rule, out in runs.items():
        assert train.main(tiny_run_args(out, token_dir, lr_rule=rule, max_steps=4, layer_stats_interval=2)) == 0
    assert sharpness.main(["--out_dir", str(runs["lwlr"]), "--batches", "1", "--device", "cpu"]) == 0
    figure = tmp_path / "report" / "layers.png"
    sharp = runs["lwlr"] / "sharpness.json"
    text = layer_report.main([*map(str, runs.values()), "--sharpness", str(sharp), "--figure", str(figure)])
    assert figure.stat().st_size > 10_000 and (tmp_path / "report" / "layers.md").read_text() == text
    # the correlation it states, computed here from the two files
    tensors = json.loads(sharp.read_text())["tensors"]
    layers = json.loads((runs["lwlr"] / "lwlr.json").read_text())["layers"]
    lwlr = {layer["name"]: layer["multiplier"] for layer in layers}
    measured = [t for t in tensors if not t["name"].endswith("k_proj.bias")]  # zero gradient by construction
    pairs = [(math.log(t["sharpness"]), math.log(lwlr[t["name"]])) for t in measured]
    r = numpy.corrcoef(*zip(*pairs))[0, 1]
    assert f"log correlation {r:+.2f} over {len(pairs)} tensors" in text
    assert "| adamw single | 2 |" in text and "| adamw lwlr | 4 |" in text
