"""What every optimizer here shares: the param groups that carry each layer's multiplier, the one place
the schedule's rate and a multiplier meet (layer_lr), the hooks a training step calls around an update,
and FusedOptimizer, the machinery of the fused optimizers (validation, state, both backends, the launch
plans whose device tables let one Triton launch update every tensor of every group).

One rule for every optimizer, TorchAdamW and Muon included: param groups carry `multiplier`
(param_groups builds them from a model and its multipliers), the schedule sets each group's `lr` to the
global rate (set_lr), and a group's step is exactly its reference's step at layer_lr(group) = lr *
multiplier, weight decay included (the Triton kernels multiply the two themselves, per tensor, from a
table). Each optimizer's file (adamw.py, lion.py, sophiag.py, adam_mini.py, lwas.py, muon.py) holds its
Triton kernel, its launch, its torch path and its registry entry.

Backends:
    "triton"  every parameter of every group in one launch: device tables hold each tensor's pointers,
              size, multiplier and weight decay, and a chunk table maps each program to (tensor, offset).
              The scalars that change every step (lr, bias corrections) are kernel arguments, so a new lr
              each step neither recompiles nor allocates. Groups whose scalar hyperparameters differ
              (e.g. their own betas) get one launch each. fp32 parameters and states. kernels.py has the
              kernels' shared parts, with the reasons for their block size and 128-bit accesses.
    "torch"   the CPU path: per group, AdamW through torch's own fused kernel (bitwise
              torch.optim.AdamW(fused=True)), the others as foreach ops, the readable reference.
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

from optimizers.kernels import BLOCK, NUM_WARPS, VECTOR_BYTES, VECTOR_ELEMENTS
from runtime.fsdp import local


@dataclass
class StepContext:
    """What an optimizer's hooks may use of the training step that calls them (training.trainer.Trainer.step):
    the model and this step's batches, and how the step runs them."""

    model: torch.nn.Module  # the training forward: compiled, DDP-wrapped where the run is
    raw_model: torch.nn.Module  # uncompiled and unwrapped: double backward and forward-mode AD (LW-AS)
    micro_batches: list  # this rank's (x, y) micro-batches of this step
    autocast: contextlib.AbstractContextManager  # the run's precision
    # DDP's gradient all-reduce (fsdp's reduce-scatter): sync(True) on the last micro-step
    sync: Callable[[bool], contextlib.AbstractContextManager]
    reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None  # the mean over ranks, None in one process
    found_inf: torch.Tensor  # the step's non-finite flag, on the device
    sharded: bool = False  # parallel=fsdp: parameters and gradients are DTensors, each rank holds a shard


class StepHooks:
    """What an optimizer needs around its update, from the training step (training.trainer.Trainer.step)
    that calls it with a StepContext: before_step runs after backward, before step(); after_step after
    step() and zero_grad(). Nothing, by default; SophiaG refreshes its Hessian estimate after every
    hess_interval-th step, LW-AS its step sizes before every interval-th (lwas.py). log_values is what the
    optimizer adds to a log line (LW-AS: its step sizes)."""

    def before_step(self, step: int, context: StepContext) -> None:
        pass

    def after_step(self, step: int, context: StepContext) -> None:
        pass

    def log_values(self) -> dict:
        return {}


def layer_lr(group: dict) -> float:
    """A param group's learning rate: the schedule's lr times the group's multiplier (its layer-wise
    learning-rate multiplier). The one place the two meet outside the Triton kernels, which take the
    schedule's lr and each tensor's multiplier from a table and multiply them in their own arithmetic
    (kernels.tensor_lr)."""
    return group["lr"] * group.get("multiplier", 1.0)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's rate for every param group (times its lr_ratio, where a part of the optimizer has a
    peak rate of its own: Muon's AdamW part); each optimizer's step applies the group's multiplier
    (layer_lr). A plain torch.optim optimizer knows nothing of multipliers: with_layer_lr wraps its class,
    and one given here unwrapped is refused, so a layer-wise rate is never silently dropped."""
    if not isinstance(optimizer, StepHooks) and any(
        group.get("multiplier", 1.0) != 1.0 for group in optimizer.param_groups
    ):
        raise TypeError(
            f"{type(optimizer).__name__} ignores multipliers: build it from "
            f"optimizers.base.with_layer_lr({type(optimizer).__name__})"
        )
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)


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
    """torch-style param groups, each carrying its layers' `multiplier` and its parameters' names.

    Parameters with the same (multiplier, weight_decay) share a group: one global rate gives 2 groups,
    layer-wise rates about one per layer. Matrices and embeddings are decayed; biases and LayerNorm
    scales are not (nanoGPT, GPT-3). With scale_decay=False the decay is divided by the multiplier so the
    per-step decay lr * weight_decay stays the global one while the gradient step is scaled.
    """
    multipliers = multipliers or {}
    groups: dict[tuple[float, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        multiplier = float(multipliers.get(name, 1.0))
        decay = weight_decay if p.dim() >= 2 else 0.0
        if not scale_decay:
            decay /= multiplier
        group = groups.setdefault(
            (multiplier, decay), {"params": [], "names": [], "multiplier": multiplier, "weight_decay": decay}
        )
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def owner_and_index(counts: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """For items counted per tensor (kernel chunks, Adam-mini blocks): each item's tensor and its index
    within that tensor, as int32 device tables a kernel's program looks itself up in."""
    owner = torch.repeat_interleave(
        torch.arange(len(counts), dtype=torch.int32), torch.tensor(counts, dtype=torch.int64)
    )
    index = torch.cat([torch.arange(n, dtype=torch.int32) for n in counts])
    return owner.to(device), index.to(device)


class LaunchPlan:
    """Device tables for one launch over a fixed list of tensors. Pointers of parameters and states
    are fixed for the plan's life; gradient pointers are re-read each step and the table is rebuilt
    only when the caching allocator handed out different addresses."""

    def __init__(self, params, states: dict[str, list[torch.Tensor]], multipliers, weight_decays):
        self.params = params  # as the optimizer holds them (a subclass's tables key on them)
        params = [local(p) for p in params]
        states = {name: [local(t) for t in tensors] for name, tensors in states.items()}
        device = params[0].device
        numels = [p.numel() for p in params]
        chunks = [triton.cdiv(n, BLOCK) for n in numels]
        self.grid = (sum(chunks),)
        self.chunk_tensor, chunk_index = owner_and_index(chunks, device)
        self.chunk_start = chunk_index * BLOCK
        self.numel = torch.tensor(numels, dtype=torch.int32, device=device)
        self.pointers = {
            name: self.pointer_table(tensors, device) for name, tensors in {"param": params, **states}.items()
        }
        self.multiplier = torch.tensor(multipliers, dtype=torch.float32, device=device)
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
    def pointer_table(tensors, device):
        return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)

    def grad_pointers(self, grads):
        grads = [local(g) for g in grads]
        key = tuple(g.data_ptr() for g in grads)
        if key != self._grad_key:
            for g in grads:
                if not g.is_contiguous() or g.dtype != torch.float32:
                    raise ValueError("backend='triton' needs contiguous fp32 gradients")
            self.pointers["grad"], self._grad_key = self.pointer_table(grads, self.numel.device), key
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
        super().__init__(params, {**defaults, "multiplier": 1.0})
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
        check_nonnegative_finite("multiplier", group["multiplier"])
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
        new = self._new_state(p) if not state else None
        if new:  # new state tensors: plans hold pointers to the old set (an optimizer without state keeps them)
            state.update(new)
            self._plans.clear()
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
            plan = LaunchPlan(
                params,
                {n: [self.state[p][n] for p in params] for n in state_names},
                [g["multiplier"] for g, ps in groups_params for _ in ps],
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
        """Groups that agree on every kernel scalar in `keys` (their per-tensor multiplier and decay are
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
                (index, tuple(map(id, params)), group["multiplier"], group["weight_decay"])
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
