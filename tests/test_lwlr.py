import copy
import json
import math

import pytest
import torch

import lwlr
import multipliers
import train
from conftest import TEST_DEVICE, tiny_run_args, torchrun
from model import GPT, LAYER_ROLES, GPTConfig
from optimizers import base
from training import build
from training.config import ConfigError, parse_config


class TwoLayers(torch.nn.Module):
    """loss = sum(a * x) + c * sum(b * x): b's gradient is exactly c times a's."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.a = torch.nn.Parameter(torch.randn(4, 3))
        self.b = torch.nn.Parameter(torch.randn(4, 3))
        self.big = torch.nn.Parameter(torch.randn(10, 3))  # gradient x, weights the normalization

    def forward(self, x, y=None):
        return None, (self.a * x[:4]).sum() + self.c * (self.b * x[:4]).sum() + (self.big * x).sum()


def toy_batches(T):
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(10, 3, generator=generator), None) for _ in range(T)]


# Powers of two scale fp32 gradients exactly, so the ratio is exact to float64 rounding; 37.5 rounds
# each gradient element in fp32 (relative 6e-8).
@pytest.mark.parametrize("c, tolerance", [(4.0, 1e-12), (2.0**-6, 1e-12), (32.0, 1e-12), (37.5, 1e-6)])
def test_a_layer_with_c_times_the_gradient_gets_c_to_the_minus_half(c, tolerance):
    multipliers = lwlr.compute_multipliers(TwoLayers(c), toy_batches(5), T=5, init="model")
    assert multipliers["b"] / multipliers["a"] == pytest.approx(c**-0.5, rel=tolerance)
    ratio_power_1 = lwlr.compute_multipliers(TwoLayers(c), toy_batches(5), T=5, init="model", power=1.0)
    assert ratio_power_1["b"] / ratio_power_1["a"] == pytest.approx(1 / c, rel=tolerance)


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("gpt2-tiny"))


def gpt_batches(T, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [tuple(torch.randint(0, 50257, (2, 2, 16), generator=generator)) for _ in range(T)]


def test_gpt_multipliers_are_normalized_and_cover_q_k_v_separately():
    model = tiny_gpt()
    multipliers = lwlr.compute_multipliers(model, gpt_batches(3), T=3)
    numels = lwlr.numels_of(model)
    assert set(multipliers) == set(numels)
    mean = sum(multipliers[n] * numels[n] for n in numels) / sum(numels.values())
    assert mean == pytest.approx(1.0, abs=1e-6)
    q, k, v = (multipliers[f"transformer.h.0.attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj"))
    assert len({q, k, v}) == 3
    assert multipliers["transformer.h.0.attn.k_proj.bias"] == 1.0  # its gradient is zero by construction


@pytest.mark.skipif(TEST_DEVICE == "cpu", reason="compares LWLR_TEST_DEVICE (cuda, bench/gpu_check.sh) with the CPU")
def test_the_measurement_on_the_test_device_equals_the_cpu_one():
    """Measured at the model's own init (the fan_out re-init draws from the device's own RNG, so the two
    would measure different networks): fp32 on both, other kernels and reduction orders. The largest
    relative difference seen in mean |g| is about 1e-5; a multiplier is its inverse square root."""
    cpu = lwlr.measure_grad_mean_abs(tiny_gpt(), gpt_batches(4), T=4, init="model")
    on_device = lwlr.measure_grad_mean_abs(
        tiny_gpt().to(TEST_DEVICE),
        [(x.to(TEST_DEVICE), y.to(TEST_DEVICE)) for x, y in gpt_batches(4)],
        T=4,
        init="model",
    )
    assert set(on_device) == set(cpu)
    for name, g in cpu.items():
        if not lwlr.unmeasurable(name):
            assert on_device[name] == pytest.approx(g, rel=1e-4), name


def test_the_key_bias_gradient_is_rounding_noise():
    grads = lwlr.measure_grad_mean_abs(tiny_gpt(), gpt_batches(2), T=2)
    real = [g for name, g in grads.items() if not lwlr.unmeasurable(name)]
    assert grads["transformer.h.0.attn.k_proj.bias"] < 1e-4 * min(real)


class ScaledLoss(torch.nn.Module):
    def __init__(self, model, scale):
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x, y):
        logits, loss = self.model(x, y)
        return logits, loss * self.scale


@pytest.mark.parametrize("scale, tolerance", [(8.0, 1e-12), (3.0, 1e-5)])  # 8 scales fp32 gradients exactly
def test_invariant_to_scaling_the_loss(scale, tolerance):
    from model import init_weights

    model = tiny_gpt()
    init_weights(model, "fan_out")
    plain = lwlr.compute_multipliers(copy.deepcopy(model), gpt_batches(2), T=2, init="model")
    scaled = lwlr.compute_multipliers(ScaledLoss(copy.deepcopy(model), scale), gpt_batches(2), T=2, init="model")
    for name, value in plain.items():
        assert scaled[f"model.{name}"] == pytest.approx(value, rel=tolerance)


def test_baselines_follow_their_formulas():
    model = GPT(GPTConfig.from_preset("gpt2-tiny", n_layer=3))
    numels = lwlr.numels_of(model)
    for rule in ("depth_increasing", "depth_decreasing", "fan_in"):
        m = lwlr.baseline_multipliers(model, rule)
        assert sum(m[n] * numels[n] for n in numels) / sum(numels.values()) == pytest.approx(1.0, abs=1e-9)
    inc = lwlr.baseline_multipliers(model, "depth_increasing")
    first, middle, last = (inc[f"transformer.h.{i}.mlp.c_fc.weight"] for i in range(3))
    assert first / last == pytest.approx(0.1) and middle / last == pytest.approx(0.55)
    assert inc["transformer.wte.weight"] == first and inc["transformer.ln_f.weight"] == last
    dec = lwlr.baseline_multipliers(model, "depth_decreasing")
    assert dec["transformer.h.0.attn.q_proj.weight"] / dec["transformer.h.2.attn.q_proj.weight"] == pytest.approx(2.0)
    fan = lwlr.baseline_multipliers(model, "fan_in")
    # c_fc sees n_embd = 32 inputs, c_proj 4 * 32: rates 1/sqrt(32) and 1/sqrt(128)
    assert fan["transformer.h.0.mlp.c_fc.weight"] / fan["transformer.h.0.mlp.c_proj.weight"] == pytest.approx(2.0)
    assert fan["transformer.wte.weight"] == fan["transformer.h.0.ln_1.weight"] == fan["transformer.h.0.mlp.c_fc.bias"]


def test_param_groups_scale_or_keep_the_decay():
    model = tiny_gpt()
    multipliers = {name: 2.0 if "q_proj" in name else 0.5 for name in lwlr.numels_of(model)}
    scaled = base.param_groups(model, multipliers, weight_decay=0.1)
    kept = base.param_groups(model, multipliers, weight_decay=0.1, scale_decay=False)
    assert {(g["multiplier"], g["weight_decay"]) for g in scaled} == {(2.0, 0.1), (2.0, 0.0), (0.5, 0.1), (0.5, 0.0)}
    for group in kept:  # lr * multiplier * weight_decay stays lr * 0.1 for decayed tensors
        assert group["multiplier"] * group["weight_decay"] in (pytest.approx(0.1), 0.0)
    assert len(base.param_groups(model, None, 0.1)) == 2


def test_bad_input_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="T must be an integer >= 1"):
        lwlr.compute_multipliers(tiny_gpt(), gpt_batches(1), T=0)
    with pytest.raises(ValueError, match="needs 3 batches .* gave 1"):
        lwlr.compute_multipliers(tiny_gpt(), gpt_batches(1), T=3)
    unused = TwoLayers(1.0)
    unused.register_parameter("unused", torch.nn.Parameter(torch.ones(2)))
    with pytest.raises(ValueError, match="zero or not finite for unused"):
        lwlr.compute_multipliers(unused, toy_batches(2), T=2, init="model")
    nan_model = TwoLayers(float("nan"))
    with pytest.raises(ValueError, match="zero or not finite for b"):
        lwlr.compute_multipliers(nan_model, toy_batches(2), T=2, init="model")
    model = tiny_gpt()
    layers = [{"name": n, "shape": list(p.shape), "multiplier": 1.0} for n, p in model.named_parameters()]
    path = tmp_path / "lwlr.json"
    path.write_text(
        json.dumps(
            {"layers": layers + [{"name": "transformer.h.9.attn.q_proj.weight", "shape": [64, 64], "multiplier": 1.0}]}
        )
    )
    with pytest.raises(
        multipliers.LwlrFileError,
        match="lwlr.json: layer\\(s\\) transformer.h.9.attn.q_proj.weight are not in the model",
    ):
        multipliers.load_multipliers(str(path), model)
    path.write_text(json.dumps({"layers": layers[1:]}))
    with pytest.raises(
        multipliers.LwlrFileError, match="no multiplier for the model's layer\\(s\\) transformer.wte.weight"
    ):
        multipliers.load_multipliers(str(path), model)
    with pytest.raises(ConfigError, match="lr_rule='adaptive'"):
        multipliers.for_config(parse_config(["--lr_rule=adaptive"]), model, None)


def test_compare_reports_percent_deviation(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"layers": [{"name": "x", "multiplier": 1.1}, {"name": "y", "multiplier": 2.0}]}))
    b.write_text(json.dumps({"layers": [{"name": "x", "multiplier": 1.0}, {"name": "y", "multiplier": 2.0}]}))
    worst, mean = multipliers.compare(str(a), str(b))
    assert worst == pytest.approx(10.0) and mean == pytest.approx(5.0)


def cli_args(out_dir, token_dir, T=4):
    return [
        f"--out_dir={out_dir}",
        f"--data_dir={token_dir}",
        "--model=gpt2-tiny",
        "--block_size=32",
        "--micro_batch_size=2",
        f"--lwlr_T={T}",
        "--device=cpu",
        "--lwlr_cache_dir=none",
    ]


def test_cli_writes_json_and_plot_and_is_reproducible(tmp_path, token_dir):
    first, second = tmp_path / "first", tmp_path / "second"
    assert multipliers.main(cli_args(first, token_dir)) == 0
    assert multipliers.main(cli_args(second, token_dir)) == 0
    assert (first / "lwlr.json").read_bytes() == (second / "lwlr.json").read_bytes()
    data = json.loads((first / "lwlr.json").read_text())
    assert (data["T"], data["init"], data["power"], data["model"], data["seed"]) == (
        4,
        "fan_out",
        0.5,
        "gpt2-tiny",
        1337,
    )
    layer = data["layers"][0]
    assert set(layer) == {"name", "shape", "numel", "grad_mean_abs", "multiplier"}
    # The plot: every layer once, at its place in model order, with its multiplier; the Linear panel holds
    # the q, k, v, attention-output and MLP weights alone (2 blocks x 6 of gpt2-tiny), in their order.
    drawn = multipliers.plot(data, str(tmp_path / "again.png"))
    everything = sorted(point for points in drawn["every tensor"].values() for point in points)
    assert everything == [(i, layer["multiplier"]) for i, layer in enumerate(data["layers"])]
    assert [point[1] for point in drawn["every tensor"]["q"]] == [
        layer["multiplier"] for layer in data["layers"] if layer["name"].endswith("attn.q_proj.weight")
    ]
    linear = sorted(point for points in drawn["the blocks' weight matrices"].values() for point in points)
    assert len(linear) == 12
    assert set(drawn["the blocks' weight matrices"]) == {"q", "k", "v", "attn_out", "mlp_in", "mlp_out"}
    # a colour for every kind of layer the model has (model.LAYER_ROLES), biases apart: none is left undrawn
    assert set(multipliers.KIND_COLORS) == set(LAYER_ROLES.values()) | {"bias", "other"}


def test_two_process_measurement_equals_one_process(tmp_path, token_dir):
    outputs = {}
    for nproc in (1, 2):
        out = tmp_path / f"p{nproc}"
        result = torchrun(nproc, cli_args(out, token_dir, T=5), script="multipliers.py")
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[nproc] = {
            layer["name"]: layer["multiplier"] for layer in json.loads((out / "lwlr.json").read_text())["layers"]
        }
    # Equal up to fp32 rounding: one process runs its matmuls on 2 threads, each of two processes on 1,
    # which changes the order of the sums inside them.
    for name, value in outputs[1].items():
        assert outputs[2][name] == pytest.approx(value, rel=1e-6)


def test_training_with_lwlr_saves_the_multipliers_and_resume_reuses_them(tmp_path, token_dir):
    out = tmp_path / "run"
    args = tiny_run_args(out, token_dir, lr_rule="lwlr", lwlr_T=3, max_steps=4, lr_decay_steps=6, eval_interval=2)
    assert train.main(args) == 0
    data = json.loads((out / "lwlr.json").read_text())
    measured = {layer["name"]: layer["multiplier"] for layer in data["layers"]}
    assert (out / "lwlr.png").exists()
    (out / "lwlr.json").unlink()  # a resume must not measure again
    further = dict(max_steps=6, lr_decay_steps=6, allow_resume_changes="max_steps")
    assert train.main(tiny_run_args(out, token_dir, lr_rule="lwlr", lwlr_T=3, eval_interval=2, **further)) == 0
    assert not (out / "lwlr.json").exists()
    from training import checkpoint

    meta = checkpoint.verify(checkpoint.step_dir(str(out), 6))
    assert meta["multipliers"] == measured
    optimizer_state = checkpoint.load_tensors(checkpoint.step_dir(str(out), 6), "optimizer")
    scales = {name: g["multiplier"] for g in optimizer_state["param_groups"] for name in g["names"]}
    assert scales == measured
    assert not math.isclose(min(scales.values()), max(scales.values()))


def test_a_rerun_with_the_same_settings_reuses_the_measurement_and_says_so(tmp_path, token_dir):
    cache = tmp_path / "cache"

    def run(name, **overrides):
        out, lines = tmp_path / name, []
        args = tiny_run_args(out, token_dir, **{"lwlr_T": 3, "lwlr_cache_dir": cache, **overrides})
        c = parse_config(args)
        torch.manual_seed(c.seed)
        model = GPT(build.gpt_config(c))
        measured, _ = multipliers.for_config(
            c, model, build.token_batches(c, "train", "lwlr", model.config), log=lines.append
        )
        return measured, " ".join(lines)

    first, log = run("first")
    assert "measured" in log and len(list(cache.iterdir())) == 1
    again, log = run("again")
    assert "reusing the multipliers measured with these settings" in log and "measured" not in log.replace(
        "measured with", ""
    )
    assert again == first
    for key, value in (
        ("seed", 7),
        ("lwlr_T", 4),
        ("lwlr_power", 0.25),
        ("micro_batch_size", 2),
        ("residual_scale", "true"),
    ):
        _, log = run(f"other-{key}", **{key: value})
        assert "reusing" not in log, key  # any setting that changes the measurement measures again
    for path in cache.iterdir():
        path.write_text("{ not json")
    remeasured, log = run("after-damage")
    assert "reusing" not in log and remeasured == first  # a damaged cache file is measured over
    rewritten = [path for path in cache.iterdir() if path.read_text().startswith("{\n")]
    assert len(rewritten) == 1 and json.loads(rewritten[0].read_text())["layers"]  # the others stay damaged


def test_the_fan_out_measurement_is_a_fan_out_initialized_copy_measured_as_it_is_and_leaves_the_model_untouched():
    """Algorithm 1 measures a re-initialized copy: the same as re-initializing a copy by hand (the same RNG
    draws) and measuring it at its own init; the caller's model keeps its weights and gets no gradients."""
    from model import init_weights

    model = tiny_gpt()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    torch.manual_seed(7)
    measured = lwlr.measure_grad_mean_abs(model, gpt_batches(3), T=3, init="fan_out")
    torch.manual_seed(7)
    by_hand = copy.deepcopy(model)
    init_weights(by_hand, "fan_out")
    assert measured == lwlr.measure_grad_mean_abs(by_hand, gpt_batches(3), T=3, init="model")
    assert measured != lwlr.measure_grad_mean_abs(model, gpt_batches(3), T=3, init="model")  # the re-init mattered
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_measured_through_the_models_own_forward_it_equals_the_copys_measurement_and_restores_the_model():
    """Given forward (a training run's compiled model; here the model's own call, so the two paths compute
    alike), the measurement re-initializes the model itself: the same G to the bit, the same RNG draws,
    and afterwards the model's weights, gradients (none) and mode as they were."""
    model = tiny_gpt().eval()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    calls = []

    def forward(x, y):
        calls.append(model.training)  # measured in training mode
        return model(x, y)

    torch.manual_seed(7)
    on_a_copy = lwlr.measure_grad_mean_abs(model, gpt_batches(3), T=3, init="fan_out")
    rng_after_copy = torch.get_rng_state()
    torch.manual_seed(7)
    in_place = lwlr.measure_grad_mean_abs(model, gpt_batches(3), T=3, init="fan_out", forward=forward)
    assert calls == [True] * 3
    assert in_place == on_a_copy
    assert torch.equal(torch.get_rng_state(), rng_after_copy)
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and not model.training


def test_a_failed_measurement_through_the_model_still_restores_its_weights():
    model = tiny_gpt()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with pytest.raises(ValueError, match="needs 3 batches"):
        lwlr.measure_grad_mean_abs(model, gpt_batches(2), T=3, init="fan_out", forward=model)
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())


@pytest.mark.parametrize("rank, compiled_here", [(0, True), (1, False)])
def test_the_compile_is_counted_on_the_ranks_whose_first_batch_ran_it(
    tmp_path, token_dir, monkeypatch, rank, compiled_here
):
    """T=1 on two ranks: rank 0 measures the one batch through the run's model (compiling it), rank 1 none,
    so only rank 0 counts a compile; rank 1's first step compiles. The collectives stand in: the other
    rank's sums, and no cached report from rank 0."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: rank)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda sums: sums.fill_(1.0))
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", lambda objects, src: None)  # no cached report
    c = parse_config(tiny_run_args(tmp_path / "run", token_dir, lwlr_T=1))
    model = GPT(build.gpt_config(c))
    batches = build.token_batches(c, "train", "lwlr", model.config)
    lines = []
    _, report = multipliers.lwlr_for_config(c, model, batches, log=lines.append, forward=model)
    assert ("compile" in report["seconds"]) == compiled_here
    assert ("which compiled the model" in lines[-1]) == compiled_here and lines[-1].startswith("lwlr: measured")
