"""AdamW (Loshchilov and Hutter 2019) as torch.optim.AdamW computes it, each group at its layer's rate:
the Triton kernel that updates every tensor of every group in one launch, its torch path (torch's own
fused kernel), and torch.optim.AdamW(fused=True) itself as the plain-PyTorch baseline (adamw_torch).

    p *= 1 - lr*wd;  m = lerp(m, g, 1 - b1);  v = b2 v + (1 - b2) g^2;  p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)

AdamW-LW (lwas.py) and Muon's AdamW part (muon.py) take the same kernel and torch path.
"""

import math

import torch
import triton
import triton.language as tl

from optimizers.base import FusedOptimizer, check_nonnegative_finite, layer_lr, with_layer_lr
from optimizers.kernels import chunk, param_and_grad, storage, tensor_lr
from optimizers.spec import OptimizerSpec, Reference


@triton.jit
def adamw_kernel(
    numel_ptr,
    chunk_tensor_ptr,
    chunk_start_ptr,
    found_inf_ptr,
    multiplier_ptr,
    weight_decay_ptr,
    param_ptrs,
    grad_ptrs,
    exp_avg_ptrs,
    exp_avg_sq_ptrs,
    step_size_ptrs,
    lr,
    beta1,
    beta2,
    eps,
    bias_correction1,
    bias_correction2_sqrt,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """torch.optim.AdamW: p *= 1 - lr*wd; m = lerp(m, g, 1 - b1); v = b2 v + (1 - b2) g^2;
    p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)."""
    t, offs, mask = chunk(numel_ptr, chunk_tensor_ptr, chunk_start_ptr, found_inf_ptr, BLOCK, ALIGNED)
    lr_t = tensor_lr(lr, multiplier_ptr, step_size_ptrs, t)
    param, p, g = param_and_grad(param_ptrs, grad_ptrs, weight_decay_ptr, t, offs, mask, lr_t, ALIGNED)
    exp_avg, exp_avg_sq = storage(exp_avg_ptrs, t, ALIGNED), storage(exp_avg_sq_ptrs, t, ALIGNED)
    m = tl.load(exp_avg + offs, mask=mask)
    v = tl.load(exp_avg_sq + offs, mask=mask)
    m = m + (1.0 - beta1) * (g - m)  # torch's lerp_(g, 1 - beta1)
    v = v * beta2 + (1.0 - beta2) * (g * g)
    denom = tl.sqrt(v) / bias_correction2_sqrt + eps
    p = p - (lr_t / bias_correction1) * (m / denom)
    tl.store(param + offs, p, mask=mask)
    tl.store(exp_avg + offs, m, mask=mask)
    tl.store(exp_avg_sq + offs, v, mask=mask)


def update_adamw(group, params, grads, exp_avgs, exp_avg_sqs, step_sizes=None) -> None:
    """AdamW's torch step for one group: torch's own fused AdamW kernel (one pass over memory; the
    foreach ops it replaced made about eight, 4.5x slower on a CPU) at lr * multiplier, so the result is
    torch.optim.AdamW(fused=True)'s to the bit. step_sizes, per-tensor 0-dim tensors multiplying the rate,
    are AdamW-LW's (lwas.py): one call per tensor, each at its own rate; reading them costs one host sync,
    as found_inf already does on this path. The kernel reads the step count from a tensor it does not
    change (torch.optim increments its own before the call), so one tensor serves every parameter."""
    beta1, beta2 = group["betas"]
    lr = layer_lr(group)
    step = [torch.full((), float(group["step"]), device=params[0].device)] * len(params)
    settings = dict(
        beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False, maximize=False
    )
    if not step_sizes:
        torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], step, lr=lr, **settings)
        return
    for i, size in enumerate(torch.stack(step_sizes).tolist()):
        torch._fused_adamw_(
            params[i : i + 1],
            grads[i : i + 1],
            exp_avgs[i : i + 1],
            exp_avg_sqs[i : i + 1],
            [],
            step[:1],
            lr=lr * size,
            **settings,
        )


def launch_adamw(plan, grads, found_inf, group, step_sizes=None) -> None:
    """AdamW's one launch over a plan; step_sizes, a table of per-tensor step sizes, is AdamW-LW's (lwas.py)."""
    beta1, beta2 = group["betas"]
    step = group["step"]
    params, exp_avgs, exp_avg_sqs = plan.tables("param", "exp_avg", "exp_avg_sq")
    plan.launch(
        adamw_kernel,
        found_inf,
        plan.multiplier,
        plan.weight_decay,
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        step_sizes,
        group["lr"],
        beta1,
        beta2,
        group["eps"],
        1 - beta1**step,
        math.sqrt(1 - beta2**step),
    )


class AdamW(FusedOptimizer):
    state_names = ("exp_avg", "exp_avg_sq")
    scalar_keys = ("lr", "betas", "eps")

    def __init__(self, params, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, backend="auto"):
        check_nonnegative_finite("eps", eps)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), backend)

    def _update_torch(self, group, params, grads, states):
        update_adamw(group, params, grads, *states)

    def _launch_step(self, plan, grads, found_inf, group):
        launch_adamw(plan, grads, found_inf, group)


class TorchAdamW(with_layer_lr(torch.optim.AdamW)):
    """torch.optim.AdamW(fused=True), the plain-PyTorch baseline, at each group's layer_lr."""

    def __init__(self, params, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)


def _torch_adamw(c, groups):
    return torch.optim.AdamW(groups, lr=c.lr, betas=(c.beta1, c.beta2), eps=c.eps, fused=True)


ADAMW = OptimizerSpec(
    name="adamw",
    summary="AdamW, every tensor of every group in one Triton launch on CUDA (torch.optim.AdamW's update)",
    build=lambda c, groups, n_head, backend: AdamW(
        groups, lr=c.lr, betas=(c.beta1, c.beta2), eps=c.eps, backend=backend
    ),
    state_per_parameter=2,
    reference=Reference("torch.optim.AdamW(fused=True)", _torch_adamw),
    gpu_check=dict(lr=1e-3),
    kernels={adamw_kernel: 28},  # reads p, g, m, v and writes p, m, v
    tolerance=(1e-5, 1e-6),
)

ADAMW_TORCH = OptimizerSpec(
    name="adamw_torch",
    summary="torch.optim.AdamW(fused=True), the plain-PyTorch baseline: one launch per param group",
    build=lambda c, groups, n_head, backend: TorchAdamW(groups, lr=c.lr, betas=(c.beta1, c.beta2), eps=c.eps),
    state_per_parameter=2,
    reference=Reference("torch.optim.AdamW(fused=True)", _torch_adamw),
    gpu_check=dict(lr=1e-3),
)
