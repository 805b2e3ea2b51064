"""optimizer=muon: Muon (Jordan et al. 2024), the GPT-2 speedruns' optimizer, as a peer of the others.

Muon orthogonalizes each hidden matrix's momentum (five Newton-Schulz iterations in bf16) and so already
rescales its update per layer; the question it answers here is whether a layer-wise learning rate still
matters under it. The split is the speedrun's (modded-nanogpt): torch.optim.Muon for the transformer
blocks' weight matrices (q, k, v, the attention output, both MLP matrices: model.ParamRole.is_block_matrix),
this project's fused AdamW (adamw.py) for everything else: the embeddings, the tied output layer,
LayerNorms and biases. Every group steps at its layer_lr (lr * multiplier, base.py's one rule); the AdamW
part's groups run at adamw_lr_ratio times the Muon part's rate, both on the one schedule (their
lr_ratio, applied by set_lr; the config's adamw_lr over its lr).

torch.optim.Muon has no device-side skip of a non-finite step, so its part reads the guard on the host
(one sync per step, as the fused optimizers' torch path does); the AdamW part reads it on the device.
"""

import math

import torch
from torch.distributed.tensor import DTensor

from model import param_role
from optimizers.adamw import AdamW, adamw_kernel
from optimizers.base import StepContext, StepHooks, with_layer_lr
from optimizers.spec import OptimizerSpec, Reference
from runtime.fsdp import local, shard_rows, whole


def is_muon_param(name: str, p: torch.Tensor) -> bool:
    """The blocks' weight matrices are Muon's part; everything else is AdamW's."""
    return param_role(name).is_block_matrix and p.dim() == 2


def newton_schulz(update: torch.Tensor, coefficients: tuple, steps: int, eps: float, dtype) -> torch.Tensor:
    """torch.optim.Muon's orthogonalization (its quintic Newton-Schulz iteration) at a chosen precision:
    bf16 as torch (and the speedrun) run it, or fp32."""
    a, b, c = coefficients
    wide = update.size(0) > update.size(1)
    x = update.to(dtype).T if wide else update.to(dtype)  # iterate on the short side: X @ X.T is the small Gram
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if wide else x


class MuonAtPrecision(torch.optim.Muon):
    """torch.optim.Muon; or the same step with its Newton-Schulz in fp32 (ns_dtype=torch.float32): on a CPU
    without native bf16 torch emulates bf16 matmuls, 14x to 36x slower than fp32 at gpt2-mini's shapes
    (measured on 2 AVX2 cores: 1 s of a 1.1 s step), and fp32 is the same iteration, only more precise.
    Under fsdp (DTensor shards) each matrix's update is gathered whole, orthogonalized on every rank as one
    process would, and each rank keeps its rows: Newton-Schulz mixes every row with every other."""

    ns_dtype = torch.bfloat16

    @torch.no_grad()
    def step(self, closure=None):
        sharded = any(isinstance(p, DTensor) for group in self.param_groups for p in group["params"])
        if self.ns_dtype == torch.bfloat16 and not sharded:
            return super().step(closure)
        for group in self.param_groups:  # torch.optim.Muon's single-tensor step, line for line
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buffer = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                grad, held = local(p.grad), local(p)
                local(buffer).lerp_(grad, 1 - momentum)
                update = grad.lerp(local(buffer), momentum) if group["nesterov"] else local(buffer)
                update = whole(update, like=p)  # under fsdp: gathered from every rank's rows
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
                rows = shard_rows(p)
                held.mul_(1 - lr * group["weight_decay"])
                held.add_(update[rows.start : rows.stop], alpha=-lr * math.sqrt(max(1, p.size(0) / p.size(1))))
        return None


class TorchMuon(with_layer_lr(MuonAtPrecision)):
    """torch.optim.Muon (Nesterov momentum, its default lr adjustment sqrt(max(1, rows / cols))) at each
    group's layer_lr, skipping a step the training loop's guard marked non-finite."""

    found_inf = None

    @torch.no_grad()
    def step(self, closure=None):
        if self.found_inf is not None and self.found_inf.item():
            return None
        return super().step(closure)


class Muon(StepHooks):
    """Muon for the blocks' matrices and the fused AdamW for the rest, as one optimizer: its param_groups
    are both parts' (Muon's first), its state dict holds both, a step steps both."""

    def __init__(
        self,
        groups,
        lr,
        adamw_lr_ratio=1.0,
        momentum=0.95,
        betas=(0.9, 0.95),
        eps=1e-8,
        ns_dtype=torch.bfloat16,
        backend="auto",
    ):
        if lr <= 0:
            raise ValueError(f"lr={lr}: Muon's rate must be positive (the AdamW part's is lr * adamw_lr_ratio)")
        muon_groups, adamw_groups = [], []
        for group in groups:
            chosen = [is_muon_param(name, p) for name, p in zip(group["names"], group["params"])]
            for wanted, part in ((True, muon_groups), (False, adamw_groups)):
                names = [name for name, c in zip(group["names"], chosen) if c == wanted]
                params = [p for p, c in zip(group["params"], chosen) if c == wanted]
                if params:
                    part.append({**group, "names": names, "params": params})
        # The schedule's shape at the AdamW part's height (set_lr).
        for group in adamw_groups:
            group["lr_ratio"] = adamw_lr_ratio
        self.muon = TorchMuon(muon_groups, lr=lr, momentum=momentum, nesterov=True) if muon_groups else None
        if self.muon:
            self.muon.ns_dtype = ns_dtype
        self.adamw = (
            AdamW(adamw_groups, lr=lr * adamw_lr_ratio, betas=betas, eps=eps, backend=backend) if adamw_groups else None
        )
        self.parts = [part for part in (self.muon, self.adamw) if part is not None]

    # Read through each time: a part's load_state_dict replaces its param_groups and state objects.
    @property
    def param_groups(self) -> list[dict]:
        return [group for part in self.parts for group in part.param_groups]

    @property
    def state(self) -> dict:
        """Both parts' state by parameter, each from the part that holds it: a copy of the mapping (a
        ChainMap over torch's defaultdicts would answer a missing key from the first part with an empty
        state, and add it there)."""
        return {p: values for part in self.parts for p, values in part.state.items()}

    @property
    def found_inf(self):
        return self.parts[0].found_inf

    @found_inf.setter
    def found_inf(self, flag):
        for part in self.parts:
            part.found_inf = flag

    @torch.no_grad()
    def step(self) -> None:
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon and self.muon.state_dict(), "adamw": self.adamw and self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        for name in ("muon", "adamw"):
            part = getattr(self, name)
            if (part is None) != (state.get(name) is None):
                raise ValueError(f"the saved Muon optimizer {'has' if state.get(name) else 'lacks'} a {name} part")
            if part is not None:
                part.load_state_dict(state[name])

    def before_step(self, step: int, context: StepContext) -> None:
        for part in self.parts:
            part.before_step(step, context)

    def after_step(self, step: int, context: StepContext) -> None:
        for part in self.parts:
            part.after_step(step, context)


def adamw_lr_ratio(c) -> float:
    """The AdamW part's peak rate over the Muon part's, both on the config's one schedule."""
    return (c.adamw_lr or c.lr) / c.lr if c.lr > 0 else 1.0


class _MuonAndAdamW:
    """The references of both parts: torch.optim.Muon for the blocks' matrices, torch.optim.AdamW for the
    rest at the AdamW part's rate, each group at its own."""

    def __init__(self, c, groups):
        ratio = adamw_lr_ratio(c)
        muon_groups, adamw_groups = [], []
        for group in groups:
            for name, p in zip(group["names"], group["params"]):
                one = {**group, "names": [name], "params": [p]}
                if is_muon_param(name, p):
                    muon_groups.append(one)
                else:
                    adamw_groups.append({**one, "lr": group["lr"] * ratio})
        self.parts = [
            torch.optim.Muon(muon_groups, lr=c.lr, momentum=c.muon_momentum, nesterov=True),
            torch.optim.AdamW(adamw_groups, lr=c.lr, betas=(c.beta1, c.beta2), eps=c.eps),
        ]

    @property
    def state(self) -> dict:
        return {p: values for part in self.parts for p, values in part.state.items()}

    def step(self):
        for part in self.parts:
            part.step()


MUON = OptimizerSpec(
    name="muon",
    summary="Muon (Jordan et al. 2024, torch.optim.Muon) for the blocks' matrices, the fused AdamW for the "
    "rest at adamw_lr, the speedrun's split",
    build=lambda c, groups, n_head, backend: Muon(
        groups,
        lr=c.lr,
        adamw_lr_ratio=adamw_lr_ratio(c),
        momentum=c.muon_momentum,
        ns_dtype=getattr(torch, c.muon_ns_dtype),
        betas=(c.beta1, c.beta2),
        eps=c.eps,
        backend=backend,
    ),
    state_per_parameter=2,  # at most: one momentum for the blocks' matrices, AdamW's two moments for the rest
    reference=Reference("torch.optim.Muon for the blocks' matrices, torch.optim.AdamW for the rest", _MuonAndAdamW),
    gpu_check=dict(lr=0.02, adamw_lr=3e-3),
    kernels={adamw_kernel: 28},  # the AdamW part's; Muon's part runs on torch
    tolerance=(1e-5, 1e-6),
    refuses=lambda c, sharded: (
        "optimizer=muon needs lr > 0: it is the Muon part's peak rate (adamw_lr the other's)" if c.lr <= 0 else None
    ),
)
