"""What every Triton kernel of the fused optimizers shares; each optimizer's own kernel is in its file
(adamw.py, lion.py, sophiag.py, adam_mini.py, lwas.py), beside the launch and the torch path it is
checked against.

Every elementwise kernel runs on a grid of chunks: program i updates BLOCK elements of one tensor,
found through device tables (base.LaunchPlan) that hold each tensor's pointers, size, multiplier and
weight decay. All kernels open with `chunk`, read tensors through `storage`, and the optimizer steps
take their parameter (decayed) and gradient from `param_and_grad`.

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
def chunk(numel_ptr, chunk_tensor_ptr, chunk_start_ptr, found_inf_ptr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """This program's tensor index, element offsets within it, and the mask (bounds and found_inf)."""
    program = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + program)
    # chunks start at k * BLOCK
    offs = tl.multiple_of(tl.load(chunk_start_ptr + program), BLOCK) + tl.arange(0, BLOCK)
    numel = tl.load(numel_ptr + t)
    if ALIGNED:
        numel = tl.multiple_of(numel, 4)  # the mask is constant over each 4-element vector
    # A set found_inf shrinks every tensor to 0 elements: the step stores nothing.
    limit = tl.where(tl.load(found_inf_ptr) == 0, numel, 0)
    return t, offs, offs < limit


@triton.jit
def storage(table_ptr, t, ALIGNED: tl.constexpr):
    """Tensor t's fp32 storage, from a table of int64 addresses."""
    pointer = tl.load(table_ptr + t).to(tl.pointer_type(tl.float32))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def tensor_lr(lr, multiplier_ptr, step_size_ptrs, t):
    """The tensor's learning rate: lr * its group's multiplier, times its own step size (a device scalar that
    LW-AS, lwas.py, sets) where the optimizer passes a step-size table."""
    lr_t = lr * tl.load(multiplier_ptr + t)
    if step_size_ptrs is not None:
        lr_t *= tl.load(tl.load(step_size_ptrs + t).to(tl.pointer_type(tl.float32)))
    return lr_t


@triton.jit
def param_and_grad(param_ptrs, grad_ptrs, weight_decay_ptr, t, offs, mask, lr_t, ALIGNED: tl.constexpr):
    """Tensor t's storage, its elements after decoupled weight decay (p * (1 - lr * wd), every optimizer's
    first step), and its gradient."""
    param = storage(param_ptrs, t, ALIGNED)
    p = tl.load(param + offs, mask=mask) * (1.0 - lr_t * tl.load(weight_decay_ptr + t))
    g = tl.load(storage(grad_ptrs, t, ALIGNED) + offs, mask=mask)
    return param, p, g


@triton.jit
def sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
