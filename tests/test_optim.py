"""The fused optimizers (optimizers/adamw.py, lion.py, sophiag.py, adam_mini.py) against independent
references: torch.optim.AdamW, lion_pytorch.Lion, sophia_opt.SophiaG, adam_mini.Adam_mini. The triton
backend runs under TRITON_INTERPRET=1 (conftest), or compiled on CUDA (LWLR_TEST_DEVICE=cuda,
bench/gpu_check.sh). The peer libraries are imported where they are used: on the GPU machine they come
from wheels (bench/wheels.sh), and a missing one skips only its own tests."""

import math

import pytest
import torch

from conftest import TEST_DEVICE
from optimizers import adam_mini, adamw, base, kernels, lion, sophiag

# Odd shapes, 1-D tensors, a single element, and one tensor spanning two kernel chunks.
SHAPES = [(7, 13), (33,), (5, 3, 2), (1,), (kernels.BLOCK + 1,)]
GROUPS = [([0, 1], 1.0, 0.1), ([2, 3], 0.3, 0.0), ([4], 2.5, 0.05)]  # (tensor indices, multiplier, weight_decay)
LR = 1e-2
BS = 100
# The torch backend runs the reference's own operations (bitwise equal). The kernel computes in fp32
# with a different operation order: a few ulps per step; over 20 steps on values of magnitude ~1 the
# largest difference seen was 3.9e-7.
TRITON_TOLERANCE = dict(rtol=1e-6, atol=1e-6)

REFERENCES = {  # name -> (reference from param groups, ours from param groups and a backend)
    "adamw": (
        lambda groups: torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), eps=1e-8, fused=True),
        lambda groups, backend: adamw.AdamW(groups, lr=LR, betas=(0.9, 0.95), eps=1e-8, backend=backend),
    ),
    "lion": (
        lambda groups: pytest.importorskip("lion_pytorch").Lion(groups, lr=LR, betas=(0.9, 0.99)),
        lambda groups, backend: lion.Lion(groups, lr=LR, betas=(0.9, 0.99), backend=backend),
    ),
    "sophiag": (
        lambda groups: pytest.importorskip("sophia_opt").SophiaG(groups, lr=LR, betas=(0.965, 0.99), rho=0.05),
        lambda groups, backend: sophiag.SophiaG(groups, lr=LR, betas=(0.965, 0.99), rho=0.05, bs=BS, backend=backend),
    ),
}


def make_params():
    generator = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(TEST_DEVICE)) for shape in SHAPES]


def reference_groups(params):
    return [{"params": [params[i] for i in idx], "lr": LR * scale, "weight_decay": wd} for idx, scale, wd in GROUPS]


def our_groups(params):
    return [{"params": [params[i] for i in idx], "multiplier": scale, "weight_decay": wd} for idx, scale, wd in GROUPS]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.to(p.device, copy=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(REFERENCES))
def test_matches_reference_over_20_steps_with_a_reload(name, backend):
    make_reference, make_ours = REFERENCES[name]
    reference_params, our_params = make_params(), make_params()
    reference = make_reference(reference_groups(reference_params))
    ours = make_ours(our_groups(our_params), backend)
    generator = torch.Generator().manual_seed(2)
    for step in range(20):
        grads = [torch.randn(shape, generator=generator) for shape in SHAPES]
        if name == "sophiag" and step % 3 == 0:  # a Hessian refresh from a different gradient
            set_grads(reference_params, [0.5 * g for g in grads]), set_grads(our_params, [0.5 * g for g in grads])
            reference.update_hessian(), ours.update_hessian()
        set_grads(reference_params, grads), set_grads(our_params, grads)
        reference.step(bs=BS) if name == "sophiag" else reference.step()
        ours.step()
        if step == 9:  # reload mid-run into a fresh optimizer of the *other* backend, then back
            saved = ours.state_dict()
            other = make_ours(our_groups(our_params), "torch" if backend == "triton" else "triton")
            other.load_state_dict(saved)
            ours = make_ours(our_groups(our_params), backend)
            ours.load_state_dict(other.state_dict())
    tolerance = dict(rtol=0, atol=0) if backend == "torch" else TRITON_TOLERANCE
    for reference_param, our_param in zip(reference_params, our_params):
        torch.testing.assert_close(our_param, reference_param, **tolerance)
    for reference_param, our_param in zip(reference_params, our_params):
        for key, value in ours.state[our_param].items():
            torch.testing.assert_close(value, reference.state[reference_param][key], **tolerance)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_multiplier_equals_a_scaled_learning_rate(backend):
    reference_params, our_params = make_params(), make_params()
    reference = torch.optim.AdamW(reference_params, lr=3 * LR, betas=(0.9, 0.95), weight_decay=0.1)
    ours = adamw.AdamW([{"params": our_params, "multiplier": 3.0}], lr=LR, weight_decay=0.1, backend=backend)
    for _ in range(3):
        grads = [torch.randn(shape) for shape in SHAPES]
        set_grads(reference_params, grads), set_grads(our_params, grads)
        reference.step(), ours.step()
    for reference_param, our_param in zip(reference_params, our_params):
        torch.testing.assert_close(our_param, reference_param, **TRITON_TOLERANCE)


def gpt2_shapes():
    from model import GPT, GPTConfig

    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset("gpt2"))
    return [p.shape for p in model.parameters()]


def test_one_launch_for_a_gpt2_shaped_parameter_list(monkeypatch):
    shapes = gpt2_shapes()
    assert len(shapes) == 196 and sum(math.prod(s) for s in shapes) == 124_439_808  # separate q, k, v
    params = [torch.nn.Parameter(torch.empty(shape, device=TEST_DEVICE)) for shape in shapes]
    groups = [{"params": [p], "multiplier": 1.0 + i / 100} for i, p in enumerate(params)]  # one group per layer
    optimizer = adamw.AdamW(groups, lr=1e-3, backend="triton")
    for p in params:
        p.grad = torch.empty_like(p)
    launches = []
    monkeypatch.setattr(
        base, "launch_kernel", lambda kernel, grid, *args, **meta: launches.append((kernel, grid, args))
    )
    optimizer.step()
    # the schedule moves lr: still one launch, the same plan, the new lr as an argument
    for group in optimizer.param_groups:
        group["lr"] = 5e-4
    optimizer.step()
    assert len(launches) == 2 and launches[0][0] is adamw.adamw_kernel
    assert launches[0][1][0] == sum(math.ceil(math.prod(s) / kernels.BLOCK) for s in shapes)
    assert len(optimizer._plans) == 1
    # after 3 chunk tables, found_inf, multiplier, weight_decay, 4 tensor tables, step_sizes (kernels.adamw_kernel)
    lr_argument = 11
    assert (launches[0][2][lr_argument], launches[1][2][lr_argument]) == (1e-3, 5e-4)


def odd_offset_view(tensor):
    """The same values in storage that starts 4 bytes past a 16-byte boundary: a parameter that is a view."""
    base = torch.empty(tensor.numel() + 1, device=tensor.device)
    view = base[1:].view(tensor.shape)
    view.copy_(tensor)
    return view


@pytest.mark.parametrize("layout, aligned", [("aligned", True), ("odd offset view", False), ("odd size", False)])
def test_each_storage_layout_takes_a_correct_build(layout, aligned, monkeypatch):
    """The ALIGNED build's hints (16-byte storage, size a multiple of 4) must hold wherever it is launched;
    a view at an odd offset or a size like 4097 takes the fallback, and both builds match torch.optim.AdamW."""
    shapes = [(64, 8), (4,), (kernels.BLOCK + 4,)] + ([(kernels.BLOCK + 1,)] if layout == "odd size" else [])
    generator = torch.Generator().manual_seed(3)
    values = [torch.randn(shape, generator=generator).to(TEST_DEVICE) for shape in shapes]
    if layout == "odd offset view":
        values[-1] = odd_offset_view(values[-1])
        assert values[-1].data_ptr() % 16 == 4
    reference_params = [torch.nn.Parameter(v.clone()) for v in values]
    our_params = [torch.nn.Parameter(v) for v in values]
    assert our_params[-1].data_ptr() == values[-1].data_ptr()  # the parameter keeps the view's storage
    reference = torch.optim.AdamW(reference_params, lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    ours = adamw.AdamW(our_params, lr=LR, betas=(0.9, 0.95), weight_decay=0.1, backend="triton")
    builds = []
    real_launch = base.launch_kernel
    monkeypatch.setattr(
        base,
        "launch_kernel",
        lambda kernel, grid, *args, **meta: (builds.append(meta["ALIGNED"]), real_launch(kernel, grid, *args, **meta)),
    )
    for _ in range(10):
        grads = [torch.randn(shape, generator=generator) for shape in shapes]
        set_grads(reference_params, grads), set_grads(our_params, grads)
        reference.step(), ours.step()
    assert builds == [aligned] * 10
    for reference_param, our_param in zip(reference_params, our_params):
        torch.testing.assert_close(our_param, reference_param, **TRITON_TOLERANCE)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_found_inf_skips_the_update(backend):
    params = make_params()
    before = [p.detach().clone() for p in params]
    optimizer = adamw.AdamW(params, lr=LR, backend=backend)
    set_grads(params, [torch.randn(shape) for shape in SHAPES])
    optimizer.found_inf = torch.ones((), device=TEST_DEVICE)
    optimizer.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    assert torch.count_nonzero(optimizer.state[params[0]]["exp_avg"]) == 0
    optimizer.found_inf = torch.zeros((), device=TEST_DEVICE)
    optimizer.step()
    assert not torch.equal(params[0].detach(), before[0])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_found_inf_skips_a_hessian_refresh(backend):
    params = make_params()
    optimizer = sophiag.SophiaG(params, lr=LR, backend=backend)
    set_grads(params, [torch.randn(shape) for shape in SHAPES])
    optimizer.update_hessian()
    hessians = [optimizer.state[p]["hessian"].clone() for p in params]
    set_grads(params, [torch.full(shape, float("nan")) for shape in SHAPES])
    optimizer.found_inf = torch.ones((), device=TEST_DEVICE)
    optimizer.update_hessian()
    for p, h in zip(params, hessians):
        assert torch.equal(optimizer.state[p]["hessian"], h)
    set_grads(params, [torch.ones(shape) for shape in SHAPES])
    optimizer.found_inf = torch.zeros((), device=TEST_DEVICE)
    optimizer.update_hessian()  # h = 0.99 h + 0.01 * 1
    torch.testing.assert_close(optimizer.state[params[0]]["hessian"], 0.99 * hessians[0] + 0.01, **TRITON_TOLERANCE)


def test_bad_input_fails_clearly():
    params = make_params()
    with pytest.raises(ValueError, match="lr must be finite"):
        adamw.AdamW(params, lr=float("nan"))
    with pytest.raises(ValueError, match="betas must lie in"):
        lion.Lion(params, betas=(-0.1, 0.99))
    with pytest.raises(ValueError, match="rho must be finite and >= 0"):
        sophiag.SophiaG(params, rho=-1.0)
    with pytest.raises(ValueError, match="backend='jax'"):
        adamw.AdamW(params, backend="jax")
    with pytest.raises(ValueError, match="multiplier must be finite"):
        adamw.AdamW([{"params": params, "multiplier": float("inf")}])
    with pytest.raises(ValueError, match="sparse"):
        adamw.AdamW([torch.nn.Parameter(torch.eye(3).to_sparse())])
    double = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64, device=TEST_DEVICE))
    double.grad = torch.ones(4, dtype=torch.float64, device=TEST_DEVICE)
    with pytest.raises(ValueError, match="needs contiguous fp32 parameters"):
        adamw.AdamW([double], backend="triton").step()
    optimizer = adamw.AdamW(params)
    optimizer.param_groups[0]["lr"] = float("nan")  # a schedule gone wrong is caught at step time
    set_grads(params, [torch.randn(shape) for shape in SHAPES])
    with pytest.raises(ValueError, match="lr must be finite"):
        optimizer.step()


def adam_mini_models():
    """gpt2-tiny with a 128-token vocabulary (the interpreter runs one reduction program per embedding
    row). Its key biases are frozen: their gradient is zero by construction, rounding noise that Adam
    normalizes into full-size steps, so a 1-ulp difference flips their updates and the two runs part."""
    import copy

    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2-tiny", vocab_size=128, block_size=16))
    for name, p in model.named_parameters():
        if name.endswith("k_proj.bias"):
            p.requires_grad_(False)
    return model, copy.deepcopy(model)


# 20 steps where the kernels compile (the GPU check); 6 under the CPU interpreter, at 4 s a step, a reload after 3
ADAM_MINI_STEPS = 6 if TEST_DEVICE == "cpu" else 20


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_adam_mini_matches_the_official_code_over_many_steps_with_a_reload(backend):
    Adam_mini = pytest.importorskip("adam_mini").Adam_mini
    reference_model, our_model = (model.to(TEST_DEVICE) for model in adam_mini_models())
    names = [n for n, p in our_model.named_parameters() if p.requires_grad]
    scales = {name: 0.5 + (i % 5) / 4 for i, name in enumerate(names)}
    reference = Adam_mini(
        reference_model.named_parameters(),
        lr=LR,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.1,
        dim=32,
        n_heads=2,
        verbose=False,
    )
    for group in reference.param_groups:  # the official code has one group per parameter
        group["lr"] = LR * scales[group["name"]]

    def ours_from(state=None):
        optimizer = adam_mini.AdamMini(
            base.param_groups(our_model, scales, 0.1), lr=LR, betas=(0.9, 0.95), n_head=2, backend=backend
        )
        if state is not None:
            optimizer.load_state_dict(state)
        return optimizer

    ours = ours_from()
    generator = torch.Generator().manual_seed(1)
    for step in range(ADAM_MINI_STEPS):
        x, y = torch.randint(0, 128, (2, 2, 16), generator=generator).to(TEST_DEVICE)
        for model in (reference_model, our_model):
            model(x, y)[1].backward()
        reference.step(), ours.step()
        reference.zero_grad(), ours.zero_grad()
        if step == ADAM_MINI_STEPS // 2 - 1:
            ours = ours_from(ours.state_dict())
    # Whole-model training: fp32 differences in the forward and backward compound over 20 steps (the
    # largest seen was 2.3e-6); the update itself matches per step to 1e-7.
    for reference_param, our_param in zip(reference_model.parameters(), our_model.parameters()):
        torch.testing.assert_close(our_param, reference_param, rtol=1e-5, atol=1e-5)


def test_adam_mini_refuses_a_parameter_without_a_role():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="no role for parameter 'gate.weight'"):
        adam_mini.AdamMini([{"params": [p], "names": ["gate.weight"]}])
    with pytest.raises(ValueError, match="needs each param group's parameter names"):
        adam_mini.AdamMini([p])


def test_adam_mini_takes_two_launches(monkeypatch):
    model = adam_mini_models()[0].to(TEST_DEVICE)
    optimizer = adam_mini.AdamMini(base.param_groups(model, None, 0.1), n_head=2, backend="triton")
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    launches = []
    monkeypatch.setattr(base, "launch_kernel", lambda kernel, grid, *args, **meta: launches.append(kernel))
    optimizer.step()
    assert launches == [adam_mini.block_mean_square_kernel, adam_mini.adam_mini_kernel]
