"""What the project knows of one optimizer, declared once, in the optimizer's own file, and listed by
name in registry.py: how a config builds it, the state it keeps, the Triton kernels its steps launch
and how closely they must match its torch path, the independent implementation its tests hold it to,
and its settings in the GPU check. Everything that treats optimizers alike (the config's choices and
--help, the memory line, the kernels' self-check and its cache, the benchmarks, the GPU check, the
tests) reads it from here; docs/architecture.md shows how an optimizer is added.
"""

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Reference:
    """The independent implementation an optimizer's tests compare it with, step for step."""

    name: str  # what it is and whose it is: named by --help and by a failing test
    # (config, param groups) -> the reference optimizer. The groups are torch's: each has its parameters,
    # "names" and "weight_decay", and its own "lr", the config's lr times the group's multiplier.
    build: Callable
    # Config keys under which it is the reference: LW-AS is its base optimizer only inside its warmup.
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class OptimizerSpec:
    name: str  # the config's `optimizer`
    summary: str  # one line for --help: what it is, and whose
    # (config, param groups from base.param_groups, the model's head count, backend) -> the optimizer, a
    # base.StepHooks whose step applies each group's multiplier.
    build: Callable
    state_per_parameter: float  # fp32 state in parameters' worth, at most: the memory line (training.memory)
    reference: Reference
    # train.py settings of its run in the GPU check (bench/gpu_train_check.py): a rate of its scale, and its
    # refresh due within the check's few steps.
    gpu_check: dict
    # Triton kernel -> the fp32 bytes it must move per parameter element, for every kernel a step launches.
    # Empty: no Triton path (the self-check passes it by, the backend is torch).
    kernels: dict = field(default_factory=dict)
    refresh_kernels: dict = field(default_factory=dict)  # the same for the kernels its refresh launches
    refresh_interval: Callable = lambda c: 1  # steps between refreshes under a config (SophiaG, LW-AS)
    # A refresh on the gradients as they are, without a model (SophiaG's update_hessian): what the self-check
    # and the kernel report run to launch refresh_kernels. None: its refresh needs a model, or it has none.
    refresh: Callable | None = None
    # The self-check's (rtol, atol) between the Triton and the torch path after two steps (self_check.py).
    tolerance: tuple[float, float] | None = None
    # (config, sharded) -> why the optimizer cannot run this config (sharded: under parallel=fsdp), said as
    # one error line, or None. Muon: a rate of 0; LW-AS under fsdp: a curvature that needs a double backward.
    refuses: Callable = lambda c, sharded: None

    @property
    def all_kernels(self) -> list:
        return [*self.kernels, *self.refresh_kernels]
