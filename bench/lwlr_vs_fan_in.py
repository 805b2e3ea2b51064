"""Is lwlr rediscovering fan_in? Each parameter tensor's lwlr multiplier against its fan_in multiplier,
for gpt2-mini and GPT-2 124M, measured on the CPU at a small T (the ablation in docs/findings.md found
T=1 measures as well as T=100), with their correlation and what the difference is made of.

    python -m bench.lwlr_vs_fan_in                                  # gpt2-mini and gpt2, T=4: ~1 min on 2 cores
    python -m bench.lwlr_vs_fan_in --models gpt2-mini --T 2 --out_dir /tmp/x

Writes OUT_DIR/results.json (every tensor's two multipliers), table.md (per model: the correlation of
the log multipliers over every tensor and over the blocks' matrices, then per layer kind the mean and
spread of log2(lwlr / fan_in)) and figure.png (lwlr against fan_in on log axes, one panel per model,
coloured by layer kind).
"""

import argparse
import json
import math
import os

import torch

import multipliers
from bench.common import LOCAL
from lwlr import baseline_multipliers
from model import BLOCK_LINEARS, GPT, param_role
from runtime.device import autocast, environment
from training.build import gpt_config, token_batches
from training.config import TrainConfig


def measure(model_name: str, T: int, device: torch.device, data_dir: str = "", block_size: int = 256) -> list[dict]:
    """Every tensor's lwlr multiplier (the paper's fan_out measurement init, on Shakespeare in GPT-2 BPE
    unless data_dir says otherwise) and fan_in multiplier, both normalized to a parameter-weighted mean of 1."""
    c = TrainConfig(
        model=model_name,
        dataset="shakespeare",
        data_dir=data_dir,
        block_size=block_size,
        micro_batch_size=4,
        lwlr_T=T,
        lwlr_cache_dir="none",
    )
    torch.manual_seed(c.seed)
    model = GPT(gpt_config(c)).to(device)
    fan_in = baseline_multipliers(model, "fan_in")
    batches = token_batches(c, "train", "lwlr", model.config)
    lwlr, _ = multipliers.for_config(c, model, batches, autocast(device, "float32"), log=print)
    return [
        {
            "name": name,
            "kind": param_role(name).kind,
            "numel": p.numel(),
            "lwlr": lwlr[name],
            "fan_in": fan_in[name],
        }
        for name, p in model.named_parameters()
    ]


def pearson(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    return cov / math.sqrt(sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys))


def summary(tensors: list[dict]) -> dict:
    """The correlation of log multipliers over tensors, and per layer kind the log2 ratio lwlr / fan_in
    (mean, min, max) with the kind's share of the parameters."""
    logs = [(math.log(t["lwlr"]), math.log(t["fan_in"])) for t in tensors]
    matrices = [(math.log(t["lwlr"]), math.log(t["fan_in"])) for t in tensors if t["kind"] in BLOCK_LINEARS]
    total = sum(t["numel"] for t in tensors)
    kinds = {}
    for t in tensors:
        kinds.setdefault(t["kind"], []).append(t)
    return {
        "pearson_log": pearson([a for a, _ in logs], [b for _, b in logs]),
        "pearson_log_matrices": pearson([a for a, _ in matrices], [b for _, b in matrices]),
        "kinds": {
            kind: {
                "tensors": len(group),
                "share_of_parameters": sum(t["numel"] for t in group) / total,
                "log2_ratio_mean": sum(math.log2(t["lwlr"] / t["fan_in"]) for t in group) / len(group),
                "log2_ratio_min": min(math.log2(t["lwlr"] / t["fan_in"]) for t in group),
                "log2_ratio_max": max(math.log2(t["lwlr"] / t["fan_in"]) for t in group),
            }
            for kind, group in kinds.items()
        },
    }


def table(results: dict) -> str:
    lines = [f"lwlr (T={results['T']}, init fan_out, power 1/2) against fan_in, per parameter tensor.", ""]
    for model_name, entry in results["models"].items():
        s = entry["summary"]
        lines += [
            f"## {model_name}: Pearson correlation of log multipliers {s['pearson_log']:.3f} over every tensor, "
            f"{s['pearson_log_matrices']:.3f} over the blocks' weight matrices",
            "",
            "| layer kind | tensors | share of parameters | log2(lwlr / fan_in): mean | min | max |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for kind, k in sorted(s["kinds"].items(), key=lambda item: -item[1]["share_of_parameters"]):
            lines.append(
                f"| {kind} | {k['tensors']} | {100 * k['share_of_parameters']:.1f}% | {k['log2_ratio_mean']:+.2f} | "
                f"{k['log2_ratio_min']:+.2f} | {k['log2_ratio_max']:+.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


MARKERS = "o^sDvP*XhdH"  # one shape per kind beside its colour: q and k sit at the same fan_in


def figure(results: dict, path: str) -> None:
    """lwlr's multiplier against fan_in's, tensor by tensor, a panel per model. The kinds of one fan_in
    column (q, k, v, ... share it) are spread sideways, each its own colour and shape, so none hides
    another."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    models = list(results["models"])
    kinds = list(multipliers.KIND_COLORS)
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models) + 1.5, 5), squeeze=False)
    for ax, model_name in zip(axes[0], models):
        tensors = results["models"][model_name]["tensors"]
        for index, (kind, color) in enumerate(multipliers.KIND_COLORS.items()):
            spread = 2 ** (0.07 * (index - len(kinds) / 2))  # a few percent either side, on the log axis
            points = [(t["fan_in"] * spread, t["lwlr"]) for t in tensors if t["kind"] == kind]
            if points:
                ax.scatter(*zip(*points), s=18, color=color, marker=MARKERS[index % len(MARKERS)], label=kind)
        values = [v for t in tensors for v in (t["fan_in"], t["lwlr"])]
        low, high = min(values) / 1.5, max(values) * 1.5
        ax.plot([low, high], [low, high], color="gray", lw=0.7, label="lwlr = fan_in")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # plain numbers at 1, 2 and 5 of each decade
            axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            axis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("fan_in multiplier (each column's kinds spread sideways)")
        ax.set_ylabel("lwlr multiplier")
        r = results["models"][model_name]["summary"]["pearson_log"]
        r_matrices = results["models"][model_name]["summary"]["pearson_log_matrices"]
        ax.set_title(f"{model_name}: log correlation {r:.2f} (matrices alone {r_matrices:.2f})", fontsize=10)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt2-mini", "gpt2"])
    parser.add_argument("--T", type=int, default=4)
    parser.add_argument("--data_dir", default="", help="token files to measure on (default data/shakespeare)")
    parser.add_argument("--block_size", type=int, default=256, help="tokens per sequence of a measured batch")
    parser.add_argument(
        "--out_dir", default=os.path.join(LOCAL, "lwlr-vs-fan_in"), help="committed: bench/results/lwlr-vs-fan_in"
    )
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    results = {"T": args.T, "env": environment(device), "models": {}}
    for model_name in args.models:
        tensors = measure(model_name, args.T, device, args.data_dir, args.block_size)
        results["models"][model_name] = {"summary": summary(tensors), "tensors": tensors}
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    text = table(results)
    with open(os.path.join(args.out_dir, "table.md"), "w") as f:
        f.write(text + "\n")
    figure(results, os.path.join(args.out_dir, "figure.png"))
    print(text)
    print(f"wrote {args.out_dir}/results.json, table.md, figure.png")
    return results


if __name__ == "__main__":
    main()
