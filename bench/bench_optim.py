"""Optimizer step time and effective bandwidth on GPT-2 parameter shapes, ours against the peers.

    python -m bench.bench_optim                          # gpt2 and gpt2-large on CUDA; gpt2 on CPU
    python -m bench.bench_optim --models gpt2 --repeats 20

Each contender steps a fresh copy of the model's parameter shapes (fp32, random gradients) after
warm-up; the median of `repeats` timed steps is reported. Effective GB/s counts the fp32 bytes a step
must move per parameter: AdamW 28 (param r/w, grad r, two moments r/w), Lion 20, SophiaG 24; the
device's copy bandwidth (read + write of a 1 GiB buffer) is the ceiling. "per-layer groups" gives every
parameter tensor its own group with its own multiplier: how a layer-wise rate looks to an optimizer.
Writes bench/results/optim-<device>.json and .md (device, versions, commit).
"""

import argparse
import gc
import json
import statistics
import time

import torch

from bench.common import LOCAL, results_base, sync
from model import GPT, GPTConfig
from optimizers import adam_mini, adamw, lion, lwas, sophiag
from optimizers.registry import spec
from runtime.device import environment


def bytes_per_parameter(optimizer: str) -> int:
    """The fp32 bytes a step of the optimizer must move per parameter: its step's kernels' (its registry
    entry); Adam-mini reads the gradient twice."""
    return sum(spec(optimizer).kernels.values())


def parameter_shapes(preset: str) -> list[tuple[str, torch.Size]]:
    with torch.device("meta"):
        return [(name, p.shape) for name, p in GPT(GPTConfig.from_preset(preset)).named_parameters()]


def make_params(named_shapes, device):
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for _, s in named_shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def per_layer(params):
    return [{"params": [p], "multiplier": 0.5 + i / len(params)} for i, p in enumerate(params)]


def per_layer_torch(params, lr):  # plain PyTorch gives a layer its own rate through its own group
    return [{"params": [p], "lr": lr * (0.5 + i / len(params))} for i, p in enumerate(params)]


def contenders(device, named_shapes, config):
    """name -> (optimizer family, constructor from a parameter list)."""
    cuda = device.type == "cuda"
    names = [name for name, _ in named_shapes]

    def named_per_layer(ps):  # Adam-mini assigns its blocks by parameter name
        return [{**group, "names": [name]} for group, name in zip(per_layer(ps), names)]

    entries = {
        "ours AdamW, 1 group": ("adamw", lambda ps: adamw.AdamW(ps, lr=6e-4)),
        "ours AdamW, per-layer groups": ("adamw", lambda ps: adamw.AdamW(per_layer(ps), lr=6e-4)),
        "torch AdamW fused, 1 group": (
            "adamw",
            lambda ps: torch.optim.AdamW(ps, lr=6e-4, betas=(0.9, 0.95), fused=True),
        ),
        "torch AdamW fused, per-layer groups": (
            "adamw",
            lambda ps: torch.optim.AdamW(per_layer_torch(ps, 6e-4), lr=6e-4, betas=(0.9, 0.95), fused=True),
        ),
        "ours Lion, per-layer groups": ("lion", lambda ps: lion.Lion(per_layer(ps), lr=1e-4, weight_decay=1.0)),
        "ours SophiaG, per-layer groups": (
            "sophiag",
            lambda ps: sophiag.SophiaG(per_layer(ps), lr=6e-4, rho=0.05, weight_decay=0.2, bs=491_520),
        ),
        "ours Adam-mini, per-layer groups": (
            "adam_mini",
            lambda ps: adam_mini.AdamMini(named_per_layer(ps), lr=6e-4, n_head=config.n_head),
        ),
        # LW-AS between refreshes (the refresh needs a model: bench_train.py times it): its step reads a
        # step size per tensor
        "ours AdamW-LW step, per-layer groups": ("adamw_lw", lambda ps: lwas.AdamWLW(per_layer(ps), lr=0.1)),
        "ours SGD-m-LW step, per-layer groups": ("sgdm_lw", lambda ps: lwas.SGDMomentumLW(per_layer(ps), lr=1.0)),
    }
    try:
        from lion_pytorch import Lion

        label = "lion-pytorch (triton)" if cuda else "lion-pytorch"
        entries[label] = ("lion", lambda ps: Lion(ps, lr=1e-4, weight_decay=1.0, use_triton=cuda))
    except ImportError:
        pass
    try:
        from sophia_opt import SophiaG

        entries["sophia-opt"] = ("sophiag", lambda ps: _SophiaWithBs(SophiaG(ps, lr=6e-4, rho=0.05, weight_decay=0.2)))
    except ImportError:
        pass
    try:
        from adam_mini import Adam_mini

        entries["adam-mini (official)"] = (
            "adam_mini",
            lambda ps: Adam_mini(
                list(zip(names, ps)),
                lr=6e-4,
                betas=(0.9, 0.95),
                weight_decay=0.1,
                dim=config.n_embd,
                n_heads=config.n_head,
                verbose=False,
            ),
        )
    except ImportError:
        pass
    return entries


class _SophiaWithBs:
    """sophia-opt takes the batch size in step(); ours in the constructor."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self):
        self.optimizer.step(bs=491_520)


def time_steps(step, device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def copy_bandwidth(device, repeats: int) -> float:
    """GB/s of dst.copy_(src) on 1 GiB (256 MiB on CPU), counting read + write."""
    numel = (1 << 28) if device.type == "cuda" else (1 << 26)
    src, dst = torch.randn(numel, device=device), torch.empty(numel, device=device)
    seconds = statistics.median(time_steps(lambda: dst.copy_(src), device, 3, repeats))
    return 2 * 4 * numel / seconds / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--models", nargs="+", default=None, help="presets (default: gpt2 gpt2-large on CUDA, gpt2 on CPU)"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--out", default=LOCAL, help="results folder (default out-bench/; bench/results: the committed ones)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    models = args.models or (["gpt2", "gpt2-large"] if device.type == "cuda" else ["gpt2"])
    env = environment(device)
    bandwidth = copy_bandwidth(device, args.repeats)
    print(f"{env['device']}: copy bandwidth {bandwidth:.0f} GB/s (read + write)")
    rows = []
    for preset in models:
        shapes = parameter_shapes(preset)
        numel = sum(s.numel() for _, s in shapes)
        for name, (family, make) in contenders(device, shapes, GPTConfig.from_preset(preset)).items():
            params = make_params(shapes, device)
            optimizer = make(params)
            seconds = statistics.median(time_steps(optimizer.step, device, args.warmup, args.repeats))
            gbps = bytes_per_parameter(family) * numel / seconds / 1e9
            rows.append(
                {
                    "model": preset,
                    "optimizer": name,
                    "family": family,
                    "params": numel,
                    "tensors": len(shapes),
                    "ms": 1000 * seconds,
                    "GB/s": gbps,
                    "fraction_of_copy_bandwidth": gbps / bandwidth,
                }
            )
            print(
                f"{preset:10} {name:38} {1000 * seconds:9.2f} ms  {gbps:7.1f} GB/s  "
                f"{100 * gbps / bandwidth:5.1f}% of copy"
            )
            del params, optimizer
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for row in rows:  # speed-up of ours over each peer of the same model and family
        peers = [
            r
            for r in rows
            if r["model"] == row["model"] and r["family"] == row["family"] and not r["optimizer"].startswith("ours")
        ]
        if row["optimizer"].startswith("ours"):
            row["speedup_vs"] = {peer["optimizer"]: peer["ms"] / row["ms"] for peer in peers}
    write_results(args.out, env, bandwidth, rows)


def write_results(out_dir, env, bandwidth, rows):
    base = results_base(out_dir, "optim", env["device"])
    with open(base + ".json", "w") as f:
        json.dump({"env": env, "copy_GBps": bandwidth, "rows": rows}, f, indent=2)
    lines = [
        f"Optimizer step on {env['device']} (torch {env['torch']}, triton {env['triton']}, commit {env['commit']}); "
        f"copy bandwidth {bandwidth:.0f} GB/s. Median of timed steps.",
        "",
        "| model | optimizer | ms/step | GB/s | % of copy | speed-up of ours |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        speedups = ", ".join(f"{v:.2f}x vs {k}" for k, v in r.get("speedup_vs", {}).items())
        lines.append(
            f"| {r['model']} | {r['optimizer']} | {r['ms']:.2f} | {r['GB/s']:.1f} | "
            f"{100 * r['fraction_of_copy_bandwidth']:.1f} | {speedups} |"
        )
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {base}.json and {base}.md")


if __name__ == "__main__":
    main()
