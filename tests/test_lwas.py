"""LW-AS (optimizers/lwas.py, optimizers/curvature.py) against hand-computed cases and independent
references: the damped-Newton step size on a quadratic with a known Hessian,
torch.autograd.functional.hvp for the exact block term, an explicit Jacobian for the Gauss-Newton block,
torch.optim.AdamW and torch.optim.SGD for the warmup steps. The triton backend runs under
TRITON_INTERPRET=1 (conftest)."""

import math

import numpy as np
import pytest
import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import TEST_DEVICE
from model import GPT, GPTConfig
from optimizers import base, curvature, lwas


class Quadratic(torch.nn.Module):
    """f(a, b) = 1/2 theta^T H theta - h^T theta over theta = (a, b): a known Hessian with cross-layer terms."""

    def __init__(self, hessian: np.ndarray, linear: np.ndarray, sizes=(3, 2)):
        super().__init__()
        self.sizes = sizes
        self.a = torch.nn.Parameter(torch.zeros(sizes[0], dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.zeros(sizes[1], dtype=torch.float64))
        self.register_buffer("hessian", torch.tensor(hessian))
        self.register_buffer("linear", torch.tensor(linear))

    def forward(self, x=None, y=None):
        theta = torch.cat([self.a, self.b])
        return None, 0.5 * theta @ self.hessian @ theta - self.linear @ theta


def coupled_quadratic():
    rng = np.random.default_rng(0)
    m = rng.standard_normal((5, 5))
    hessian = m @ m.T + 0.5 * np.eye(5)  # SPD, with strong cross-layer blocks
    return hessian, rng.standard_normal(5)


def hand_step_sizes(hessian, gradient, direction, sizes):
    """rho_l = g_l . d_l, delta_l = sqrt(d_l . H_ll . d_l), alpha_l = rho_l / (delta_l (delta_l + rho_l))."""
    blocks = [slice(0, sizes[0]), slice(sizes[0], sum(sizes))]
    rho = np.array([gradient[s] @ direction[s] for s in blocks])
    delta = np.array([math.sqrt(direction[s] @ hessian[s, s] @ direction[s]) for s in blocks])
    return rho / (delta * (delta + rho)), rho, blocks


def first_step_by_hand(hessian, gradient, direction, sizes, eta, joint_rescale):
    """LW-AS's first step: block l moves by -eta alpha_l d_l, every alpha scaled by the joint rescale
    c = min(1, g.u / u.H.u) with u = (eta alpha_l d_l) where it is on (asserted to act)."""
    alpha, rho, blocks = hand_step_sizes(hessian, gradient, direction, sizes)
    lrs = eta * alpha
    if joint_rescale:
        u = np.concatenate([lrs[i] * direction[s] for i, s in enumerate(blocks)])
        scale = min(1.0, float(lrs @ rho) / float(u @ hessian @ u))
        assert scale < 0.75
        lrs = lrs * scale
    return -np.concatenate([lrs[i] * direction[s] for i, s in enumerate(blocks)])


def first_step(model, optimizer, theta):
    """The step the optimizer takes from theta with exact block curvature."""
    with torch.no_grad():
        model.a.copy_(torch.tensor(theta[:3])), model.b.copy_(torch.tensor(theta[3:]))
    _, loss = model()
    loss.backward()
    optimizer.refresh(curvature.Curvature("exact", model, None, None))
    optimizer.step()
    return torch.cat([model.a, model.b]).detach().numpy() - theta


@pytest.mark.parametrize("joint_rescale", [False, True])
def test_step_size_on_a_quadratic_equals_the_closed_form(joint_rescale):
    hessian, linear = coupled_quadratic()
    model = Quadratic(hessian, linear)
    optimizer = lwas.SGDMomentumLW(
        model.parameters(),
        lr=1.0,
        momentum=0.9,
        settings=lwas.LwasSettings(warmup_steps=0, beta=0.0, damping=0.0, alpha_max=1e6, joint_rescale=joint_rescale),
        backend="torch",
    )
    # Near the minimum rho_l / delta_l is small, so alpha_l is close to each block's own Newton step, and
    # the blocks' coupling (the layers move against each other) makes the joint step overshoot.
    theta = np.linalg.solve(hessian, linear) + 0.01 * np.array([1.0, 1.0, 1.0, -1.0, -1.0])
    gradient = hessian @ theta - linear  # the first step: the momentum buffer is the gradient, d = g
    expected = theta + first_step_by_hand(hessian, gradient, gradient, model.sizes, 1.0, joint_rescale)
    np.testing.assert_allclose(theta + first_step(model, optimizer, theta), expected, rtol=1e-6)


@pytest.mark.parametrize("joint_rescale", [False, True])
def test_adamw_lw_step_on_a_quadratic_equals_the_closed_form(joint_rescale):
    """AdamW-LW's first step: d = AdamW's bias-corrected direction m_hat / (sqrt(v_hat) + eps) = g / (|g| + eps),
    each block moved by eta alpha_l d_l with alpha_l from the block's own curvature along d_l."""
    hessian, linear = coupled_quadratic()
    model = Quadratic(hessian, linear)
    eta, eps = 1.0, 1e-8
    optimizer = lwas.AdamWLW(
        model.parameters(),
        lr=eta,
        eps=eps,
        weight_decay=0.0,
        settings=lwas.LwasSettings(warmup_steps=0, beta=0.0, damping=0.0, alpha_max=1e6, joint_rescale=joint_rescale),
        backend="torch",
    )
    # Close to the minimum, where alpha_l nears each block's Newton step along d_l and the coupling
    # between the blocks makes the joint step overshoot (a scale of 0.69 here).
    theta = np.linalg.solve(hessian, linear) + 1e-4 * np.array([-1.0, -1.0, -1.0, 1.0, 1.0])
    gradient = hessian @ theta - linear
    expected = first_step_by_hand(
        hessian, gradient, gradient / (np.abs(gradient) + eps), model.sizes, eta, joint_rescale
    )
    # The step itself (~1e-4), so that it is not lost in theta's ~1.
    np.testing.assert_allclose(first_step(model, optimizer, theta), expected, rtol=1e-6)


def test_averages_are_bias_corrected_emas_over_refreshes():
    hessian, linear = coupled_quadratic()
    model = Quadratic(hessian, linear)
    beta = 0.5
    optimizer = lwas.SGDMomentumLW(
        model.parameters(),
        lr=1.0,
        momentum=0.0,
        settings=lwas.LwasSettings(warmup_steps=0, beta=beta, damping=0.0, alpha_max=1e6, joint_rescale=False),
        backend="torch",
    )
    with torch.no_grad():
        model.a.fill_(1.0), model.b.fill_(-1.0)
    samples = []
    for _ in range(2):
        theta = torch.cat([model.a, model.b]).detach().numpy().copy()
        gradient = hessian @ theta - linear
        _, rho, blocks = hand_step_sizes(hessian, gradient, gradient, model.sizes)
        samples.append((rho, np.array([gradient[s] @ hessian[s, s] @ gradient[s] for s in blocks])))
        optimizer.zero_grad()
        model()[1].backward()
        optimizer.refresh(curvature.Curvature("exact", model, None, None))
        optimizer.step()
    (rho1, q1), (rho2, q2) = samples
    correction = 1 - beta**2
    rho_avg, q_avg = (
        (beta * (1 - beta) * rho1 + (1 - beta) * rho2) / correction,
        (beta * (1 - beta) * q1 + (1 - beta) * q2) / correction,
    )
    expected = rho_avg / (np.sqrt(q_avg) * (np.sqrt(q_avg) + rho_avg))
    np.testing.assert_allclose(optimizer.last_refresh["step_size"].numpy(), expected, rtol=1e-6)


def test_a_refresh_on_a_skipped_step_leaves_every_state_as_it_was():
    hessian, linear = coupled_quadratic()
    model = Quadratic(hessian, linear)
    optimizer = lwas.SGDMomentumLW(
        model.parameters(),
        lr=1.0,
        settings=lwas.LwasSettings(warmup_steps=0, alpha_max=1e6, joint_rescale=True),
        backend="torch",
    )
    with torch.no_grad():
        model.a.fill_(1.0), model.b.fill_(-1.0)
    model()[1].backward()
    optimizer.refresh(curvature.Curvature("exact", model, None, None))
    optimizer.step()
    before = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()}
    optimizer.zero_grad()
    model()[1].backward()  # a finite gradient, but the step was flagged non-finite (e.g. another rank's)
    optimizer.found_inf = torch.ones(())
    optimizer.refresh(curvature.Curvature("exact", model, None, None))
    for p in model.parameters():
        for key, value in optimizer.state[p].items():
            assert torch.equal(value, before[p][key]), key


def test_step_sizes_stay_finite_when_curvature_is_zero_or_negative():
    rho = torch.tensor([1.0, 1.0, 1.0, -1.0, 0.0, 2.0])
    block_curvature = torch.tensor([0.0, -5.0, 4.0, 4.0, 0.0, 0.0])
    direction_sq = torch.ones(6)
    undamped = lwas.damped_newton_step_size(rho, block_curvature, direction_sq, damping=0.0, alpha_max=3.0)
    assert undamped.tolist() == pytest.approx([3.0, 3.0, 1 / (2 * 3), 0.0, 0.0, 3.0])
    damped = lwas.damped_newton_step_size(rho, block_curvature, direction_sq, damping=1e-2, alpha_max=1e9)
    assert torch.isfinite(damped).all()
    assert damped[0].item() == pytest.approx(1 / (0.1 * 1.1))  # delta = sqrt(0 + 1e-2 * 1)

    # On a concave quadratic (H negative definite) the optimizer steps by alpha_max, not by infinity.
    model = Quadratic(-np.eye(5), np.ones(5))
    optimizer = lwas.SGDMomentumLW(
        model.parameters(),
        lr=1.0,
        settings=lwas.LwasSettings(warmup_steps=0, damping=0.0, alpha_max=0.25, joint_rescale=True),
        backend="torch",
    )
    model()[1].backward()
    optimizer.refresh(curvature.Curvature("exact", model, None, None))
    optimizer.step()
    assert torch.cat([model.a, model.b]).detach().numpy() == pytest.approx(np.full(5, 0.25))


@pytest.fixture(scope="module")
def tiny_gpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2-tiny"))
    generator = torch.Generator().manual_seed(1)
    x = torch.randint(0, 50257, (2, 8), generator=generator)
    y = torch.randint(0, 50257, (2, 8), generator=generator)
    params = list(model.parameters())
    directions = [torch.randn(p.shape, generator=generator) for p in params]
    return model, x, y, params, directions


def test_exact_block_term_equals_autograd_hvp_restricted_to_the_block(tiny_gpt):
    model, x, y, params, directions = tiny_gpt
    terms = curvature.Curvature("exact", model, x, y).block_terms(params, directions)
    names = [name for name, _ in model.named_parameters()]
    for index in (0, 2, 6, 9, len(params) - 1):  # wte (tied to the lm_head), q_proj, c_proj, a bias, ln_f
        name, p, d = names[index], params[index], directions[index]

        def loss_of_block(value):
            return functional_call(model, {name: value}, (x, y))[1]

        with sdpa_kernel(SDPBackend.MATH):
            _, block_product = torch.autograd.functional.hvp(loss_of_block, p.detach(), d)
        torch.testing.assert_close(
            terms[index], torch.dot(d.flatten(), block_product.flatten()), rtol=1e-4, atol=1e-6, msg=name
        )


def test_rademacher_averages_to_the_exact_block_terms(tiny_gpt):
    model, x, y, params, directions = tiny_gpt
    chosen = [2, 3, 4, 6]  # four layers of one block, strongly coupled: cross terms don't vanish by themselves
    params, directions = [params[i] for i in chosen], [directions[i] for i in chosen]
    exact = curvature.Curvature("exact", model, x, y).block_terms(params, directions)
    rademacher = curvature.Curvature("rademacher", model, x, y)
    # Over all 2^4 sign patterns the cross terms cancel exactly: the estimator is unbiased.
    patterns = torch.cartesian_prod(*[torch.tensor([-1.0, 1.0])] * len(params))
    estimates = torch.stack([rademacher.block_terms(params, directions, signs=signs) for signs in patterns])
    assert not torch.allclose(estimates[0], exact, rtol=0.05)  # one draw alone is off
    torch.testing.assert_close(estimates.mean(0), exact, rtol=1e-4, atol=1e-6)
    # Signs drawn by the estimator itself: the mean of 200 draws lies within 5 standard errors.
    torch.manual_seed(0)
    draws = torch.stack([rademacher.block_terms(params, directions) for _ in range(200)])
    standard_error = draws.std(0) / math.sqrt(len(draws))
    assert ((draws.mean(0) - exact).abs() <= 5 * standard_error + 1e-6).all()


def explicit_gauss_newton_block(model, x, name, p, d):
    """d . G . d = (1/N) sum_t z_t^T (diag(p_t) - p_t p_t^T) z_t with z = J d, J the full Jacobian of the logits."""

    def logits_of(value):
        return functional_call(model, {name: value}, (x,))[0].reshape(-1)

    with sdpa_kernel(SDPBackend.MATH):
        # forward mode: one JVP per parameter element, not one backward per logit
        jacobian = torch.autograd.functional.jacobian(
            logits_of, p.detach(), vectorize=True, strategy="forward-mode"
        ).reshape(-1, p.numel())
        probs = torch.softmax(model(x)[0].reshape(-1, model.config.vocab_size).detach(), dim=-1)
    z = (jacobian @ d.reshape(-1)).reshape(probs.shape)
    # z^T (diag(p) - p p^T) z per token, without the 50257 x 50257 matrix
    return ((probs * z.square()).sum(-1) - (probs * z).sum(-1).square()).mean()


def test_gauss_newton_estimate_averages_to_the_explicit_gauss_newton_block(tiny_gpt):
    model, _, _, all_params, all_directions = tiny_gpt
    x = torch.randint(
        0, 50257, (1, 4), generator=torch.Generator().manual_seed(2)
    )  # 4 tokens: the Jacobian stays small
    names = [name for name, _ in model.named_parameters()]
    chosen = [i for i, p in enumerate(all_params) if p.numel() <= 64][:3]  # LayerNorm scales and biases
    params, directions = [all_params[i] for i in chosen], [all_directions[i] for i in chosen]
    explicit = torch.stack(
        [explicit_gauss_newton_block(model, x, names[i], all_params[i], all_directions[i]) for i in chosen]
    )
    # The JVP form (the joint term's) is exact: one layer's tangent alone gives its block.
    for k, i in enumerate(chosen):
        jvp_form = curvature.gauss_newton_quadratic_form(
            model, x, [all_params[i]], [all_directions[i]], torch.autocast("cpu", enabled=False)
        )
        torch.testing.assert_close(jvp_form, explicit[k], rtol=1e-4, atol=1e-9)
    # The sampled-label estimate: never negative, and unbiased (mean of 400 draws within 5 standard errors).
    torch.manual_seed(0)
    draws = torch.stack(
        [curvature.Curvature("gauss_newton", model, x, None).block_terms(params, directions) for _ in range(400)]
    )
    assert (draws >= 0).all()
    standard_error = draws.std(0) / math.sqrt(len(draws))
    assert ((draws.mean(0) - explicit).abs() <= 5 * standard_error).all(), (draws.mean(0), explicit, standard_error)
    assert (standard_error < 0.2 * explicit).all()  # the bound is tight enough to mean something


# Warmup steps are the base optimizer at lr * initial_step_size: compare with torch.optim on odd shapes,
# which take the kernels' scalar fallback; ALIGNED_SHAPES (16-byte storage, sizes a multiple of 4) take
# the 128-bit build that gpt2's tensors take.
SHAPES = [(7, 13), (33,), (1,), (4097,)]
ALIGNED_SHAPES = [(8, 12), (32,), (4,), (4100,)]


def make_params(seed=1, shapes=SHAPES):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(TEST_DEVICE)) for shape in shapes]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", ["adamw_lw", "sgdm_lw"])
def test_warmup_steps_equal_the_base_optimizer(name, backend):
    ours_params, reference_params = make_params(), make_params()
    if name == "adamw_lw":
        ours = lwas.AdamWLW(
            ours_params,
            lr=2.0,
            weight_decay=0.1,
            settings=lwas.LwasSettings(initial_step_size=5e-3 / 2.0, warmup_steps=100),  # 5e-3 at lr 2
            backend=backend,
        )
        reference = torch.optim.AdamW(reference_params, lr=5e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    else:  # torch's SGD couples weight decay into the gradient: compare without it
        ours = lwas.SGDMomentumLW(
            ours_params,
            lr=2.0,
            momentum=0.9,
            weight_decay=0.0,
            settings=lwas.LwasSettings(initial_step_size=5e-3 / 2.0, warmup_steps=100),  # 5e-3 at lr 2
            backend=backend,
        )
        reference = torch.optim.SGD(reference_params, lr=5e-3, momentum=0.9)
    generator = torch.Generator().manual_seed(2)
    for _ in range(10):
        grads = [torch.randn(shape, generator=generator) for shape in SHAPES]
        for p, q, g in zip(ours_params, reference_params, grads):
            p.grad, q.grad = g.to(TEST_DEVICE), g.to(TEST_DEVICE, copy=True)
        ours.step(), reference.step()
    for p, q in zip(ours_params, reference_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


class ScaledNormCurvature:
    """A stand-in curvature for the step path: q_l = c_l |d_l|^2 with fixed c_l, some negative, and a
    joint term u . C . u = 50 sum_l |c_l| |u_l|^2, as if cross-layer curvature were strong (so the joint
    rescale acts)."""

    def __init__(self, coefficients):
        self.coefficients = coefficients

    def block_terms(self, params, directions):
        return torch.stack([c * d.square().sum() for c, d in zip(self.coefficients, directions)])

    def joint_term(self, params, vectors):
        return 50 * sum(abs(c) * u.square().sum() for c, u in zip(self.coefficients, vectors))


@pytest.mark.parametrize("shapes, aligned", [(SHAPES, False), (ALIGNED_SHAPES, True)])
@pytest.mark.parametrize("name", ["adamw_lw", "sgdm_lw"])
def test_triton_and_torch_backends_agree_through_refreshes_and_a_reload(name, shapes, aligned, monkeypatch):
    make = {
        "adamw_lw": lambda ps, backend: lwas.AdamWLW(
            [{"params": ps[:2], "multiplier": 0.5}, {"params": ps[2:], "weight_decay": 0.0}],
            lr=0.8,
            settings=lwas.LwasSettings(warmup_steps=2),
            backend=backend,
        ),
        "sgdm_lw": lambda ps, backend: lwas.SGDMomentumLW(
            [{"params": ps[:2], "multiplier": 0.5}, {"params": ps[2:], "weight_decay": 0.1}],
            lr=0.8,
            settings=lwas.LwasSettings(warmup_steps=2),
            backend=backend,
        ),
    }[name]
    curvature = ScaledNormCurvature([300.0, -1.0, 50.0, 2000.0])
    builds = []
    real_launch = base.launch_kernel
    monkeypatch.setattr(
        base,
        "launch_kernel",
        lambda kernel, grid, *args, **meta: (builds.append(meta["ALIGNED"]), real_launch(kernel, grid, *args, **meta)),
    )
    runs, joint_scales = {}, []
    for backend in ("torch", "triton"):
        params = make_params(shapes=shapes)
        optimizer = make(params, backend)
        generator = torch.Generator().manual_seed(3)
        for step in range(9):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator).to(TEST_DEVICE)
            if step % 2 == 0:
                optimizer.refresh(curvature)
                joint_scales.append(optimizer.last_refresh.get("joint_scale", 1.0))
            optimizer.step()
            if step == 4:  # a reload, through the other backend
                other = make(params, "triton" if backend == "torch" else "torch")
                other.load_state_dict(optimizer.state_dict())
                optimizer = make(params, backend)
                optimizer.load_state_dict(other.state_dict())
        runs[backend] = (params, optimizer)
    assert builds == [aligned] * 9  # the triton run's 9 steps, each one launch of the expected build
    (torch_params, torch_optimizer), (triton_params, triton_optimizer) = runs["torch"], runs["triton"]
    for p, q in zip(torch_params, triton_params):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            triton_optimizer.state[q]["step_size"], torch_optimizer.state[p]["step_size"], rtol=1e-5, atol=0
        )
    # The rule acted: negative curvature gets the cap, the others their own sizes below it; the joint rescale acted.
    step_sizes = [torch_optimizer.state[p]["step_size"].item() for p in torch_params]
    cap = torch_optimizer.settings.alpha_max * torch_optimizer.last_refresh["joint_scale"].item()
    assert step_sizes[1] == pytest.approx(cap)
    others = [step_sizes[i] for i in (0, 2, 3)]
    assert len(set(others)) == 3 and max(others) < cap
    assert min(joint_scales) < 1


def test_bad_settings_fail_clearly():
    params = make_params()
    with pytest.raises(ValueError, match="beta must lie in"):
        lwas.AdamWLW(params, settings=lwas.LwasSettings(beta=1.0))
    with pytest.raises(ValueError, match="alpha_max must be finite"):
        lwas.SGDMomentumLW(params, settings=lwas.LwasSettings(alpha_max=float("inf")))
    with pytest.raises(ValueError, match="momentum must lie in"):
        lwas.SGDMomentumLW(params, momentum=1.5)
    with pytest.raises(ValueError, match="curvature='hessian': choose one of"):
        curvature.Curvature("hessian", None, torch.zeros(1), None)
