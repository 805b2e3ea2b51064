"""SophiaG (Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
Pre-training"), as the official code (sophia-opt) computes it, each group at its layer's rate: its
Triton kernels (the step, and the Hessian refresh's moving average), their torch paths, and the refresh
itself after every hess_interval-th step, from labels sampled from the model's own predictions.

    p *= 1 - lr*wd;  m = b1 m + (1 - b1) g;  p -= lr * sign(m) * min(|m| / (rho * bs * h + 1e-15), 1)
    update_hessian():  h = b2 h + (1 - b2) g^2, g the gradient of the sampled-label loss
"""

import math

import torch
import triton
import triton.language as tl

from optimizers.base import FusedOptimizer, StepContext, check_nonnegative_finite, layer_lr
from optimizers.kernels import chunk, param_and_grad, sign, storage, tensor_lr
from optimizers.sampled_labels import sampled_label_gradients
from optimizers.spec import OptimizerSpec, Reference
from runtime.fsdp import local


@triton.jit
def sophiag_kernel(
    numel_ptr,
    chunk_tensor_ptr,
    chunk_start_ptr,
    found_inf_ptr,
    multiplier_ptr,
    weight_decay_ptr,
    param_ptrs,
    grad_ptrs,
    exp_avg_ptrs,
    hessian_ptrs,
    lr,
    beta1,
    rho_bs,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """SophiaG (the official code): p *= 1 - lr*wd; m = b1 m + (1 - b1) g;
    p -= lr sign(m) min(|m| / (rho bs h + 1e-15), 1)."""
    t, offs, mask = chunk(numel_ptr, chunk_tensor_ptr, chunk_start_ptr, found_inf_ptr, BLOCK, ALIGNED)
    lr_t = tensor_lr(lr, multiplier_ptr, None, t)
    param, p, g = param_and_grad(param_ptrs, grad_ptrs, weight_decay_ptr, t, offs, mask, lr_t, ALIGNED)
    exp_avg = storage(exp_avg_ptrs, t, ALIGNED)
    m = tl.load(exp_avg + offs, mask=mask)
    h = tl.load(storage(hessian_ptrs, t, ALIGNED) + offs, mask=mask)
    m = m * beta1 + (1.0 - beta1) * g
    ratio = tl.minimum(tl.abs(m) / (rho_bs * h + 1e-15), 1.0)
    p = p - lr_t * (sign(m) * ratio)
    tl.store(param + offs, p, mask=mask)
    tl.store(exp_avg + offs, m, mask=mask)


@triton.jit
def ema_of_square_kernel(
    numel_ptr,
    chunk_tensor_ptr,
    chunk_start_ptr,
    found_inf_ptr,
    target_ptrs,
    grad_ptrs,
    beta,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """target = beta * target + (1 - beta) * g * g: SophiaG's Hessian estimate update."""
    t, offs, mask = chunk(numel_ptr, chunk_tensor_ptr, chunk_start_ptr, found_inf_ptr, BLOCK, ALIGNED)
    target = storage(target_ptrs, t, ALIGNED)
    g = tl.load(storage(grad_ptrs, t, ALIGNED) + offs, mask=mask)
    h = tl.load(target + offs, mask=mask)
    tl.store(target + offs, h * beta + (1.0 - beta) * (g * g), mask=mask)


class SophiaG(FusedOptimizer):
    """bs: tokens per optimizer step (the official code's `bs` argument of step()); it scales the
    Hessian estimate, which update_hessian() accumulates from a gradient of sampled-label loss."""

    state_names = ("exp_avg", "hessian")
    scalar_keys = ("lr", "betas", "rho", "bs")

    def __init__(
        self,
        params,
        lr=6e-4,
        betas=(0.965, 0.99),
        rho=0.04,
        weight_decay=0.1,
        bs=5120,
        hess_interval=10,
        backend="auto",
    ):
        check_nonnegative_finite("rho", rho)
        if not (math.isfinite(bs) and bs > 0):
            raise ValueError(f"bs must be a positive number of tokens, got {bs}")
        if hess_interval < 1:
            raise ValueError(f"hess_interval must be >= 1, got {hess_interval}")
        super().__init__(params, dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, bs=bs), backend)
        self.hess_interval = hess_interval

    def after_step(self, step: int, context: StepContext) -> None:
        """Sophia's schedule: a Hessian refresh after every hess_interval-th step, from the gradient of
        sampled-label loss; skipped like step() while found_inf is set."""
        if step % self.hess_interval == self.hess_interval - 1:
            sampled_label_gradients(context)
            self.update_hessian()  # reads found_inf
            self.zero_grad(set_to_none=True)

    def _validate_group(self, group):
        super()._validate_group(group)
        check_nonnegative_finite("rho", group["rho"])

    def _update_torch(self, group, params, grads, states):
        exp_avgs, hessians = states
        beta1, _ = group["betas"]
        lr = layer_lr(group)
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        for p, m, h in zip(params, exp_avgs, hessians):
            ratio = (m.abs() / (group["rho"] * group["bs"] * h + 1e-15)).clamp(None, 1)
            p.addcmul_(m.sign(), ratio, value=-lr)

    def _launch_step(self, plan, grads, found_inf, group):
        beta1, _ = group["betas"]
        params, exp_avgs, hessians = plan.tables("param", "exp_avg", "hessian")
        plan.launch(
            sophiag_kernel,
            found_inf,
            plan.multiplier,
            plan.weight_decay,
            params,
            grads,
            exp_avgs,
            hessians,
            group["lr"],
            beta1,
            group["rho"] * group["bs"],
        )

    @torch.no_grad()
    def update_hessian(self):
        """h = beta2 * h + (1 - beta2) * g * g for every parameter with a gradient (call it after a
        backward of the sampled-label loss). Skipped, like step(), while found_inf is set: one non-finite
        gradient would otherwise stay in h for good."""
        active = self._active()
        if not active:
            return
        if not self.use_triton(active[0][2][0].device):
            if self.found_inf is not None and self.found_inf.item():
                return
            for _, group, params in active:
                hessians = [local(self.state[p]["hessian"]) for p in params]
                grads = [local(p.grad) for p in params]
                torch._foreach_mul_(hessians, group["betas"][1])
                torch._foreach_addcmul_(hessians, grads, grads, 1 - group["betas"][1])
            return
        for bucket in self._buckets(active, ("betas",)):
            plan, grads, found_inf = self._bucket_plan("hessian", bucket, ("hessian",))
            plan.launch(ema_of_square_kernel, found_inf, plan.pointers["hessian"], grads, bucket[0][1]["betas"][1])


class _TokensAtStep:
    """sophia-opt's SophiaG, which takes the tokens per step in step(bs=...) where ours takes them once."""

    def __init__(self, optimizer, bs: int):
        self.optimizer, self.bs = optimizer, bs

    def step(self):
        return self.optimizer.step(bs=self.bs)

    def __getattr__(self, name):  # state, param_groups, update_hessian: sophia-opt's own
        return getattr(self.optimizer, name)


def _sophia_opt(c, groups):
    import sophia_opt  # a peer library, installed for the tests (requirements-dev.txt)

    return _TokensAtStep(sophia_opt.SophiaG(groups, lr=c.lr, betas=(c.beta1, c.beta2), rho=c.rho), c.tokens_per_step)


SOPHIAG = OptimizerSpec(
    name="sophiag",
    summary="SophiaG (Liu et al. 2023), one Triton launch on CUDA (the official code's update), a Hessian "
    "refresh every hess_interval steps",
    build=lambda c, groups, n_head, backend: SophiaG(
        groups,
        lr=c.lr,
        betas=(c.beta1, c.beta2),
        rho=c.rho,
        bs=c.tokens_per_step,
        hess_interval=c.hess_interval,
        backend=backend,
    ),
    state_per_parameter=2,
    reference=Reference("sophia-opt's SophiaG (the official code)", _sophia_opt),
    gpu_check=dict(lr=1e-3, hess_interval=2),
    kernels={sophiag_kernel: 24},  # reads p, g, m, h and writes p, m
    refresh_kernels={ema_of_square_kernel: 12},  # reads h, g and writes h
    refresh_interval=lambda c: c.hess_interval,
    refresh=lambda optimizer: optimizer.update_hessian(),
    tolerance=(1e-5, 1e-6),
)
