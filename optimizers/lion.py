"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), as lion-pytorch computes it,
each group at its layer's rate: its Triton kernel, one launch for every tensor, and its torch path.

    p *= 1 - lr*wd;  p -= lr * sign(b1 m + (1 - b1) g);  m = b2 m + (1 - b2) g
"""

import torch
import triton
import triton.language as tl

from optimizers.base import FusedOptimizer, layer_lr
from optimizers.kernels import chunk, param_and_grad, sign, storage, tensor_lr
from optimizers.spec import OptimizerSpec, Reference


@triton.jit
def lion_kernel(
    numel_ptr,
    chunk_tensor_ptr,
    chunk_start_ptr,
    found_inf_ptr,
    multiplier_ptr,
    weight_decay_ptr,
    param_ptrs,
    grad_ptrs,
    exp_avg_ptrs,
    lr,
    beta1,
    beta2,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Lion (lion-pytorch): p *= 1 - lr*wd; p -= lr * sign(b1 m + (1 - b1) g); m = b2 m + (1 - b2) g."""
    t, offs, mask = chunk(numel_ptr, chunk_tensor_ptr, chunk_start_ptr, found_inf_ptr, BLOCK, ALIGNED)
    lr_t = tensor_lr(lr, multiplier_ptr, None, t)
    param, p, g = param_and_grad(param_ptrs, grad_ptrs, weight_decay_ptr, t, offs, mask, lr_t, ALIGNED)
    exp_avg = storage(exp_avg_ptrs, t, ALIGNED)
    m = tl.load(exp_avg + offs, mask=mask)
    p = p - lr_t * sign(m * beta1 + (1.0 - beta1) * g)
    m = m * beta2 + (1.0 - beta2) * g
    tl.store(param + offs, p, mask=mask)
    tl.store(exp_avg + offs, m, mask=mask)


class Lion(FusedOptimizer):
    state_names = ("exp_avg",)
    scalar_keys = ("lr", "betas")

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, backend="auto"):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay), backend)

    def _update_torch(self, group, params, grads, states):
        (exp_avgs,) = states
        beta1, beta2 = group["betas"]
        lr = layer_lr(group)
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        updates = torch._foreach_mul(exp_avgs, beta1)
        torch._foreach_add_(updates, grads, alpha=1 - beta1)
        torch._foreach_sign_(updates)
        torch._foreach_add_(params, updates, alpha=-lr)
        torch._foreach_mul_(exp_avgs, beta2)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta2)

    def _launch_step(self, plan, grads, found_inf, group):
        beta1, beta2 = group["betas"]
        params, exp_avgs = plan.tables("param", "exp_avg")
        plan.launch(
            lion_kernel,
            found_inf,
            plan.multiplier,
            plan.weight_decay,
            params,
            grads,
            exp_avgs,
            group["lr"],
            beta1,
            beta2,
        )


def _lion_pytorch(c, groups):
    import lion_pytorch  # a peer library, installed for the tests (requirements-dev.txt)

    return lion_pytorch.Lion(groups, lr=c.lr, betas=(c.beta1, c.beta2))


LION = OptimizerSpec(
    name="lion",
    summary="Lion (Chen et al. 2023), one Triton launch on CUDA (lion-pytorch's update)",
    build=lambda c, groups, n_head, backend: Lion(groups, lr=c.lr, betas=(c.beta1, c.beta2), backend=backend),
    state_per_parameter=1,
    reference=Reference("lion-pytorch's Lion", _lion_pytorch),
    gpu_check=dict(lr=1e-4),
    kernels={lion_kernel: 20},  # reads p, g, m and writes p, m
    tolerance=(1e-5, 1e-6),
)
