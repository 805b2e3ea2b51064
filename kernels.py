"""The Triton kernels behind optim.py's fused optimizers (and LW-AS's, lwas.py). The classes that
launch them, and their plain-PyTorch references, are in optim.py and lwas.py.

Every elementwise kernel runs on a grid of chunks: program i updates BLOCK elements of one tensor,
found through device tables (optim._LaunchPlan) that hold each tensor's pointers, size, lr_scale and
weight decay. All kernels open with `_chunk`, read tensors through `_tensor`, and the optimizer
steps take their parameter (decayed) and gradient from `_param_and_grad`.

Why BLOCK = 1024 at 8 warps, and the ALIGNED hints (figures from `python -m bench.kernel_report`, sm_90,
Triton 3.6, static: compiled and assembled, not run):
  - A pointer read from a table carries no alignment, and a size read from memory no divisibility, so
    without hints every access is a scalar 32-bit load or store with its own 64-bit address. The first
    version (BLOCK 4096, no hints) took 220 registers per thread for AdamW: one program of 8 warps per
    SM (12.5% occupancy), 0% of its traffic in 128-bit accesses.
  - With ALIGNED (checked when the plan is built: every tensor's storage 16-byte aligned and every size a
    multiple of 4) the kernels hint both facts, and each thread's 4 contiguous elements move as one
    128-bit access, masked tail included: no separate tail path is needed. 100% of AdamW's, Lion's,
    SophiaG's and SGD-m's element bytes, 88% of Adam-mini's (its per-block v is a gather).
  - 4 elements per thread (1024 at 8 warps): AdamW takes 32 registers, so 8 programs (64 warps, full
    occupancy) fit an SM with 128 KiB of loads in flight, five times the ~25 KB that Little's law asks
    of an H100 (3.35 TB/s x ~1 us / 132 SMs). 8 elements per thread takes 48 registers (62%), 16 takes 86
    (25%), for no more bytes in flight. 512 at 4 warps is the same per thread with twice the programs.
  - A plan with any unaligned tensor (a view at an odd offset, a size like 4097 or 1) launches the
    ALIGNED=False build: no hints, scalar accesses, correct for any layout; AdamW at 48-58 registers.
"""

import triton
import triton.language as tl

BLOCK = 1024  # elements per program: 4 per thread at 8 warps, one 128-bit access per tensor
NUM_WARPS = 8
VECTOR_BYTES = 16  # the alignment ALIGNED promises for every tensor's storage
VECTOR_ELEMENTS = 4  # fp32 elements per 128-bit access: every size is a multiple of it under ALIGNED


@triton.jit
def _chunk(numel_ptr, chunk_tensor_ptr, chunk_start_ptr, found_inf_ptr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """This program's tensor index, element offsets within it, and the mask (bounds and found_inf)."""
    chunk = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + chunk)
    offs = tl.multiple_of(tl.load(chunk_start_ptr + chunk), BLOCK) + tl.arange(0, BLOCK)  # chunks start at k * BLOCK
    numel = tl.load(numel_ptr + t)
    if ALIGNED:
        numel = tl.multiple_of(numel, 4)  # the mask is constant over each 4-element vector
    # A set found_inf shrinks every tensor to 0 elements: the step stores nothing.
    limit = tl.where(tl.load(found_inf_ptr) == 0, numel, 0)
    return t, offs, offs < limit


@triton.jit
def _tensor(table_ptr, t, ALIGNED: tl.constexpr):
    """Tensor t's fp32 storage, from a table of int64 addresses."""
    pointer = tl.load(table_ptr + t).to(tl.pointer_type(tl.float32))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _tensor_lr(lr, lr_scale_ptr, step_size_ptrs, t):
    """The tensor's learning rate: lr * its group's lr_scale, times its own step size (a device scalar that
    LW-AS, lwas.py, sets) where the optimizer passes a step-size table."""
    lr_t = lr * tl.load(lr_scale_ptr + t)
    if step_size_ptrs is not None:
        lr_t *= tl.load(tl.load(step_size_ptrs + t).to(tl.pointer_type(tl.float32)))
    return lr_t


@triton.jit
def _param_and_grad(param_ptrs, grad_ptrs, weight_decay_ptr, t, offs, mask, lr_t, ALIGNED: tl.constexpr):
    """Tensor t's storage, its elements after decoupled weight decay (p * (1 - lr * wd), every optimizer's
    first step), and its gradient."""
    param = _tensor(param_ptrs, t, ALIGNED)
    p = tl.load(param + offs, mask=mask) * (1.0 - lr_t * tl.load(weight_decay_ptr + t))
    g = tl.load(_tensor(grad_ptrs, t, ALIGNED) + offs, mask=mask)
    return param, p, g


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def adamw_kernel(
    numel_ptr,
    chunk_tensor_ptr,
    chunk_start_ptr,
    found_inf_ptr,
    lr_scale_ptr,
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
    t, offs, mask = _chunk(numel_ptr, chunk_tensor_ptr, chunk_start_ptr, found_inf_ptr, BLOCK, ALIGNED)
    lr_t = _tensor_lr(lr, lr_scale_ptr, step_size_ptrs, t)
    param, p, g = _param_and_grad(param_ptrs, grad_ptrs, weight_decay_ptr, t, offs, mask, lr_t, ALIGNED)
    exp_avg, exp_avg_sq = _tensor(exp_avg_ptrs, t, ALIGNED), _tensor(exp_avg_sq_ptrs, t, ALIGNED)
    m = tl.load(exp_avg + offs, mask=mask)
    v = tl.load(exp_avg_sq + offs, mask=mask)
    m = m + (1.0 - beta1) * (g - m)  # torch's lerp_(g, 1 - beta1)
    v = v * beta2 + (1.0 - beta2) * (g * g)
    denom = tl.sqrt(v) / bias_correction2_sqrt + eps
    p = p - (lr_t / bias_correction1) * (m / denom)
    tl.store(param + offs, p, mask=mask)
    tl.store(exp_avg + offs, m, mask=mask)
    tl.store(exp_avg_sq + offs, v, mask=mask)


@triton.jit
def sgd_momentum_kernel(
    numel_ptr,
    chunk_tensor_ptr,
    chunk_start_ptr,
    found_inf_ptr,
    lr_scale_ptr,
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
    t, offs, mask = _chunk(numel_ptr, chunk_tensor_ptr, chunk_start_ptr, found_inf_ptr, BLOCK, ALIGNED)
    lr_t = _tensor_lr(lr, lr_scale_ptr, step_size_ptrs, t)
    param, p, g = _param_and_grad(param_ptrs, grad_ptrs, weight_decay_ptr, t, offs, mask, lr_t, ALIGNED)
    buffer = _tensor(momentum_buffer_ptrs, t, ALIGNED)
    m = tl.load(buffer + offs, mask=mask) * momentum + g
    p = p - lr_t * m
    tl.store(param + offs, p, mask=mask)
    tl.store(buffer + offs, m, mask=mask)


@triton.jit
def lion_kernel(
    numel_ptr,
    chunk_tensor_ptr,
    chunk_start_ptr,
    found_inf_ptr,
    lr_scale_ptr,
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
    t, offs, mask = _chunk(numel_ptr, chunk_tensor_ptr, chunk_start_ptr, found_inf_ptr, BLOCK, ALIGNED)
    lr_t = _tensor_lr(lr, lr_scale_ptr, None, t)
    param, p, g = _param_and_grad(param_ptrs, grad_ptrs, weight_decay_ptr, t, offs, mask, lr_t, ALIGNED)
    exp_avg = _tensor(exp_avg_ptrs, t, ALIGNED)
    m = tl.load(exp_avg + offs, mask=mask)
    p = p - lr_t * _sign(m * beta1 + (1.0 - beta1) * g)
    m = m * beta2 + (1.0 - beta2) * g
    tl.store(param + offs, p, mask=mask)
    tl.store(exp_avg + offs, m, mask=mask)


@triton.jit
def sophiag_kernel(
    numel_ptr,
    chunk_tensor_ptr,
    chunk_start_ptr,
    found_inf_ptr,
    lr_scale_ptr,
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
    t, offs, mask = _chunk(numel_ptr, chunk_tensor_ptr, chunk_start_ptr, found_inf_ptr, BLOCK, ALIGNED)
    lr_t = _tensor_lr(lr, lr_scale_ptr, None, t)
    param, p, g = _param_and_grad(param_ptrs, grad_ptrs, weight_decay_ptr, t, offs, mask, lr_t, ALIGNED)
    exp_avg = _tensor(exp_avg_ptrs, t, ALIGNED)
    m = tl.load(exp_avg + offs, mask=mask)
    h = tl.load(_tensor(hessian_ptrs, t, ALIGNED) + offs, mask=mask)
    m = m * beta1 + (1.0 - beta1) * g
    ratio = tl.minimum(tl.abs(m) / (rho_bs * h + 1e-15), 1.0)
    p = p - lr_t * (_sign(m) * ratio)
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
    t, offs, mask = _chunk(numel_ptr, chunk_tensor_ptr, chunk_start_ptr, found_inf_ptr, BLOCK, ALIGNED)
    target = _tensor(target_ptrs, t, ALIGNED)
    g = tl.load(_tensor(grad_ptrs, t, ALIGNED) + offs, mask=mask)
    h = tl.load(target + offs, mask=mask)
    tl.store(target + offs, h * beta + (1.0 - beta) * (g * g), mask=mask)


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
    grad = _tensor(grad_ptrs, t, ALIGNED) + start
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    i = 0
    while i * BLOCK < size:  # a while loop: its bound is data (Triton's interpreter needs a static range bound)
        offs = i * BLOCK + tl.arange(
            0, BLOCK
        )  # i * BLOCK, not a running offset: a multiple of BLOCK the compiler can see
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
    lr_scale_ptr,
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
    t, offs, mask = _chunk(numel_ptr, chunk_tensor_ptr, chunk_start_ptr, found_inf_ptr, BLOCK, ALIGNED)
    lr_t = _tensor_lr(lr, lr_scale_ptr, None, t)
    size = tl.load(block_size_ptr + t)
    param, p, g = _param_and_grad(param_ptrs, grad_ptrs, weight_decay_ptr, t, offs, mask, lr_t, ALIGNED)
    exp_avg, exp_avg_sq = _tensor(exp_avg_ptrs, t, ALIGNED), _tensor(exp_avg_sq_ptrs, t, ALIGNED)
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
