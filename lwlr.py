"""Layer-wise learning rates initialized from the gradient magnitude at initialization
(ICLR 2025 submission "Initializing the Layer-wise Learning Rate", Algorithm 1).

Every layer i (each weight, bias, LayerNorm scale and embedding tensor; q, k and v are three layers)
gets a constant learning-rate multiplier (the paper's eta_i) for the whole run, on top of any optimizer
and the global schedule: step_i = gamma(t) * multiplier_i * O'(g_i).

    1. Copy the model and re-initialize the copy for measurement (`init`); or, given the model's compiled
       forward, re-initialize the model itself and restore its weights afterwards, so the measurement runs
       through the training steps' graph:
         fan_out  every Linear weight N(0, 1/fan_out), the backward-variance-preserving init; the tied
                  wte / lm_head counts as a Linear with fan_out = vocab size; LayerNorm scales 1,
                  biases 0, the position embedding treated as a bias (0). Our reading of the paper's
                  Algorithm 1, and the default.
         fan_in   the same with N(0, 1/fan_in): the forward-variance-preserving reading.
         model    the model's own weights as passed (its training init when called before training).
    2. With the weights fixed, for T batches: backward, and add each layer's mean absolute gradient
       (L1 norm / numel) to G_i; G_i is the mean over the T batches.
    3. raw_i = G_i^-power (power = 1/2 in the paper).
    4. Normalize so the parameter-weighted mean multiplier is 1, n_j a layer's parameter count:
       multiplier_i = raw_i * sum_j n_j / sum_j n_j raw_j.
    5. Training starts from the model's normal init with multiplier_i on layer i (its param group's
       `multiplier`).

The tied wte / lm_head is one tensor, so it gets one multiplier; its gradient sums the embedding and
output-layer contributions. Baselines under the same normalization: depth_increasing / depth_decreasing
(the paper's Figure 1: relative rate linear in block depth from 0.1 to 1, or from 2 to 1; the
embeddings take the first block's rate, ln_f the last's), fan_in (multiplier ∝ 1/sqrt(fan_in); embeddings,
biases and LayerNorm scales have fan_in 1) and blockwise (Blockwise LR's fixed table per block type,
BLOCKWISE_LR). lwlr_matrices_multipliers combines lwlr's measured rates among the blocks' weight matrices
with fan_in's for everything else.

This file is the method alone. Where a training run's multipliers come from (measured, cached, a
baseline or a file), the lwlr.json report, its plot and the command line are in multipliers.py; the
param groups that carry them to an optimizer are optimizers.base.param_groups.
"""

import copy
import itertools
import math
from contextlib import nullcontext

import torch
import torch.distributed as dist

from model import init_weights, param_role
from runtime.errors import UserError
from training.config import MEASUREMENT_INITS

# Blockwise LR (Wang, Wang, Zhou, Yan, E and Wu, "The Sharpness Disparity Principle in Transformers for
# Accelerating Language Model Pre-Training", ICML 2025, arXiv 2502.19002; Wongboo/BlockwiseLearningRate,
# train_gpt_bw.py): a constant multiplier per block type, against the sharpness order it measured (embedding
# << q, k < MLP < v, attn_out << LayerNorm), weights and biases alike. The paper's numbers multiply a base rate
# that is the LayerNorms' rate; here they are normalized like every rule (parameter-weighted mean 1), so lr is
# the mean rate and a LayerNorm trains at lr / (the table's parameter-weighted mean). For gpt2 (124M) that mean
# is 7.26 (the tied 38.6M-parameter embedding at 10 weighs most): the paper's base rate b is lr = 7.26 b here.
BLOCK_TYPES = {  # model.param_role's layer -> the paper's block type
    "embedding": "Embed",  # the tied wte / lm_head
    "position": "Embed",
    "q": "QK",
    "k": "QK",
    "mlp_in": "FFN",
    "mlp_out": "FFN",
    "v": "VO",
    "attn_out": "VO",
    "layernorm": "Norm",
}
BLOCKWISE_LR = {"Embed": 10.0, "QK": 8.0, "FFN": 6.0, "VO": 4.0, "Norm": 1.0}


class UnmappedLayersError(UserError):
    """A model whose parameter names a name-based rule cannot place (a new architecture's modules)."""


def measure_grad_mean_abs(
    model: torch.nn.Module, batches, T: int = 100, init: str = "fan_out", ctx=None, forward=None
) -> dict[str, float]:
    """G_i: each parameter's mean |gradient|, averaged over T batches, on the model re-initialized by
    `init`: a copy of it, or, given `forward` (the model compiled, torch.compile(model)), the model itself,
    whose weights and gradients are restored afterwards to the bit, so the measurement runs through the
    graph the training steps run (compiled once for both). Either draws the same numbers from torch's RNG.
    In a torch.distributed run each rank passes its own batches and measures batches rank, rank + world,
    ... of the T; the sums are all-reduced, so every rank returns the same G as one process measuring
    all T batches."""
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"lwlr T must be an integer >= 1, got {T!r}")
    if init not in MEASUREMENT_INITS:
        raise ValueError(f"lwlr init {init!r}: choose one of {', '.join(MEASUREMENT_INITS)}")
    if forward is None:
        probe = copy.deepcopy(model)
        return _measure(probe, probe, batches, T, init, ctx)

    def tensors():  # everything a forward and backward in training mode may change
        return itertools.chain(model.named_parameters(), model.named_buffers())

    saved = {name: t.detach().clone() for name, t in tensors()}
    was_training = model.training
    try:
        return _measure(model, forward, batches, T, init, ctx)
    finally:
        with torch.no_grad():
            for name, t in tensors():
                t.copy_(saved[name])
                t.grad = None
        model.train(was_training)


def _measure(probe: torch.nn.Module, forward, batches, T: int, init: str, ctx) -> dict[str, float]:
    """measure_grad_mean_abs on `probe`, its forward and backward through `forward`."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    probe.train()
    if init != "model":
        init_weights(probe, init)
    named = [(name, p) for name, p in probe.named_parameters() if p.requires_grad]
    sums = torch.zeros(len(named), dtype=torch.float64, device=named[0][1].device)
    local_batches = len(range(rank, T, world))
    measured = 0
    for x, y in batches:
        if measured == local_batches:
            break
        probe.zero_grad(set_to_none=True)
        with ctx or nullcontext():
            _, loss = forward(x, y)
        loss.backward()
        for i, (_, p) in enumerate(named):
            if p.grad is not None:
                sums[i] += p.grad.abs().sum(dtype=torch.float64) / p.numel()  # float64 accumulator, no float64 copy
        measured += 1
    if measured < local_batches:
        raise ValueError(f"lwlr needs {local_batches} batches on this rank for T={T}, the data gave {measured}")
    if world > 1:
        dist.all_reduce(sums)
    grad_mean_abs = {name: value / T for (name, _), value in zip(named, sums.tolist())}
    bad = [name for name, g in grad_mean_abs.items() if not (math.isfinite(g) and g > 0) and not unmeasurable(name)]
    if bad:
        raise ValueError(
            f"lwlr: mean |gradient| at init is zero or not finite for {', '.join(bad)}; such a layer gets no "
            "gradient from the loss (unused or frozen) or the loss diverged. Freeze it (requires_grad=False) or fix "
            "the model."
        )
    return grad_mean_abs


def normalize(raw: dict[str, float], numels: dict[str, int]) -> dict[str, float]:
    """Scale raw rates so that the parameter-weighted mean is 1."""
    total = sum(numels[name] for name in raw)
    weighted = sum(numels[name] * rate for name, rate in raw.items())
    return {name: rate * total / weighted for name, rate in raw.items()}


def numels_of(model: torch.nn.Module) -> dict[str, int]:
    return {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}


def unmeasurable(name: str) -> bool:
    """A layer whose gradient is zero by construction (the key bias: model.ParamRole.gradient_is_zero), so
    that measuring it yields rounding noise, which Algorithm 1 would turn into an arbitrary, huge rate. It
    keeps multiplier 1 (the global rate) and the measured layers are normalized among themselves, so the
    overall parameter-weighted mean is still 1. (The paper's GPT-2 fuses q, k, v into one tensor, which
    hides this.)"""
    return param_role(name).gradient_is_zero


def multipliers_from_grads(
    grad_mean_abs: dict[str, float], numels: dict[str, int], power: float = 0.5
) -> dict[str, float]:
    if not (math.isfinite(power) and power > 0):
        raise ValueError(f"lwlr power must be finite and > 0, got {power}")
    measured = normalize({name: g**-power for name, g in grad_mean_abs.items() if not unmeasurable(name)}, numels)
    return {name: measured.get(name, 1.0) for name in grad_mean_abs}  # model order


def compute_multipliers(
    model: torch.nn.Module, batches, T: int = 100, init: str = "fan_out", power: float = 0.5, ctx=None
) -> dict[str, float]:
    """Algorithm 1: name -> constant learning-rate multiplier, parameter-weighted mean 1."""
    return multipliers_from_grads(measure_grad_mean_abs(model, batches, T, init, ctx), numels_of(model), power)


def baseline_multipliers(model: torch.nn.Module, rule: str) -> dict[str, float]:
    """The comparison rules, normalized like lwlr: depth_increasing, depth_decreasing, fan_in, blockwise."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if rule == "fan_in":
        # nn.Linear weights are (out, in); embeddings, biases and LayerNorm scales see one input each.
        embeddings = ("embedding", "position")
        raw = {
            name: 1 / math.sqrt(p.shape[1] if p.dim() == 2 and param_role(name).layer not in embeddings else 1)
            for name, p in params.items()
        }
        return normalize(raw, numels_of(model))
    if rule == "blockwise":
        unmapped = [name for name in params if param_role(name).layer not in BLOCK_TYPES]
        if unmapped:
            raise UnmappedLayersError(
                f"lr_rule=blockwise: no block type for {', '.join(unmapped[:8])}"
                + (f" and {len(unmapped) - 8} more" if len(unmapped) > 8 else "")
                + " (model.LAYER_ROLES names the modules it knows; add yours there)"
            )
        raw = {name: BLOCKWISE_LR[BLOCK_TYPES[param_role(name).layer]] for name in params}
        return normalize(raw, numels_of(model))
    if rule not in ("depth_increasing", "depth_decreasing"):
        raise ValueError(f"unknown baseline rule {rule!r}")
    n_layer = model.config.n_layer
    first, last = (0.1, 1.0) if rule == "depth_increasing" else (2.0, 1.0)
    raw = {}
    for name in params:
        # Outside the blocks: the embeddings take the first block's rate, ln_f the last's.
        block = param_role(name).block
        depth = block if block is not None else (n_layer - 1 if param_role(name).layer == "layernorm" else 0)
        raw[name] = first + (last - first) * depth / max(1, n_layer - 1)
    return normalize(raw, numels_of(model))


def lwlr_matrices_multipliers(model: torch.nn.Module, lwlr: dict[str, float]) -> dict[str, float]:
    """fan_in, with the blocks' weight matrices' share redistributed among them as lwlr measured: every
    embedding, bias and LayerNorm keeps its fan_in multiplier, and each matrix gets its lwlr multiplier times
    the one factor that gives the matrices fan_in's parameter-weighted mean. So the parameter-weighted mean is
    1, as in both rules, and vectors against matrices stand as fan_in has them. (The held-out comparison's
    suspect: lwlr's rates for the vectors and embeddings, not its matrices', cost it against fan_in.) Taking
    lwlr_matrices' own output as `lwlr` gives it back unchanged."""
    fan_in = baseline_multipliers(model, "fan_in")
    numels = numels_of(model)
    matrices = {name for name in fan_in if param_role(name).is_block_matrix}
    if not matrices:
        raise UnmappedLayersError("lr_rule=lwlr_matrices: the model has no transformer-block weight matrices")
    scale = sum(numels[n] * fan_in[n] for n in matrices) / sum(numels[n] * lwlr[n] for n in matrices)
    return {name: lwlr[name] * scale if name in matrices else rate for name, rate in fan_in.items()}
