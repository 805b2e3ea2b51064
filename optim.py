"""Fused AdamW, Lion, SophiaG and Adam-mini that apply each param group's `lr_scale` inside one kernel
launch; the kernels of LW-AS's SGD-momentum and AdamW (lwas.py) also read a step size per tensor.

One rule for every optimizer here, TorchAdamW included: param groups carry `lr_scale` (param_groups
builds them from a model and its multipliers), the schedule sets each group's `lr` to the global rate
(set_lr), and a group's step is exactly its reference's step at layer_lr(group) = lr * lr_scale, weight
decay included (the Triton kernels multiply the two themselves, per tensor, from a table):
    AdamW   torch.optim.AdamW (bias correction; decoupled decay p *= 1 - lr * wd)
    Lion    Chen et al. 2023, as lion-pytorch: p *= 1 - lr*wd; p -= lr * sign(b1*m + (1-b1)*g); m = b2*m + (1-b2)*g
    SophiaG Liu et al. 2023, as the official code (sophia-opt): p *= 1 - lr*wd; m = b1*m + (1-b1)*g;
            p -= lr * sign(m) * min(|m| / (rho*bs*h + 1e-15), 1); update_hessian(): h = b2*h + (1-b2)*g*g

Backends:
    "triton"  every parameter of every group in one launch: device tables hold each tensor's pointers,
              size, lr_scale and weight decay, and a chunk table maps each program to (tensor, offset).
              The scalars that change every step (lr, bias corrections) are kernel arguments, so a new lr
              each step neither recompiles nor allocates. Groups whose scalar hyperparameters differ
              (e.g. their own betas) get one launch each. fp32 parameters and states. The kernels are in
              kernels.py, with the reasons for their block size and 128-bit accesses.
    "torch"   the CPU path: per group, AdamW through torch's own fused kernel (bitwise torch.optim.AdamW(fused=True)),
              the others as foreach ops, the readable reference.
    "auto"    triton for CUDA parameters, torch otherwise.

The step count lives in each param group ("step"), not per parameter: every parameter of a group
with a gradient is updated together. A non-finite step is skipped when `optimizer.found_inf` (a
device tensor, the torch.optim convention) is nonzero: the triton kernels read it on the device (no
host sync) and the step count still advances, which moves the bias correction by one step (a relative
change below 1e-6 once AdamW's correction has converged); the torch path reads it on the host and
does not count the step. Both backends keep the same state layout, so state dicts are interchangeable.
"""

import contextlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
from torch.distributed.tensor import DTensor

from kernels import (
    BLOCK,
    NUM_WARPS,
    VECTOR_BYTES,
    VECTOR_ELEMENTS,
    adam_mini_kernel,
    adamw_kernel,
    block_mean_square_kernel,
    ema_of_square_kernel,
    lion_kernel,
    sophiag_kernel,
)
from loss import sampled_label_loss
from model import param_role
from parallel import local, shard_rows, sum_over_shards


@dataclass
class StepContext:
    """What an optimizer's hooks may use of the training step that calls them (train.Trainer.step): the
    model and this step's batches, and how the step runs them."""

    model: torch.nn.Module  # the training forward: compiled, DDP-wrapped where the run is
    raw_model: torch.nn.Module  # uncompiled and unwrapped: double backward and forward-mode AD (LW-AS)
    micro_batches: list  # this rank's (x, y) micro-batches of this step
    autocast: contextlib.AbstractContextManager  # the run's precision
    sync: Callable[
        [bool], contextlib.AbstractContextManager
    ]  # DDP's gradient all-reduce: sync(True) on the last micro-step
    reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None  # the mean over ranks, None in one process
    found_inf: torch.Tensor  # the step's non-finite flag, on the device
    sharded: bool = False  # parallel=fsdp: parameters and gradients are DTensors, each rank holds a shard


def sampled_label_gradients(context: StepContext) -> None:
    """Gradients of the loss against labels sampled from the model's own predictions over the step's
    micro-batches (SophiaG's Gauss-Newton-Bartlett estimator, Liu et al. 2023). A non-finite one counts the
    step as bad (found_inf): on the device, and the same on every rank (DDP averaged the gradients; under
    fsdp each rank sees its own shard, so the flag is reduced)."""
    batches = context.micro_batches
    for micro, (x, _) in enumerate(batches):
        with context.autocast, context.sync(micro == len(batches) - 1):
            logits, _ = context.model(x)
            (sampled_label_loss(logits) / len(batches)).backward()
    grads = [local(p.grad) for p in context.raw_model.parameters() if p.grad is not None]
    non_finite = torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()).logical_not().float()
    if context.sharded:
        non_finite = context.reduce_mean(non_finite)  # above 0 on every rank when any rank's shard is bad
    torch.logical_or(context.found_inf, non_finite > 0, out=context.found_inf)


class StepHooks:
    """What an optimizer needs around its update, from the training step (train.Trainer.step) that calls
    it with a StepContext: before_step runs after backward, before step(); after_step after step() and
    zero_grad(). Nothing, by default; SophiaG refreshes its Hessian estimate after every hess_interval-th
    step, LW-AS its step sizes before every interval-th (lwas.py)."""

    def before_step(self, step: int, context: StepContext) -> None:
        pass

    def after_step(self, step: int, context: StepContext) -> None:
        pass


def layer_lr(group: dict) -> float:
    """A param group's learning rate: the schedule's lr times the group's lr_scale (its layer-wise
    multiplier). The one place the two meet outside the Triton kernels, which take the schedule's lr and
    each tensor's lr_scale from a table and multiply them in their own arithmetic (kernels._tensor_lr)."""
    return group["lr"] * group.get("lr_scale", 1.0)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's rate for every param group (times its lr_ratio, where a part of the optimizer has a
    peak rate of its own); each optimizer's step applies the group's lr_scale
    (layer_lr). A plain torch.optim optimizer knows nothing of lr_scale: with_layer_lr wraps its class, and
    one given here unwrapped is refused, so a layer-wise rate is never silently dropped."""
    if not isinstance(optimizer, StepHooks) and any(
        group.get("lr_scale", 1.0) != 1.0 for group in optimizer.param_groups
    ):
        raise TypeError(
            f"{type(optimizer).__name__} ignores lr_scale: build it from "
            f"optim.with_layer_lr({type(optimizer).__name__})"
        )
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)  # a part with a rate of its own (muon.py's AdamW part)


def launch_kernel(kernel, grid, *args, **meta):
    """Every kernel launch goes through here (tests and bench/kernel_report.py record launches by patching it)."""
    kernel[grid](*args, **meta)


def _aligned_storage(tensors) -> bool:
    return all(t.data_ptr() % VECTOR_BYTES == 0 for t in tensors)


def _aligned(tensors) -> bool:
    """Whether the kernels' ALIGNED hints hold for tensors read element by element: storage 16-byte
    aligned, size a multiple of 4."""
    return _aligned_storage(tensors) and all(t.numel() % VECTOR_ELEMENTS == 0 for t in tensors)


def param_groups(
    model: torch.nn.Module, multipliers: dict[str, float] | None, weight_decay: float, scale_decay: bool = True
) -> list[dict]:
    """torch-style param groups, each carrying `lr_scale` (the timm convention) and its parameters' names.

    Parameters with the same (lr_scale, weight_decay) share a group: one global rate gives 2 groups,
    layer-wise rates about one per layer. Matrices and embeddings are decayed; biases and LayerNorm
    scales are not (nanoGPT, GPT-3). With scale_decay=False the decay is divided by lr_scale so the
    per-step decay lr * weight_decay stays the global one while the gradient step is scaled.
    """
    multipliers = multipliers or {}
    groups: dict[tuple[float, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr_scale = float(multipliers.get(name, 1.0))
        decay = weight_decay if p.dim() >= 2 else 0.0
        if not scale_decay:
            decay /= lr_scale
        group = groups.setdefault(
            (lr_scale, decay), {"params": [], "names": [], "lr_scale": lr_scale, "weight_decay": decay}
        )
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def _owner_and_index(counts: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """For items counted per tensor (kernel chunks, Adam-mini blocks): each item's tensor and its index
    within that tensor, as int32 device tables a kernel's program looks itself up in."""
    owner = torch.repeat_interleave(
        torch.arange(len(counts), dtype=torch.int32), torch.tensor(counts, dtype=torch.int64)
    )
    index = torch.cat([torch.arange(n, dtype=torch.int32) for n in counts])
    return owner.to(device), index.to(device)


class _LaunchPlan:
    """Device tables for one launch over a fixed list of tensors. Pointers of parameters and states
    are fixed for the plan's life; gradient pointers are re-read each step and the table is rebuilt
    only when the caching allocator handed out different addresses."""

    def __init__(self, params, states: dict[str, list[torch.Tensor]], lr_scales, weight_decays):
        self.params = params  # as the optimizer holds them (a subclass's tables key on them)
        params = [local(p) for p in params]
        states = {name: [local(t) for t in tensors] for name, tensors in states.items()}
        device = params[0].device
        numels = [p.numel() for p in params]
        chunks = [triton.cdiv(n, BLOCK) for n in numels]
        self.grid = (sum(chunks),)
        self.chunk_tensor, chunk_index = _owner_and_index(chunks, device)
        self.chunk_start = chunk_index * BLOCK
        self.numel = torch.tensor(numels, dtype=torch.int32, device=device)
        self.pointers = {
            name: self._pointer_table(tensors, device) for name, tensors in {"param": params, **states}.items()
        }
        self.lr_scale = torch.tensor(lr_scales, dtype=torch.float32, device=device)
        self.weight_decay = torch.tensor(weight_decays, dtype=torch.float32, device=device)
        # Parameters and states keep their storage for the plan's life; gradients are checked as they come.
        # The size hint concerns what the kernels read element by element: the parameters and the states
        # shaped like them (same sizes). A state read per tensor or per block (LW-AS's 0-dim step size,
        # Adam-mini's one value per LayerNorm) needs only its aligned pointer: checking its size too
        # sent every gpt2 launch of those optimizers to the scalar fallback.
        self.storage_aligned = _aligned(params) and all(_aligned_storage(tensors) for tensors in states.values())
        self.aligned = False
        self._grad_key = None

    @staticmethod
    def _pointer_table(tensors, device):
        return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)

    def grad_pointers(self, grads):
        grads = [local(g) for g in grads]
        key = tuple(g.data_ptr() for g in grads)
        if key != self._grad_key:
            for g in grads:
                if not g.is_contiguous() or g.dtype != torch.float32:
                    raise ValueError("backend='triton' needs contiguous fp32 gradients")
            self.pointers["grad"], self._grad_key = self._pointer_table(grads, self.numel.device), key
            self.aligned = self.storage_aligned and _aligned(grads)
        return self.pointers["grad"]

    def tables(self, *names):
        return [self.pointers[name] for name in names]

    def launch(self, kernel, found_inf, *args):
        """One launch over every tensor of the plan: the chunk tables and found_inf lead every elementwise
        kernel's arguments (kernels.py); the ALIGNED build is taken where the plan's tensors allow it."""
        launch_kernel(
            kernel,
            self.grid,
            self.numel,
            self.chunk_tensor,
            self.chunk_start,
            found_inf,
            *args,
            BLOCK=BLOCK,
            ALIGNED=self.aligned,
            num_warps=NUM_WARPS,
        )


def check_nonnegative_finite(name, value):
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value}")


class FusedOptimizer(StepHooks, torch.optim.Optimizer):
    """Shared machinery: validation, state, backends, launch plans. Subclasses name their state
    buffers, their scalar hyperparameters, and give a torch update and a kernel launch."""

    state_names: tuple[str, ...] = ()
    scalar_keys: tuple[str, ...] = ()  # group entries passed to the kernel as scalars

    def __init__(self, params, defaults: dict, backend: str):
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend={backend!r}: choose auto, triton or torch")
        super().__init__(params, {**defaults, "lr_scale": 1.0})
        self.backend = backend
        self.found_inf = None  # set by the training loop to skip a non-finite step
        self._plans: dict = {}
        for group in self.param_groups:
            self._validate_group(group)
            group.setdefault("step", 0)
            for p in group["params"]:
                if p.is_sparse:
                    raise ValueError(f"{type(self).__name__} does not support sparse parameters")
                if not p.is_floating_point():
                    raise ValueError(f"{type(self).__name__} needs floating-point parameters, got {p.dtype}")

    def _validate_group(self, group):
        check_nonnegative_finite("lr", group["lr"])
        check_nonnegative_finite("weight_decay", group["weight_decay"])
        check_nonnegative_finite("lr_scale", group["lr_scale"])
        for beta in group.get("betas", ()):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"betas must lie in [0, 1), got {group['betas']}")

    def use_triton(self, device: torch.device) -> bool:
        if self.backend == "torch" or (self.backend == "auto" and device.type != "cuda"):
            return False
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' needs CUDA parameters, or TRITON_INTERPRET=1 for CPU ones")
        return True

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._plans.clear()  # state tensors were replaced: their pointers changed

    def _state(self, p):
        state = self.state[p]
        if not state:
            state.update(self._new_state(p))
            self._plans.clear()  # new state tensors: plans hold pointers to the old set
        return state

    def _new_state(self, p) -> dict:
        return {name: torch.zeros_like(p, memory_format=torch.preserve_format) for name in self.state_names}

    def _with_grads(self, group):
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if p.grad.is_sparse:
                raise ValueError(f"{type(self).__name__} does not support sparse gradients")
        return params

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        active = self._active()
        if not active:
            return loss
        for _, group, _ in active:
            group["step"] += 1
        if self.use_triton(active[0][2][0].device):
            for bucket in self._buckets(active, self.scalar_keys + ("step",)):
                plan, grads, found_inf = self._bucket_plan("step", bucket, self.state_names)
                self._launch_step(plan, grads, found_inf, bucket[0][1])
        elif self.found_inf is None or not self.found_inf.item():
            for _, group, params in active:
                self._update_torch(
                    group,
                    [local(p) for p in params],
                    [local(p.grad) for p in params],
                    [[local(self.state[p][n]) for p in params] for n in self.state_names],
                )
        else:
            for _, group, _ in active:
                group["step"] -= 1
        return loss

    def _plan(self, key, groups_params, state_names):
        plan = self._plans.get(key)
        if plan is None:
            params = [p for _, ps in groups_params for p in ps]
            for p in params:
                if p.dtype != torch.float32 or not p.is_contiguous():
                    raise ValueError(
                        "backend='triton' needs contiguous fp32 parameters; use backend='torch' for others"
                    )
            plan = _LaunchPlan(
                params,
                {n: [self.state[p][n] for p in params] for n in state_names},
                [g["lr_scale"] for g, ps in groups_params for _ in ps],
                [g["weight_decay"] for g, ps in groups_params for _ in ps],
            )
            self._extend_plan(plan)
            self._plans[key] = plan
        return plan

    def _active(self) -> list[tuple[int, dict, list]]:
        """(index, group, parameters with a gradient) of every group that has any, their state created."""
        active = []
        for index, group in enumerate(self.param_groups):
            params = self._with_grads(group)
            if params:
                self._validate_group(group)
                for p in params:
                    self._state(p)
                active.append((index, group, params))
        return active

    @staticmethod
    def _buckets(active, keys: tuple[str, ...]):
        """Groups that agree on every kernel scalar in `keys` (their per-tensor lr_scale and decay are
        tables) run in one launch."""
        buckets: dict[tuple, list] = {}
        for index, group, params in active:
            buckets.setdefault(tuple(group[k] for k in keys), []).append((index, group, params))
        return buckets.values()

    def _bucket_plan(self, kind: str, bucket, state_names):
        """The launch plan of a bucket (built once, then cached), this step's gradient table and found_inf."""
        groups_params = [(group, params) for _, group, params in bucket]
        key = (
            kind,
            tuple(
                (index, tuple(map(id, params)), group["lr_scale"], group["weight_decay"])
                for index, group, params in bucket
            ),
        )
        plan = self._plan(key, groups_params, state_names)
        grads = plan.grad_pointers([p.grad for _, ps in groups_params for p in ps])
        return plan, grads, self._found_inf_flag(plan.numel.device)

    def _found_inf_flag(self, device):
        """The device flag a kernel masks its stores with: found_inf, or a cached zero."""
        if self.found_inf is not None:
            return self.found_inf
        if getattr(self, "_zero_flag", None) is None or self._zero_flag.device != device:
            self._zero_flag = torch.zeros((), dtype=torch.float32, device=device)
        return self._zero_flag

    def _extend_plan(self, plan) -> None:
        """Extra device tables a subclass's kernels need, built once with the plan."""

    def _update_torch(self, group, params, grads, states):
        raise NotImplementedError

    def _launch_step(self, plan, grads, found_inf, group):
        raise NotImplementedError


def with_layer_lr(optimizer_class: type) -> type:
    """A torch.optim optimizer class whose step runs each group at its layer_lr: torch's kernels take one
    rate per group, so step() hands them that product and then puts the schedule's lr back (the state
    dict keeps the schedule's lr, as ours do)."""

    class LayerLR(StepHooks, optimizer_class):
        @torch.no_grad()
        def step(self, closure=None):
            scheduled = [group["lr"] for group in self.param_groups]
            for group in self.param_groups:
                group["lr"] = layer_lr(group)
            try:
                return super().step(closure)
            finally:
                for group, lr in zip(self.param_groups, scheduled):
                    group["lr"] = lr

    LayerLR.__name__ = LayerLR.__qualname__ = f"{optimizer_class.__name__}WithLayerLR"
    return LayerLR


class TorchAdamW(with_layer_lr(torch.optim.AdamW)):
    """torch.optim.AdamW(fused=True), the plain-PyTorch baseline, at each group's layer_lr."""

    def __init__(self, params, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)


def update_adamw(group, params, grads, exp_avgs, exp_avg_sqs, step_sizes=None) -> None:
    """AdamW's torch step for one group: torch's own fused AdamW kernel (one pass over memory; the
    foreach ops it replaced made about eight, 4.5x slower on a CPU) at lr * lr_scale, so the result is
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
        plan.lr_scale,
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
            lion_kernel, found_inf, plan.lr_scale, plan.weight_decay, params, grads, exp_avgs, group["lr"], beta1, beta2
        )


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
            plan.lr_scale,
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
                    "AdamMini needs each param group's parameter names: use optim.param_groups(model, ...)"
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
        plan.pointers["exp_avg_sq"] = plan._pointer_table(row_values, plan.numel.device)
        plan.block_size = torch.tensor(sizes, dtype=torch.int32, device=plan.numel.device)
        plan.block_tensor, plan.block_index = _owner_and_index(counts, plan.numel.device)
        plan.blocks_aligned = all(
            size % VECTOR_ELEMENTS == 0 for size, count in zip(sizes, counts) if count
        )  # each block starts 16-byte aligned

    def _launch_step(self, plan, grads, found_inf, group):
        beta1, beta2 = group["betas"]
        step = group["step"]
        for p, values in plan.row_values:  # each held row's block value, for the kernel to read
            torch.index_select(self.state[p]["exp_avg_sq"], 0, self._sharded_blocks[p], out=values)
        params, exp_avgs, exp_avg_sqs = plan.tables("param", "exp_avg", "exp_avg_sq")
        if plan.block_tensor.numel():  # 1024 elements per loop trip at 4 warps: 8 per thread, two 128-bit loads
            launch_kernel(
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
            plan.lr_scale,
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
