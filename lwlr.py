"""Layer-wise learning rates initialized from the gradient magnitude at initialization
(ICLR 2025 submission "Initializing the Layer-wise Learning Rate", Algorithm 1).

Every layer i (each weight, bias, LayerNorm scale and embedding tensor; q, k and v are three layers)
gets a constant multiplier eta_i for the whole run, on top of any optimizer and the global schedule:
step_i = gamma(t) * eta_i * O'(g_i).

    1. Copy the model and re-initialize the copy for measurement (`init`):
         fan_out  every Linear weight N(0, 1/fan_out), the backward-variance-preserving init; the tied
                  wte / lm_head counts as a Linear with fan_out = vocab size; LayerNorm scales 1,
                  biases 0, the position embedding treated as a bias (0). Our reading of the paper's
                  Algorithm 1, and the default.
         fan_in   the same with N(0, 1/fan_in): the forward-variance-preserving reading.
         model    the model's own weights as passed (its training init when called before training).
    2. With the weights fixed, for T batches: backward, and add each layer's mean absolute gradient
       (L1 norm / numel) to G_i; G_i is the mean over the T batches.
    3. eta~_i = G_i^-power (power = 1/2 in the paper).
    4. Normalize so the parameter-weighted mean multiplier is 1: eta_i = eta~_i * sum_j m_j / sum_j m_j eta~_j.
    5. Training starts from the model's normal init with eta_i on layer i (param_groups' `lr_scale`).

The tied wte / lm_head is one tensor, so it gets one multiplier; its gradient sums the embedding and
output-layer contributions. Baselines under the same normalization: depth_increasing / depth_decreasing
(the paper's Figure 1: relative rate linear in block depth from 0.1 to 1, or from 2 to 1; the
embeddings take the first block's rate, ln_f the last's) and fan_in (eta ∝ 1/sqrt(fan_in); embeddings,
biases and LayerNorm scales have fan_in 1).

    python lwlr.py [config/FILE.py] [--key=value ...]   # measure with a training config: lwlr.json, lwlr.png
    python lwlr.py --compare a.json b.json              # max and mean deviation in percent (the paper's Table 3)
"""

import copy
import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from train_config import CHOICES

MEASUREMENT_INITS = CHOICES["lwlr_init"]
# Layers whose gradient is zero by construction, so measuring it yields rounding noise: softmax(q.(k + b))
# does not depend on the key bias b, and its measured mean |g| is ~1e-10 against ~1e-4 for real layers
# (gpt2-tiny). Algorithm 1 would turn that noise into an arbitrary, huge rate. They keep multiplier 1
# (the global rate) and the measured layers are normalized among themselves, so the overall
# parameter-weighted mean is still 1. (The paper's GPT-2 fuses q, k, v into one tensor, which hides this.)
ZERO_GRADIENT_BY_CONSTRUCTION = ("attn.k_proj.bias",)
RULES = CHOICES["lr_rule"]
BLOCK_INDEX = re.compile(r"\.h\.(\d+)\.")


def measure_grad_mean_abs(model: torch.nn.Module, batches, T: int = 100, init: str = "fan_out", ctx=None) -> dict[str, float]:
    """G_i: each parameter's mean |gradient|, averaged over T batches, on a copy of the model
    re-initialized by `init`. In a torch.distributed run each rank passes its own batches and measures
    batches rank, rank + world, ... of the T; the sums are all-reduced, so every rank returns the
    same G as one process measuring all T batches."""
    from model import init_weights

    if not isinstance(T, int) or T < 1:
        raise ValueError(f"lwlr T must be an integer >= 1, got {T!r}")
    if init not in MEASUREMENT_INITS:
        raise ValueError(f"lwlr init {init!r}: choose one of {', '.join(MEASUREMENT_INITS)}")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    probe = copy.deepcopy(model).train()
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
            _, loss = probe(x, y)
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
            "gradient from the loss (unused or frozen) or the loss diverged. Freeze it (requires_grad=False) or fix the model."
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
    return name.endswith(ZERO_GRADIENT_BY_CONSTRUCTION)


def multipliers_from_grads(grad_mean_abs: dict[str, float], numels: dict[str, int], power: float = 0.5) -> dict[str, float]:
    if not (math.isfinite(power) and power > 0):
        raise ValueError(f"lwlr power must be finite and > 0, got {power}")
    measured = normalize({name: g**-power for name, g in grad_mean_abs.items() if not unmeasurable(name)}, numels)
    return {name: measured.get(name, 1.0) for name in grad_mean_abs}  # model order


def compute_multipliers(model: torch.nn.Module, batches, T: int = 100, init: str = "fan_out", power: float = 0.5, ctx=None) -> dict[str, float]:
    """Algorithm 1: name -> constant learning-rate multiplier, parameter-weighted mean 1."""
    return multipliers_from_grads(measure_grad_mean_abs(model, batches, T, init, ctx), numels_of(model), power)


def baseline_multipliers(model: torch.nn.Module, rule: str) -> dict[str, float]:
    """The comparison rules, normalized like lwlr: depth_increasing, depth_decreasing, fan_in."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if rule == "fan_in":
        # nn.Linear weights are (out, in); embeddings, biases and LayerNorm scales see one input each.
        raw = {name: 1 / math.sqrt(p.shape[1] if p.dim() == 2 and "wte" not in name and "wpe" not in name else 1) for name, p in params.items()}
        return normalize(raw, numels_of(model))
    if rule not in ("depth_increasing", "depth_decreasing"):
        raise ValueError(f"unknown baseline rule {rule!r}")
    n_layer = model.config.n_layer
    first, last = (0.1, 1.0) if rule == "depth_increasing" else (2.0, 1.0)
    raw = {}
    for name in params:
        match = BLOCK_INDEX.search(name)
        depth = int(match.group(1)) if match else (n_layer - 1 if "ln_f" in name else 0)
        raw[name] = first + (last - first) * depth / max(1, n_layer - 1)
    return normalize(raw, numels_of(model))


def param_groups(model: torch.nn.Module, multipliers: dict[str, float] | None, weight_decay: float, scale_decay: bool = True) -> list[dict]:
    """torch-style param groups, each carrying `lr_scale` (the timm convention).

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
        group = groups.setdefault((lr_scale, decay), {"params": [], "names": [], "lr_scale": lr_scale, "weight_decay": decay})
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def load_multipliers(path: str, model: torch.nn.Module) -> dict[str, float]:
    """Multipliers from an lwlr.json, checked against the model's layers."""
    try:
        with open(path, "rb") as f:
            layers = json.loads(f.read().decode("utf-8"))["layers"]
        multipliers = {layer["name"]: float(layer["multiplier"]) for layer in layers}
        shapes = {layer["name"]: tuple(layer["shape"]) for layer in layers}
    except (OSError, ValueError, KeyError, TypeError) as e:  # ValueError: JSON syntax, undecodable bytes
        raise ValueError(f"lwlr_file {path}: not a readable lwlr.json ({type(e).__name__}: {e})") from None
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    extra, missing = sorted(set(multipliers) - set(params)), sorted(set(params) - set(multipliers))
    if extra:
        raise ValueError(f"lwlr_file {path}: layer(s) {', '.join(extra)} are not in the model")
    if missing:
        raise ValueError(f"lwlr_file {path}: no multiplier for the model's layer(s) {', '.join(missing)}")
    # Same names, other sizes (another n_embd or vocabulary): multipliers measured on a different model.
    wrong = [f"{name} {list(shapes[name])} (model {list(p.shape)})" for name, p in params.items() if shapes[name] != tuple(p.shape)]
    if wrong:
        raise ValueError(f"lwlr_file {path} was measured on another model: shapes differ for {', '.join(wrong[:3])}"
                         + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""))
    bad = [name for name, m in multipliers.items() if not (math.isfinite(m) and m > 0)]
    if bad:
        raise ValueError(f"lwlr_file {path}: multipliers of {', '.join(bad)} are not positive finite numbers")
    return multipliers


def report(module, multipliers: dict[str, float], grad_mean_abs: dict[str, float] | None, **meta) -> dict:
    """The content of lwlr.json: per layer name, shape, numel, mean |g| and multiplier, plus how it was made."""
    params = dict(module.named_parameters())
    layers = [
        {"name": name, "shape": list(params[name].shape), "numel": params[name].numel(),
         "grad_mean_abs": grad_mean_abs[name] if grad_mean_abs else None, "multiplier": m}
        for name, m in multipliers.items()
    ]
    return {**meta, "layers": layers}


def save_report(data: dict, out_dir: str) -> None:
    with open(os.path.join(out_dir, "lwlr.json"), "w") as f:
        json.dump(data, f, indent=1)
    plot(data, os.path.join(out_dir, "lwlr.png"))


def layer_kind(name: str) -> str:
    if name.endswith(".bias"):
        return "bias"
    for key in ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj", "wte", "wpe"):
        if key in name:
            return key
    return "LayerNorm"


KIND_COLORS = {"q_proj": "tab:blue", "k_proj": "tab:cyan", "v_proj": "tab:green", "o_proj": "tab:olive", "c_fc": "tab:orange",
               "c_proj": "tab:red", "wte": "tab:purple", "wpe": "tab:pink", "bias": "tab:gray", "LayerNorm": "black"}


def plot(data: dict, path: str) -> None:
    """Multipliers in model order on a log axis: all layers, and the Linear weights alone (the paper's
    Figures 4 and 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = data["layers"]
    linear = [layer for layer in layers if layer_kind(layer["name"]) in ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj")]
    fig, axes = plt.subplots(2, 1, figsize=(12, 8))
    for ax, subset, title in ((axes[0], layers, "all layers"), (axes[1], linear, "Linear weights")):
        for kind, color in KIND_COLORS.items():
            points = [(i, layer["multiplier"]) for i, layer in enumerate(subset) if layer_kind(layer["name"]) == kind]
            if points:
                ax.scatter(*zip(*points), s=14, color=color, label=kind)
        ax.set_yscale("log")
        ax.axhline(1.0, color="gray", lw=0.5)
        ax.set_xlabel("layer, in model order")
        ax.set_ylabel("lr multiplier")
        ax.set_title(f"{data.get('model', '')} {data.get('rule', 'lwlr')} multipliers ({title}; init {data.get('init')}, T={data.get('T')}, power {data.get('power')})")
        ax.legend(fontsize=7, ncol=5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(path_a: str, path_b: str) -> tuple[float, float]:
    """Max and mean |m_a - m_b| / m_b in percent over the layers both files share."""
    a, b = ({layer["name"]: layer["multiplier"] for layer in json.load(open(p))["layers"]} for p in (path_a, path_b))
    if set(a) != set(b):
        raise ValueError(f"{path_a} and {path_b} cover different layers")
    deviations = [100 * abs(a[n] - b[n]) / b[n] for n in b]
    return max(deviations), sum(deviations) / len(deviations)


def multipliers_for_config(c, model, ctx=None, log=print) -> tuple[dict[str, float] | None, dict | None]:
    """The multipliers a TrainConfig asks for (None for lr_rule=single) and the report to save."""
    if c.lr_rule == "single":
        return None, None
    meta = {"rule": c.lr_rule, "model": c.model, "dataset": c.data_dir or c.dataset, "seed": c.seed}
    if c.lr_rule != "lwlr":
        multipliers = baseline_multipliers(model, c.lr_rule)
        return multipliers, report(model, multipliers, None, **meta)
    if c.lwlr_file:
        multipliers = load_multipliers(c.lwlr_file, model)
        return multipliers, report(model, multipliers, None, **meta, source=c.lwlr_file)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    gpt_config = model.config
    batches = c.token_batches("train", "lwlr", gpt_config)
    device = next(model.parameters()).device
    mine = (batches.get(t, c.micro_batch_size, 0, c.micro_batch_size, device) for t in range(rank, c.lwlr_T, world))
    log(f"lwlr: measuring each layer's mean |gradient| at init ({c.lwlr_init}) over T={c.lwlr_T} batches ...")
    start = time.perf_counter()
    grads = measure_grad_mean_abs(model, mine, c.lwlr_T, c.lwlr_init, ctx)
    seconds = time.perf_counter() - start
    multipliers = multipliers_from_grads(grads, numels_of(model), c.lwlr_power)
    log(f"lwlr: measured {len(grads)} layers over T={c.lwlr_T} batches of {c.micro_batch_size} in {seconds:.1f} s")
    meta.update(T=c.lwlr_T, init=c.lwlr_init, power=c.lwlr_power, micro_batch_size=c.micro_batch_size, block_size=gpt_config.block_size, world_size=world)
    return multipliers, report(model, multipliers, grads, **meta)


def print_table(data: dict) -> None:
    print(f"{'layer':44} {'shape':>14} {'mean |g|':>11} {'multiplier':>10}")
    for layer in data["layers"]:
        g = f"{layer['grad_mean_abs']:.3e}" if layer["grad_mean_abs"] is not None else "-"
        print(f"{layer['name']:44} {str(tuple(layer['shape'])):>14} {g:>11} {layer['multiplier']:10.3f}")
    values = [layer["multiplier"] for layer in data["layers"]]
    print(f"{len(values)} layers; multipliers from {min(values):.3f} to {max(values):.3f}")


def main(argv: list[str] | None = None) -> int:
    from model import GPT
    from runtime import autocast, init_runtime
    from train_config import parse_config

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--compare"]:
        if len(argv) != 3:
            raise ValueError("usage: python lwlr.py --compare a.json b.json")
        worst, mean = compare(argv[1], argv[2])
        print(f"deviation of {argv[1]} from {argv[2]}: max {worst:.2f}%, mean {mean:.2f}%")
        return 0
    c = parse_config(argv)
    if c.lr_rule == "single":
        raise ValueError("lr_rule=single has no multipliers to measure; use lwlr (the default) or a baseline rule")
    rt = init_runtime(c.device)
    torch.manual_seed(c.seed)
    model = GPT(c.gpt_config()).to(rt.device)
    _, data = multipliers_for_config(c, model, autocast(rt.device, c.dtype), log=rt.print0)
    if rt.is_main:
        os.makedirs(c.out_dir, exist_ok=True)
        save_report(data, c.out_dir)
        print_table(data)
        print(f"wrote {os.path.join(c.out_dir, 'lwlr.json')} and lwlr.png")
    return 0


if __name__ == "__main__":
    from runtime import run_main

    run_main(main)
