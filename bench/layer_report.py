"""What each layer's rate did: the figure and the table of one or more runs' layer statistics (layers.jsonl,
training/layer_stats.py), beside their multipliers (lwlr.json) and the block sharpness (bench/sharpness.py).

    python -m bench.layer_report out                                  # out/layers.png and out/layers.md
    python -m bench.layer_report out-single out-lwlr out-fan_in --sharpness out-lwlr/sharpness.json \\
        --figure bench/results/layer-stats/layers.png

Panels, in lwlr.png's colours per layer kind:
  (a) each tensor's update RMS / weight RMS against step, one panel per run, so the rules sit side by side;
  (b) for each --sharpness file: each tensor's lwlr multiplier (the first run whose lwlr.json is lwlr's)
      against its sharpness, log-log, with the correlation of the logs: does lwlr follow sharpness?
  (c) per block type of the Sharpness Disparity paper: lwlr's parameter-weighted mean multiplier beside
      Blockwise LR's (lwlr.BLOCKWISE_LR normalized over the same model), and the block type's sharpness.
The table (layers.md beside the figure) gives per run and kind the median update/weight ratio at the first
and the last record, and the spread over the blocks' matrices (the largest ratio over the smallest).
"""

import argparse
import json
import math
import os
import statistics

from bench.lwlr_vs_fan_in import pearson
from lwlr import BLOCK_TYPES, BLOCKWISE_LR
from model import param_role
from multipliers import KIND_COLORS


def read_run(out_dir: str) -> dict:
    """A run's layer records, its rule and its multipliers (None for lr_rule=single)."""
    path = os.path.join(out_dir, "layers.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} does not exist: train with layer_stats_interval > 0 (the default)")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.endswith("\n")]
    config = {}
    if os.path.exists(os.path.join(out_dir, "config.json")):
        with open(os.path.join(out_dir, "config.json")) as f:
            config = json.load(f)["config"]
    report = None
    if os.path.exists(os.path.join(out_dir, "lwlr.json")):
        with open(os.path.join(out_dir, "lwlr.json")) as f:
            report = json.load(f)
    name, rule = os.path.basename(os.path.normpath(out_dir)), config.get("lr_rule", "?")
    label = f"{config.get('optimizer', '?')} {rule}" + (f" ({name})" if name != rule else "")
    return {"label": label, "rule": config.get("lr_rule"), "records": records, "lwlr": report}


def kind_medians(record: dict) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for name, ratio in zip(record["names"], record["update_to_weight"]):
        groups.setdefault(param_role(name).kind, []).append(ratio)
    return {kind: statistics.median(values) for kind, values in groups.items()}


def matrix_spread(record: dict) -> float:
    """The largest update/weight ratio of the blocks' matrices over the smallest."""
    ratios = [r for n, r in zip(record["names"], record["update_to_weight"]) if param_role(n).is_block_matrix]
    return max(ratios) / min(ratios)


def block_type_means(report: dict) -> dict[str, float]:
    """lwlr.json's parameter-weighted mean multiplier per block type."""
    sums: dict[str, list[float]] = {}
    for layer in report["layers"]:
        kind = BLOCK_TYPES.get(param_role(layer["name"]).layer)
        if kind:
            entry = sums.setdefault(kind, [0.0, 0.0])
            entry[0] += layer["multiplier"] * layer["numel"]
            entry[1] += layer["numel"]
    return {kind: total / count for kind, (total, count) in sums.items()}


def blockwise_means(report: dict) -> dict[str, float]:
    """Blockwise LR's multiplier per block type on lwlr.json's model, normalized as lr_rule=blockwise is."""
    numel = {kind: 0 for kind in BLOCKWISE_LR}
    for layer in report["layers"]:
        numel[BLOCK_TYPES[param_role(layer["name"]).layer]] += layer["numel"]
    mean = sum(BLOCKWISE_LR[k] * n for k, n in numel.items()) / sum(numel.values())
    return {kind: rate / mean for kind, rate in BLOCKWISE_LR.items()}


def against_sharpness(report: dict, sharpness: dict) -> tuple[list[tuple[str, float, float]], float]:
    """(name, sharpness, multiplier) for every tensor both know, and the correlation of their logs; the key
    biases left out (their gradient, so their curvature, is zero by construction: rounding noise)."""
    multipliers = {layer["name"]: layer["multiplier"] for layer in report["layers"]}
    points = [
        (t["name"], t["sharpness"], multipliers[t["name"]])
        for t in sharpness["tensors"]
        if t["name"] in multipliers and t["sharpness"] > 0 and not param_role(t["name"]).gradient_is_zero
    ]
    r = pearson([math.log(s) for _, s, _ in points], [math.log(m) for _, _, m in points])
    return points, r


def table(runs: list[dict], sharpness: list[tuple[str, dict]], lwlr_report: dict | None) -> str:
    kinds = [k for k in KIND_COLORS if any(k in kind_medians(run["records"][0]) for run in runs)]
    lines = [
        "Median update RMS / weight RMS per kind of tensor, at the first and the last record "
        "(`python -m bench.layer_report`); spread: the blocks' matrices' largest ratio over their smallest.",
        "",
        "| run | step | " + " | ".join(kinds) + " | spread |",
        "|---|---:|" + "---:|" * len(kinds) + "---:|",
    ]
    for run in runs:
        for record in (run["records"][0], run["records"][-1]):
            medians = kind_medians(record)
            cells = " | ".join(f"{medians[k]:.2e}" if k in medians else "" for k in kinds)
            lines.append(f"| {run['label']} | {record['step']} | {cells} | {matrix_spread(record):.1f}x |")
    if lwlr_report is not None:
        lwlr_means, paper = block_type_means(lwlr_report), blockwise_means(lwlr_report)
        header = ["block type", "lwlr multiplier (weighted mean)", "blockwise multiplier"]
        header += [f"sharpness ({label})" for label, _ in sharpness]
        lines += ["", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        for kind in BLOCKWISE_LR:
            cells = [f"{lwlr_means.get(kind, float('nan')):.3f}", f"{paper[kind]:.3f}"]
            cells += [f"{s['block_types'][kind]['sharpness']:.3e}" for _, s in sharpness if kind in s["block_types"]]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        for label, s in sharpness:
            points, r = against_sharpness(lwlr_report, s)
            lines.append(
                f"\nlwlr multiplier against sharpness ({label}): log correlation {r:+.2f} over {len(points)} tensors; "
                f"block types least sharp first: {s['order']}"
            )
    return "\n".join(lines) + "\n"


def figure(runs: list[dict], sharpness: list[tuple[str, dict]], lwlr_report: dict | None, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    def plain_numbers(axis) -> None:  # 0.2, 0.5, 1, 2 on a log axis, as lwlr.png labels it
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_minor_formatter(NullFormatter())

    bottom = (len(sharpness) + 1) if lwlr_report is not None else 0
    columns = max(len(runs), bottom, 1)
    rows = 2 if bottom else 1
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns + 1.6, 4.3 * rows), squeeze=False)
    ratios = [r for run in runs for record in run["records"] for r in record["update_to_weight"] if r > 0]
    low, high = min(ratios) / 1.5, max(ratios) * 1.5
    for ax, run in zip(axes[0], runs):  # (a)
        names = run["records"][0]["names"]
        steps = [record["step"] for record in run["records"]]
        for i, name in enumerate(names):
            kind = param_role(name).kind
            ax.plot(steps, [record["update_to_weight"][i] for record in run["records"]], color=KIND_COLORS[kind],
                    lw=0.8, alpha=0.7, label=kind)
        ax.set_yscale("log")
        ax.set_ylim(low, high)
        ax.axhline(1e-3, color="gray", lw=0.6, ls="--")
        ax.set_xlabel("step")
        ax.set_ylabel("update RMS / weight RMS")
        ax.set_title(f"(a) {run['label']}", loc="left", fontsize=10)
    handles = {}
    for ax in axes[0][: len(runs)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    axes[0][len(runs) - 1].legend(handles.values(), handles.keys(), fontsize=8, loc="upper left",
                                  bbox_to_anchor=(1.01, 1.0), frameon=False)
    for ax in axes[0][len(runs):]:
        ax.axis("off")
    if bottom:
        for ax, (label, s) in zip(axes[1], sharpness):  # (b)
            points, r = against_sharpness(lwlr_report, s)
            for kind, color in KIND_COLORS.items():
                chosen = [(x, y) for name, x, y in points if param_role(name).kind == kind]
                if chosen:
                    ax.scatter(*zip(*chosen), s=16, color=color, label=kind)
            ax.set_xscale("log")
            ax.set_yscale("log")
            plain_numbers(ax.yaxis)
            ax.set_xlabel("sharpness (mean Gauss-Newton diagonal); colours as in (a)")
            ax.set_ylabel("lwlr multiplier")
            ax.set_title(f"(b) lwlr against sharpness, {label}: log r = {r:+.2f}", loc="left", fontsize=10)
        ax = axes[1][len(sharpness)]  # (c)
        kinds = list(BLOCKWISE_LR)
        lwlr_means, paper = block_type_means(lwlr_report), blockwise_means(lwlr_report)
        xs = range(len(kinds))
        ax.bar([x - 0.2 for x in xs], [lwlr_means.get(k, 0) for k in kinds], width=0.4, label="lwlr (weighted mean)")
        ax.bar([x + 0.2 for x in xs], [paper[k] for k in kinds], width=0.4, label="blockwise")
        ax.set_xticks(list(xs), kinds)
        ax.set_yscale("log")
        plain_numbers(ax.yaxis)
        ax.set_ylabel("lr multiplier")
        ax.set_title("(c) per block type: lwlr beside Blockwise LR", loc="left", fontsize=10)
        ax.legend(fontsize=8, frameon=False)
        for ax in axes[1][len(sharpness) + 1 :]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="out_dirs holding layers.jsonl")
    parser.add_argument("--sharpness", nargs="*", default=[], help="sharpness.json files (bench/sharpness.py)")
    parser.add_argument("--figure", help="the PNG to write (default: the first run's layers.png)")
    args = parser.parse_args(argv)
    runs = [read_run(out_dir) for out_dir in args.runs]
    sharpness = []
    for path in args.sharpness:
        with open(path) as f:
            data = json.load(f)
        sharpness.append((data["label"], data))
    lwlr_report = next((run["lwlr"] for run in runs if run["rule"] == "lwlr" and run["lwlr"]), None)
    path = args.figure or os.path.join(args.runs[0], "layers.png")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure(runs, sharpness, lwlr_report, path)
    text = table(runs, sharpness, lwlr_report)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {path} and {os.path.splitext(path)[0]}.md")
    return text


if __name__ == "__main__":
    main()
