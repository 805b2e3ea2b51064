"""Adam-mini (Zhang et al. 2024, "Adam-mini: Use Fewer Learning Rates To Gain More"), as the official code
(adam-mini 1.1.1) computes it, each group at its layer's rate: Adam with one second-moment value per
block of parameters instead of one per parameter (ADAM_MINI_BLOCKS), its two Triton kernels (a per-block
mean of g^2, then the update), its torch path, and the per-block statistics summed over the ranks' shards
under fsdp.
"""

import math

import torch
import triton
import triton.language as tl
from torch.distributed.tensor import DTensor

from model import GPTConfig, param_role
from optimizers import base
from optimizers.base import FusedOptimizer, check_nonnegative_finite, layer_lr, owner_and_index
from optimizers.kernels import VECTOR_ELEMENTS, chunk, param_and_grad, storage, tensor_lr
from optimizers.spec import OptimizerSpec, Reference
from runtime.fsdp import local, shard_rows, sum_over_shards


@triton.jit
def block_mean_square_kernel(
    block_size_ptr,
    block_tensor_ptr,
    block_index_ptr,
    found_inf_ptr,
    grad_ptrs,
    exp_avg_sq_ptrs,
    beta2,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Adam-mini's second moment: one program per block (a head, a row or a whole tensor) reduces
    mean(g^2) over it in a loop, no atomics, so the result is deterministic; v = b2 * v + (1 - b2) * mean.
    ALIGNED here also promises that every block size is a multiple of 4, so each block starts 16-byte aligned."""
    block = tl.program_id(0)
    t = tl.load(block_tensor_ptr + block)
    size = tl.load(block_size_ptr + t)
    if ALIGNED:
        size = tl.multiple_of(size, 4)
    start = tl.load(block_index_ptr + block) * size
    grad = storage(grad_ptrs, t, ALIGNED) + start
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    i = 0
    # A while loop: its bound is data (Triton's interpreter needs a static range bound).
    while i * BLOCK < size:
        # i * BLOCK, not a running offset: a multiple of BLOCK the compiler can see
        offs = i * BLOCK + tl.arange(0, BLOCK)
        g = tl.load(grad + offs, mask=offs < size, other=0.0)
        total += g * g
        i += 1
    v_ptr = tl.load(exp_avg_sq_ptrs + t).to(tl.pointer_type(tl.float32)) + tl.load(block_index_ptr + block)
    v = tl.load(v_ptr)
    keep = tl.load(found_inf_ptr) == 0
    tl.store(v_ptr, tl.where(keep, v * beta2 + (1.0 - beta2) * (tl.sum(total) / size), v))


@triton.jit
def adam_mini_kernel(
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
    block_size_ptr,
    lr,
    beta1,
    beta2,
    eps,
    bias_correction1,
    bias_correction2_sqrt,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Adam-mini's update, each element's v read from its block (block size 1: plain Adam, v per element)."""
    t, offs, mask = chunk(numel_ptr, chunk_tensor_ptr, chunk_start_ptr, found_inf_ptr, BLOCK, ALIGNED)
    lr_t = tensor_lr(lr, multiplier_ptr, None, t)
    size = tl.load(block_size_ptr + t)
    param, p, g = param_and_grad(param_ptrs, grad_ptrs, weight_decay_ptr, t, offs, mask, lr_t, ALIGNED)
    exp_avg, exp_avg_sq = storage(exp_avg_ptrs, t, ALIGNED), storage(exp_avg_sq_ptrs, t, ALIGNED)
    m = tl.load(exp_avg + offs, mask=mask)
    if size == 1:  # a bias: plain Adam, v per element (a contiguous access, vectorized like the others)
        v = tl.load(exp_avg_sq + offs, mask=mask)
        v = v * beta2 + (1.0 - beta2) * (g * g)
        tl.store(exp_avg_sq + offs, v, mask=mask)
    else:  # one v per block: a gather that mostly hits the same address (4 bytes per element from L1)
        v = tl.load(exp_avg_sq + offs // size, mask=mask)
    m = m + (1.0 - beta1) * (g - m)
    denom = tl.sqrt(v) / bias_correction2_sqrt + eps
    p = p - (lr_t / bias_correction1) * (m / denom)
    tl.store(param + offs, p, mask=mask)
    tl.store(exp_avg + offs, m, mask=mask)


# Adam-mini's blocks by parameter role (model.param_role), as the official code (adam-mini 1.1.1) assigns
# them: biases use Adam (a block per element); q and k one block per head; v, the attention output, the
# MLP and the embedding one block per output row; LayerNorm scales and the position embedding one block
# per tensor.
ADAM_MINI_BLOCKS = {
    "q": "head",
    "k": "head",
    "v": "row",
    "attn_out": "row",
    "mlp_in": "row",
    "mlp_out": "row",
    "embedding": "row",
    "position": "tensor",
    "layernorm": "tensor",
}


def row_length(p: torch.Tensor) -> int:
    """Elements per row (dim 0) of the whole tensor: 1 for a vector."""
    return p.numel() // p.shape[0]


def adam_mini_block_size(name: str, p: torch.Tensor, n_head: int) -> int:
    role = param_role(name)
    if role.layer not in ADAM_MINI_BLOCKS:
        raise ValueError(f"AdamMini: no role for parameter {name!r}; add its module to model.LAYER_ROLES")
    block = "element" if role.is_bias else ADAM_MINI_BLOCKS[role.layer]
    if block == "element":
        return 1
    if block == "head":
        if p.shape[0] % n_head:
            raise ValueError(f"AdamMini: {name} has {p.shape[0]} rows, not divisible into n_head={n_head} heads")
        return p.numel() // n_head
    return p.shape[1] if block == "row" else p.numel()


class AdamMini(FusedOptimizer):
    """Adam-mini (Zhang et al. 2024; the official code, adam-mini 1.1.1): Adam with one second-moment
    value per block instead of per parameter (ADAM_MINI_BLOCKS), bias correction and decoupled weight
    decay as the official code. Param groups need "names" (param_groups gives them). The triton
    backend takes two launches: a per-block mean of g^2, then the update."""

    state_names = ("exp_avg", "exp_avg_sq")
    scalar_keys = ("lr", "betas", "eps")

    def __init__(self, params, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, n_head=12, backend="auto"):
        check_nonnegative_finite("eps", eps)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), backend)
        self.block_size = {}
        self._sharded_blocks = {}  # under fsdp: a sharded tensor (blocks above one element) -> its rows' blocks
        for group in self.param_groups:
            names = group.get("names")
            if names is None or len(names) != len(group["params"]):
                raise ValueError(
                    "AdamMini needs each param group's parameter names: use optimizers.base.param_groups(model, ...)"
                )
            for name, p in zip(names, group["params"]):
                self.block_size[p] = adam_mini_block_size(name, p, n_head)
                if isinstance(p, DTensor) and self.block_size[p] > 1:
                    self._sharded_blocks[p] = self._blocks_of_rows(p)

    def _new_state(self, p) -> dict:  # one second-moment value per block
        size = self.block_size[p]
        # A bias's v is per element (sharded like the bias under fsdp); a block's is one value, kept whole on
        # every rank under fsdp (a few per row).
        exp_avg_sq = (
            torch.zeros_like(p) if size == 1 else torch.zeros(p.numel() // size, dtype=p.dtype, device=p.device)
        )
        return {"exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format), "exp_avg_sq": exp_avg_sq}

    def _blocks_of_rows(self, p) -> torch.Tensor:
        """The block of each row this rank holds of a sharded tensor: a block is block_size / row length
        consecutive rows (a row, a head's rows, or all of them), which fsdp's cut along rows may split."""
        rows = shard_rows(p)
        rows_per_block = self.block_size[p] // row_length(p)
        return torch.arange(rows.start, rows.stop, device=local(p).device) // rows_per_block

    @torch.no_grad()
    def step(self, closure=None):
        self._update_sharded_second_moments()
        return super().step(closure)

    def _update_sharded_second_moments(self) -> None:
        """Under fsdp, before the update: each block's mean of g^2 over every rank's part of it (one
        all-reduce of every tensor's block sums), then v's moving average, kept as it was while found_inf
        is set. Unsharded tensors take theirs in the update, as before."""
        if not self._sharded_blocks:  # not under fsdp: nothing to do before the update
            return
        sharded = [(g, p) for _, g, params in self._active() for p in params if p in self._sharded_blocks]
        if not sharded:
            return
        sums = []
        for _, p in sharded:
            grad, rows = local(p.grad), self._sharded_blocks[p]
            squares = (grad * grad).view(len(rows), row_length(p)).sum(dim=1)
            sums.append(torch.zeros_like(self.state[p]["exp_avg_sq"]).index_add_(0, rows, squares))
        totals = sum_over_shards(torch.cat(sums), [p for _, p in sharded])
        for (group, p), block_total in zip(sharded, totals.split([s.numel() for s in sums])):
            v, beta2 = self.state[p]["exp_avg_sq"], group["betas"][1]
            averaged = (v * beta2).add_(block_total / self.block_size[p], alpha=1 - beta2)
            v.copy_(averaged if self.found_inf is None else torch.where(self.found_inf > 0, v, averaged))

    def _update_torch(self, group, params, grads, states):
        beta1, beta2 = group["betas"]
        lr = layer_lr(group)
        step = group["step"]
        bias_correction1, bias_correction2_sqrt = 1 - beta1**step, math.sqrt(1 - beta2**step)
        for held, p, g, m, v in zip(self._with_grads(group), params, grads, *states):  # held: the parameter itself
            size = self.block_size[held]
            if held in self._sharded_blocks:  # v is every block's, this step's already in (above)
                rows = self._sharded_blocks[held]
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                m.lerp_(g, 1 - beta1)
                denom = (v[rows].sqrt() / bias_correction2_sqrt).add_(group["eps"])  # one per row held
                shape = (len(rows), row_length(held))  # (rows held, row length): possibly no rows at all
                p.view(shape).addcdiv_(m.view(shape), denom.view(-1, 1), value=-lr / bias_correction1)
                continue
            mean_square = g * g if size == 1 else (g * g).view(-1, size).mean(dim=1)
            v.mul_(beta2).add_(mean_square.view(-1), alpha=1 - beta2)
            if group["weight_decay"]:
                p.mul_(1 - lr * group["weight_decay"])
            m.lerp_(g, 1 - beta1)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(group["eps"])
            if size == 1:
                p.addcdiv_(m, denom.view_as(p), value=-lr / bias_correction1)
            else:  # one denominator per block (row of the (blocks, size) view)
                p.view(-1, size).addcdiv_(m.view(-1, size), denom.view(-1, 1), value=-lr / bias_correction1)

    def _extend_plan(self, plan) -> None:
        """Each tensor's block size, and each reduction program's (tensor, block). Biases (block size 1)
        get no reduction program: the update kernel keeps their per-element second moment. A sharded
        tensor's blocks were averaged before the launch (_update_sharded_second_moments): the kernel reads
        its v from a copy with one value per row held, as a tensor of one-row blocks (or, one element per
        row, of a single block: a size above its element count)."""
        sizes, counts, row_values = [], [], []
        for p, v in zip(plan.params, [self.state[p]["exp_avg_sq"] for p in plan.params]):
            if p in self._sharded_blocks:
                rows = self._sharded_blocks[p]
                sizes.append(row_length(p) if row_length(p) > 1 else local(p).numel() + 1)
                counts.append(0)
                row_values.append(torch.empty(len(rows), dtype=v.dtype, device=v.device))
            else:
                sizes.append(self.block_size[p])
                counts.append(p.numel() // sizes[-1] if sizes[-1] > 1 else 0)
                row_values.append(local(v))
        plan.row_values = [(p, rows) for p, rows in zip(plan.params, row_values) if p in self._sharded_blocks]
        plan.pointers["exp_avg_sq"] = plan.pointer_table(row_values, plan.numel.device)
        plan.block_size = torch.tensor(sizes, dtype=torch.int32, device=plan.numel.device)
        plan.block_tensor, plan.block_index = owner_and_index(counts, plan.numel.device)
        # each block starts 16-byte aligned
        plan.blocks_aligned = all(size % VECTOR_ELEMENTS == 0 for size, count in zip(sizes, counts) if count)

    def _launch_step(self, plan, grads, found_inf, group):
        beta1, beta2 = group["betas"]
        step = group["step"]
        for p, values in plan.row_values:  # each held row's block value, for the kernel to read
            torch.index_select(self.state[p]["exp_avg_sq"], 0, self._sharded_blocks[p], out=values)
        params, exp_avgs, exp_avg_sqs = plan.tables("param", "exp_avg", "exp_avg_sq")
        if plan.block_tensor.numel():  # 1024 elements per loop trip at 4 warps: 8 per thread, two 128-bit loads
            base.launch_kernel(
                block_mean_square_kernel,
                (plan.block_tensor.numel(),),
                plan.block_size,
                plan.block_tensor,
                plan.block_index,
                found_inf,
                grads,
                exp_avg_sqs,
                beta2,
                BLOCK=1024,
                ALIGNED=plan.aligned and plan.blocks_aligned,
                num_warps=4,
            )
        plan.launch(
            adam_mini_kernel,
            found_inf,
            plan.multiplier,
            plan.weight_decay,
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            plan.block_size,
            group["lr"],
            beta1,
            beta2,
            group["eps"],
            1 - beta1**step,
            math.sqrt(1 - beta2**step),
        )


def _official(c, groups):
    """The official code, one param group per parameter (its own), each set to our group's rate."""
    import adam_mini  # a peer library, installed for the tests (requirements-dev.txt)

    shape = GPTConfig.from_preset(c.model)
    named = [(name, p) for group in groups for name, p in zip(group["names"], group["params"])]
    reference = adam_mini.Adam_mini(
        named,
        lr=c.lr,
        betas=(c.beta1, c.beta2),
        eps=c.eps,
        weight_decay=c.weight_decay,
        dim=shape.n_embd,
        n_heads=shape.n_head,
        verbose=False,
    )
    rates = {name: group["lr"] for group in groups for name in group["names"]}
    for group in reference.param_groups:
        group["lr"] = rates[group["name"]]
    return reference


ADAM_MINI = OptimizerSpec(
    name="adam_mini",
    summary="Adam-mini (Zhang et al. 2024), a second moment per block (head, row or tensor), two Triton "
    "launches on CUDA (the official code's update)",
    build=lambda c, groups, n_head, backend: AdamMini(
        groups, lr=c.lr, betas=(c.beta1, c.beta2), eps=c.eps, n_head=n_head, backend=backend
    ),
    state_per_parameter=1,  # the first moment; the second is one value per block
    reference=Reference("adam-mini's Adam_mini (the official code, 1.1.1)", _official),
    gpu_check=dict(lr=1e-3),
    # the block reduction reads g; the update reads p, g, m, its block's v and writes p, m
    kernels={block_mean_square_kernel: 4, adam_mini_kernel: 20},
    tolerance=(1e-5, 1e-6),
)
