"""What each parameter tensor's step did, every layer_stats_interval steps: the RMS of its gradient (as the
optimizer receives it: accumulated, averaged over ranks, clipped), of its weight before the step, and of the
update the step applied, measured as the weights after the step minus a copy taken before it, so weight
decay, the layer's multiplier and every optimizer's own terms are in it whatever the optimizer or backend;
and update RMS / weight RMS (the "update:data ratio", about 1e-3 in a healthy run). A step skipped as
non-finite records an update of 0.

Under DDP every rank holds the same tensors; under fsdp each rank's sums of squares over its shards are
summed over the ranks (runtime.fsdp.sum_over_shards), so every figure is the one process's. The weights are
copied on these steps only. The records go to out_dir/layers.jsonl (training.runlog.RunLog.layers), one line
per stats step, trimmed on a resume as log.jsonl is.
"""

import torch

from model import param_role
from runtime.fsdp import local, sum_over_shards

# What a record holds per tensor, in this order.
FIGURES = ("grad_rms", "weight_rms", "update_rms", "update_to_weight")


# On CPU a tensor's sum of squares is torch.sum's over chunks of this many elements, then over the chunks: each
# square's temporary stays in cache rather than a fresh tensor the size of the weights (2.3x faster on gpt2's
# tensors), and the sums are torch.sum's, 1.3e-7 from float64's. torch._foreach_norm, vector_norm and one BLAS
# dot over a whole 6.4M-element embedding are off by 5e-3, 1e-3 and 8.5e-5.
CPU_CHUNK = 1 << 16


def sum_of_squares(t: torch.Tensor) -> torch.Tensor:
    """The sum of t's squared elements, as a float32 scalar on t's device."""
    t = t.float()
    if t.device.type != "cpu":  # one reduction kernel, its temporary from the caching allocator
        return t.square().sum()
    return torch.stack([chunk.square().sum() for chunk in t.reshape(-1).split(CPU_CHUNK)]).sum()


class LayerStats:
    """One stats step's figures for the parameters of `model` (the unwrapped one; fsdp's DTensors or plain
    tensors): before() after the gradients are final, after() once the optimizer has stepped."""

    def __init__(self, model: torch.nn.Module):
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        # the whole tensor's size (a DTensor's numel is its global one)
        self.numels = torch.tensor([p.numel() for p in self.params], dtype=torch.float64)
        self._before = self._squares_before = None

    def _squares(self, tensors) -> torch.Tensor:
        return torch.stack([sum_of_squares(t) for t in tensors]).double()

    def before(self) -> None:
        weights = [local(p.detach()) for p in self.params]
        grads = [local(p.grad) if p.grad is not None else torch.zeros_like(w) for p, w in zip(self.params, weights)]
        self._squares_before = torch.stack([self._squares(grads), self._squares(weights)])
        self._before = [w.clone() for w in weights]

    def after(self, step: int) -> dict:
        """The record of optimizer step `step` (1-based, as log.jsonl counts): the tensors' names and each
        figure as a list in their order. A collective under fsdp: every rank calls it."""
        weights = [local(p.detach()) for p in self.params]
        torch._foreach_sub_(self._before, weights)  # the copy becomes minus the update: no second tensor
        squares = torch.cat([self._squares_before, self._squares(self._before)[None]])
        squares = sum_over_shards(squares, self.params).cpu()
        grad_rms, weight_rms, update_rms = (squares / self.numels).sqrt()
        ratio = update_rms / weight_rms.clamp(min=torch.finfo(torch.float64).tiny)
        self._before = self._squares_before = None
        figures = (grad_rms, weight_rms, update_rms, ratio)
        return {"step": step, "names": self.names} | {
            name: [float(f"{value:.7g}") for value in values.tolist()] for name, values in zip(FIGURES, figures)
        }


def by_kind(record: dict) -> dict[str, float]:
    """The loggers' summary of a record: per kind of tensor (model.ParamRole.kind: embedding, q, k, v,
    attn_out, mlp_in, mlp_out, layernorm, bias, ...) the median update/weight ratio and gradient RMS."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(record["names"]):
        groups.setdefault(param_role(name).kind, []).append(i)
    summary = {}
    for kind, indices in groups.items():
        for figure in ("update_to_weight", "grad_rms"):
            values = sorted(record[figure][i] for i in indices)
            summary[f"{kind}/{figure}"] = values[len(values) // 2]
    return summary
