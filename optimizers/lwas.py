"""Layer-wise adaptive step sizes (LW-AS): SGD with momentum and AdamW whose step size for each layer
(parameter tensor) comes from the curvature along that layer's own update direction.

    Bahamou and Goldfarb 2023, "Layer-wise Adaptive Step-Sizes for Stochastic First-Order Methods for
    Deep Learning", arXiv 2305.13664.

Only the paper's abstract is public (no full text, no code), so this is a reconstruction.

The paper's: a base optimizer gives each layer l a direction d_l, and the layer's step size is the
damped-Newton step for self-concordant functions along d_l, from the layer's diagonal Hessian block H_ll:
    rho_l = g_l . d_l,   delta_l = sqrt(d_l . H_ll . d_l),   alpha_l = rho_l / (delta_l (delta_l + rho_l)),
    theta_l -= eta * alpha_l * d_l,   with decoupled weight decay theta_l -= eta * alpha_l * wd * theta_l.

Ours, where the abstract says nothing:
  - the step sizes are refreshed every `lw_interval` steps (the optimizer's before_step hook runs refresh()
    before step(), base.StepHooks) and held in between;
  - rho_l, q_l = d_l . C_ll . d_l and |d_l|^2 are averaged over refreshes (an EMA with `beta`,
    bias-corrected), since one batch's curvature estimate is noisy; alpha_l comes from the averages;
  - damping: delta_l = sqrt(max(q_l, 0) + damping * |d_l|^2), so zero or negative curvature still gives a
    finite step; alpha_l = 0 when rho_l <= 0 (d_l is no descent direction on average); alpha_l <= alpha_max;
  - the first `warmup_steps` steps take the initial step size while the averages fill (the config gives
    it as lw_warmup_lr, the rate at the schedule's peak: LwasSettings.from_config);
  - eta is the training schedule's lr (1.0: the step sizes as computed) times the group's multiplier m_l,
    so lr_rule=lwlr's multiplier multiplies alpha_l;
  - the curvature C: `exact`, `rademacher` or `gauss_newton` (curvature.py);
  - joint rescale (optional): every layer steps at once, and cross-layer curvature can make the joint
    step overshoot when no layer's own step does. With u = (eta m_l alpha_l d_l) over all layers,
    c = min(1, g.u / u.C.u), the Newton step along u, scales every alpha_l until the next refresh;
  - DDP: rho_l from the all-reduced gradient (the same on every rank); the curvature terms are measured
    on each rank's own batch and averaged over the ranks, gauss_newton's block terms from the gradient of
    all ranks' sampled labels together (curvature.Curvature);
  - fsdp (gauss_newton only): rho_l, |d_l|^2 and the block terms' d_l . g_hat_l are sums over the shards,
    summed over the ranks; g_hat comes from the sharded model's own backward, and the joint term's JVP runs
    the model's stages one at a time on gathered weights (curvature.sharded_gauss_newton_quadratic_form), so
    every number is DDP's on the same ranks.

The step itself is the fused step of base.py: the AdamW and SGD-momentum kernels read each tensor's step
size from a device scalar (its "step_size" state), so a refresh costs no host sync and no recompile.
"""

import dataclasses
import math

import torch
import triton
import triton.language as tl

from optimizers.adamw import adamw_kernel, launch_adamw, update_adamw
from optimizers.base import FusedOptimizer, StepContext, check_nonnegative_finite, layer_lr
from optimizers.curvature import SHARDABLE_CURVATURES, Curvature, check_curvature, dot
from optimizers.kernels import chunk, param_and_grad, storage, tensor_lr
from optimizers.spec import OptimizerSpec, Reference
from runtime.fsdp import local, sum_over_shards


@dataclasses.dataclass(frozen=True)
class LwasSettings:
    """How LW-AS refreshes and bounds its step sizes (the config's lw_* keys, LwasSettings.from_config)."""

    # The step size before the curvature sets it (the warmup's), a multiple of lr as every step size is;
    # None: the optimizer's (SGD-m-LW 0.1, AdamW-LW 1e-3).
    initial_step_size: float | None = None
    alpha_max: float | None = None  # the cap on a layer's step size; None: the optimizer's (10, 0.1)
    beta: float = 0.5  # EMA of the curvature, g.d and |d|^2 over refreshes
    damping: float = 1e-8  # delta^2 = max(d.C.d, 0) + damping * |d|^2
    warmup_steps: int = 10  # steps at the initial step size while the averages fill
    joint_rescale: bool = True  # shrink every step size when the joint step overshoots
    interval: int = 5  # a refresh every this many steps
    curvature: str = "gauss_newton"  # curvature.CURVATURES
    curvature_rows: int = 0  # sequences of the first micro-batch in a curvature pass; 0 = all of them

    def __post_init__(self):
        for name in ("initial_step_size", "alpha_max", "damping"):
            if getattr(self, name) is not None:
                check_nonnegative_finite(name, getattr(self, name))
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"beta must lie in [0, 1), got {self.beta}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")
        check_curvature(self.curvature)  # at construction, not at the first refresh

    @classmethod
    def from_config(cls, c, optimizer: type) -> "LwasSettings":
        """The config's lw_* keys for `optimizer` (SGDMomentumLW or AdamWLW). lw_warmup_lr is a rate at the
        schedule's peak (0: the optimizer's initial step size at lr 1); the kernel multiplies a step size
        by the schedule's lr, so the initial step size is lw_warmup_lr / lr."""
        warmup_lr = c.lw_warmup_lr or optimizer.default_initial_step_size
        return cls(
            initial_step_size=warmup_lr / c.lr if c.lr > 0 else 0.0,
            alpha_max=c.lw_alpha_max or optimizer.default_alpha_max,
            beta=c.lw_beta,
            damping=c.lw_damping,
            warmup_steps=c.lw_warmup_steps,
            joint_rescale=c.lw_joint_rescale,
            interval=c.lw_interval,
            curvature=c.lw_curvature,
            curvature_rows=c.lw_micro_batch_size,
        )


class LayerwiseAdaptive(FusedOptimizer):
    """Shared by SGDMomentumLW and AdamWLW: per-layer step-size state, refresh(), and the fused step with
    each tensor's step size. Subclasses give the direction d_l, the torch update and the kernel launch.

    State per parameter: the base optimizer's buffers, and 0-dim float32 tensors step_size (alpha_l),
    rho_avg, curvature_avg, direction_sq_avg (EMAs, not bias-corrected) and refreshes (samples averaged).
    """

    scalar_state = ("rho_avg", "curvature_avg", "direction_sq_avg", "refreshes")
    default_initial_step_size: float  # where the settings leave it to the optimizer
    default_alpha_max: float

    def __init__(self, params, defaults: dict, backend: str, settings: LwasSettings | None):
        settings = settings or LwasSettings()
        super().__init__(params, defaults, backend)
        self.settings = dataclasses.replace(
            settings,
            initial_step_size=(
                self.default_initial_step_size if settings.initial_step_size is None else settings.initial_step_size
            ),
            alpha_max=self.default_alpha_max if settings.alpha_max is None else settings.alpha_max,
        )
        self.last_refresh: dict[str, torch.Tensor] = {}  # device tensors of the latest refresh, for logging

    def before_step(self, step: int, context: StepContext) -> None:
        """New step sizes every interval steps, from a curvature pass on (part of) this rank's first
        micro-batch through the uncompiled model (double backward and forward-mode AD do not go through
        torch.compile), averaged over the ranks (the training step's hook, base.StepHooks)."""
        if step % self.settings.interval == 0:
            x, y = context.micro_batches[0]
            rows = self.settings.curvature_rows or len(x)
            self.refresh(
                Curvature(
                    self.settings.curvature,
                    context.raw_model,
                    x[:rows],
                    y[:rows],
                    context.autocast,
                    context.reduce_mean,
                    context.sharded,
                )
            )

    def log_values(self) -> dict:
        """The latest refresh's step sizes (their range) and joint rescale, for the log; none before the
        first one past the warmup."""
        if "step_size" not in self.last_refresh:
            return {}
        step_sizes = self.last_refresh["step_size"]
        return {
            "lw_step_size_min": step_sizes.min().item(),
            "lw_step_size_max": step_sizes.max().item(),
            "lw_joint_scale": self.last_refresh["joint_scale"].item(),
        }

    def _new_state(self, p) -> dict:
        state = {
            name: torch.zeros_like(p, memory_format=torch.preserve_format)
            for name in self.state_names
            if name != "step_size"
        }
        state["step_size"] = torch.full((), self.settings.initial_step_size, dtype=torch.float32, device=p.device)
        state.update({name: torch.zeros((), dtype=torch.float32, device=p.device) for name in self.scalar_state})
        return state

    def _direction(self, group, p) -> torch.Tensor:
        """d for this step's gradient, from the state before the step (which is left unchanged); this
        rank's shard of it under fsdp."""
        raise NotImplementedError

    @torch.no_grad()
    def refresh(self, curvature: Curvature) -> None:
        """New step sizes from the current gradients (call after backward, before step())."""
        active = [(group, p) for group in self.param_groups for p in self._with_grads(group)]
        if not active:
            return
        params = [p for _, p in active]
        states = [self._state(p) for p in params]
        directions = [self._direction(group, p) for group, p in active]
        rho = torch.stack([dot(local(p.grad), d) for p, d in zip(params, directions)])
        direction_sq = torch.stack(torch._foreach_norm(directions)).float().square()
        # Under fsdp each is a sum over this rank's shards: summed over the ranks, in one all-reduce.
        rho, direction_sq = sum_over_shards(torch.stack([rho, direction_sq]), params).unbind()
        with torch.enable_grad():
            curvature_terms = curvature.block_terms(params, directions).float()

        def stacked(name):
            return torch.stack([s[name] for s in states])

        # A non-finite sample leaves that layer's averages as they were; a skipped step (found_inf) leaves
        # every layer's state as it was, step sizes included. On the device: no host sync.
        skip = (
            self.found_inf.bool()
            if self.found_inf is not None
            else torch.zeros((), dtype=torch.bool, device=rho.device)
        )
        finite = torch.isfinite(rho) & torch.isfinite(curvature_terms) & torch.isfinite(direction_sq) & ~skip
        refreshes = stacked("refreshes") + finite.float()
        bias_correction = torch.where(refreshes > 0, 1 - self.settings.beta**refreshes, 1.0)
        averages = {}
        for name, sample in (("rho_avg", rho), ("curvature_avg", curvature_terms), ("direction_sq_avg", direction_sq)):
            average = stacked(name)
            average = torch.where(
                finite,
                self.settings.beta * average + (1 - self.settings.beta) * torch.where(finite, sample, 0.0),
                average,
            )
            torch._foreach_copy_([s[name] for s in states], list(average.unbind()))
            averages[name] = average / bias_correction
        torch._foreach_copy_([s["refreshes"] for s in states], list(refreshes.unbind()))

        step = min(group["step"] for group, _ in active)
        if step < self.settings.warmup_steps:  # the averages fill; the initial step size stands
            self.last_refresh = {"curvature": averages["curvature_avg"], "rho": averages["rho_avg"]}
            return
        step_size = damped_newton_step_size(
            averages["rho_avg"],
            averages["curvature_avg"],
            averages["direction_sq_avg"],
            self.settings.damping,
            self.settings.alpha_max,
        )
        step_size = torch.where(refreshes > 0, step_size, stacked("step_size"))
        joint_scale = torch.ones((), device=rho.device)
        if self.settings.joint_rescale:
            layer_lrs = torch.tensor([layer_lr(group) for group, _ in active], device=rho.device)
            scales = layer_lrs * step_size
            with torch.enable_grad():
                joint = curvature.joint_term(params, [s * d for s, d in zip(scales, directions)]).float()
            decrease = (scales * torch.where(finite, rho, 0.0)).sum()  # g . u: the first-order decrease along u
            joint_scale = torch.where(joint > 0, (decrease / joint).clamp(0.0, 1.0), 1.0)
            joint_scale = torch.where(torch.isfinite(joint_scale), joint_scale, 1.0)
            step_size = step_size * joint_scale
        step_size = torch.where(skip, stacked("step_size"), step_size)
        torch._foreach_copy_([s["step_size"] for s in states], list(step_size.unbind()))
        self.last_refresh = {
            "step_size": step_size,
            "joint_scale": joint_scale,
            "curvature": averages["curvature_avg"],
            "rho": averages["rho_avg"],
        }


def damped_newton_step_size(rho, curvature, direction_sq, damping: float, alpha_max: float) -> torch.Tensor:
    """alpha = rho / (delta (delta + rho)) with delta = sqrt(max(q, 0) + damping |d|^2); 0 where rho <= 0,
    at most alpha_max (zero curvature and no damping give rho / 0 = inf, capped)."""
    delta = torch.sqrt(curvature.clamp(min=0.0) + damping * direction_sq)
    step_size = rho / (delta * (delta + rho))
    return torch.where(rho > 0, step_size.nan_to_num(nan=alpha_max, posinf=alpha_max).clamp(max=alpha_max), 0.0)


@triton.jit
def sgd_momentum_kernel(
    numel_ptr,
    chunk_tensor_ptr,
    chunk_start_ptr,
    found_inf_ptr,
    multiplier_ptr,
    weight_decay_ptr,
    param_ptrs,
    grad_ptrs,
    momentum_buffer_ptrs,
    step_size_ptrs,
    lr,
    momentum,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """torch.optim.SGD's momentum (dampening 0, not Nesterov) with decoupled weight decay:
    p *= 1 - lr*wd; buf = momentum * buf + g; p -= lr * buf."""
    t, offs, mask = chunk(numel_ptr, chunk_tensor_ptr, chunk_start_ptr, found_inf_ptr, BLOCK, ALIGNED)
    lr_t = tensor_lr(lr, multiplier_ptr, step_size_ptrs, t)
    param, p, g = param_and_grad(param_ptrs, grad_ptrs, weight_decay_ptr, t, offs, mask, lr_t, ALIGNED)
    buffer = storage(momentum_buffer_ptrs, t, ALIGNED)
    m = tl.load(buffer + offs, mask=mask) * momentum + g
    p = p - lr_t * m
    tl.store(param + offs, p, mask=mask)
    tl.store(buffer + offs, m, mask=mask)


class SGDMomentumLW(LayerwiseAdaptive):
    """SGD-m-LW: d_l = the momentum buffer after this step's gradient (torch.optim.SGD's, dampening 0),
    buf = momentum * buf + g. Before warmup_steps and with joint_rescale off it is SGD with momentum and
    decoupled weight decay at lr * initial_step_size."""

    state_names = ("momentum_buffer", "step_size")
    scalar_keys = ("lr", "momentum")
    default_initial_step_size = 0.1
    default_alpha_max = 10.0

    def __init__(self, params, lr=1.0, momentum=0.9, weight_decay=0.0, settings=None, backend="auto"):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay), backend, settings)

    def _direction(self, group, p):
        return local(self.state[p]["momentum_buffer"]) * group["momentum"] + local(p.grad)

    def _update_torch(self, group, params, grads, states):
        lr = layer_lr(group)
        for p, g, buffer, step_size in zip(params, grads, *states):
            lr_t = lr * step_size
            if group["weight_decay"]:
                p.mul_(1 - lr_t * group["weight_decay"])
            buffer.mul_(group["momentum"]).add_(g)
            p.sub_(lr_t * buffer)

    def _launch_step(self, plan, grads, found_inf, group):
        params, buffers, step_sizes = plan.tables("param", "momentum_buffer", "step_size")
        plan.launch(
            sgd_momentum_kernel,
            found_inf,
            plan.multiplier,
            plan.weight_decay,
            params,
            grads,
            buffers,
            step_sizes,
            group["lr"],
            group["momentum"],
        )


class AdamWLW(LayerwiseAdaptive):
    """AdamW-LW: d_l = AdamW's bias-corrected direction m_hat / (sqrt(v_hat) + eps) after this step's
    gradient. Before warmup_steps it is torch.optim.AdamW at lr * initial_step_size."""

    state_names = ("exp_avg", "exp_avg_sq", "step_size")
    scalar_keys = ("lr", "betas", "eps")
    default_initial_step_size = 1e-3
    default_alpha_max = 0.1

    def __init__(self, params, lr=1.0, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, settings=None, backend="auto"):
        check_nonnegative_finite("eps", eps)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), backend, settings)

    def _direction(self, group, p):
        state, (beta1, beta2), step, grad = self.state[p], group["betas"], group["step"] + 1, local(p.grad)
        exp_avg = local(state["exp_avg"]).lerp(grad, 1 - beta1)
        exp_avg_sq = local(state["exp_avg_sq"]) * beta2 + (1 - beta2) * grad.square()
        return (exp_avg / (1 - beta1**step)) / (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step) + group["eps"])

    def _update_torch(self, group, params, grads, states):
        update_adamw(group, params, grads, *states)  # states: exp_avg, exp_avg_sq, step_size

    def _launch_step(self, plan, grads, found_inf, group):
        launch_adamw(plan, grads, found_inf, group, step_sizes=plan.pointers["step_size"])


def _inside_the_warmup(base):
    """The base optimizer's reference at the warmup's rate: a step size of initial_step_size multiplies
    every group's rate (the groups carry the config's lr times their multiplier)."""

    def build(c, groups):
        scale = LwasSettings.from_config(c, base).initial_step_size
        return REFERENCE_OPTIMIZERS[base](c, [{**group, "lr": group["lr"] * scale} for group in groups])

    return build


REFERENCE_OPTIMIZERS = {
    SGDMomentumLW: lambda c, groups: torch.optim.SGD(groups, lr=c.lr, momentum=c.beta1),
    AdamWLW: lambda c, groups: torch.optim.AdamW(groups, lr=c.lr, betas=(c.beta1, c.beta2), eps=c.eps),
}
# Inside its warmup, with no refresh yet; SGD-m-LW without weight decay, which torch's SGD couples into
# the gradient where ours is decoupled.
WARMUP = dict(lw_warmup_steps=1000, lw_interval=1000)


def _refuses(c, sharded: bool) -> str | None:
    if not sharded or c.lw_curvature in SHARDABLE_CURVATURES:
        return None
    return (
        f"parallel=fsdp with lw_curvature={c.lw_curvature}: its Hessian-vector products are a double backward, "
        f"which fsdp's gathers do not carry; choose lw_curvature={', '.join(SHARDABLE_CURVATURES)} or parallel=ddp"
    )


SGDM_LW = OptimizerSpec(
    name="sgdm_lw",
    summary="SGD-m-LW (LW-AS, Bahamou and Goldfarb 2023, reconstructed): SGD with momentum, a step size per "
    "layer from the curvature along its direction (lw_*); lr scales the step sizes (try 1.0); by default "
    f"lw_warmup_lr {SGDMomentumLW.default_initial_step_size:g}, lw_alpha_max {SGDMomentumLW.default_alpha_max:g}",
    build=lambda c, groups, n_head, backend: SGDMomentumLW(
        groups, lr=c.lr, momentum=c.beta1, settings=LwasSettings.from_config(c, SGDMomentumLW), backend=backend
    ),
    state_per_parameter=1,
    reference=Reference(
        "torch.optim.SGD with momentum, inside the warmup (the paper publishes no code)",
        _inside_the_warmup(SGDMomentumLW),
        settings={**WARMUP, "weight_decay": 0.0},
    ),
    gpu_check=dict(lr=1.0, lw_interval=2, lw_warmup_steps=2),
    kernels={sgd_momentum_kernel: 20},  # reads p, g, the buffer and writes p, the buffer
    refresh_interval=lambda c: c.lw_interval,
    tolerance=(1e-5, 1e-6),
    refuses=_refuses,
)

ADAMW_LW = OptimizerSpec(
    name="adamw_lw",
    summary="AdamW-LW (LW-AS, reconstructed): AdamW's direction, a step size per layer from the curvature "
    "along it (lw_*); lr scales the step sizes; by default "
    f"lw_warmup_lr {AdamWLW.default_initial_step_size:g}, lw_alpha_max {AdamWLW.default_alpha_max:g}",
    build=lambda c, groups, n_head, backend: AdamWLW(
        groups,
        lr=c.lr,
        betas=(c.beta1, c.beta2),
        eps=c.eps,
        settings=LwasSettings.from_config(c, AdamWLW),
        backend=backend,
    ),
    state_per_parameter=2,
    reference=Reference("torch.optim.AdamW, inside the warmup", _inside_the_warmup(AdamWLW), settings=WARMUP),
    gpu_check=dict(lr=0.1, lw_interval=2, lw_warmup_steps=2),
    kernels={adamw_kernel: 28},  # AdamW's, each tensor's rate times its step size
    refresh_interval=lambda c: c.lw_interval,
    tolerance=(1e-5, 1e-6),
    refuses=_refuses,
)
