"""The tables and plots of bench/overfit.py's results: table.md (rows optimizer x rule, columns lr; in
held-out mode each rule at its own best rate against `single`, with the seed noise), depth.md (the
depth study), final_loss_vs_lr.png and best_curves.png. overfit.py writes them after a sweep; this
redraws them from the results.json files alone, without training:

    python -m bench.overfit_report bench/results/overfit-heldout-cpu     # table.md and the plots
    python -m bench.overfit_report bench/results/overfit-depth-cpu       # L*/ each, and depth.md
"""

import json
import math
import os
import sys


def rows_of(results: dict) -> dict[tuple, list[dict]]:
    """(optimizer, rule, residual_scale) -> runs sorted by lr, mean over seeds where several."""
    rows: dict[tuple, list[dict]] = {}
    for run in results["runs"].values():
        rows.setdefault((run["optimizer"], run["rule"], run["residual_scale"]), []).append(run)
    sweep = results["sweep"]

    def order(key):  # the sweep's own order: optimizers, then rules (single first), then residual scaling
        optimizer, rule, residual_scale = key
        rank = lambda items, item: items.index(item) if item in items else len(items)  # noqa: E731
        return rank(sweep["optimizers"], optimizer), optimizer, rank(sweep["rules"], rule), rule, residual_scale

    return {key: sorted(rows[key], key=lambda r: (r["lr"], r["seed"])) for key in sorted(rows, key=order)}


def row_label(optimizer, rule, residual_scale) -> str:
    return f"{optimizer} {rule}" + (" + residual 1/sqrt(L)" if residual_scale else "")


def seed_statistics(runs) -> tuple[float, float, int] | None:
    """Mean, sample std and count of the final losses of one point's seeds; None if any seed diverged."""
    if not runs or any(r["diverged"] for r in runs):
        return None
    values = [r["final_loss"] for r in runs]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std, len(values)


def best_rates(results: dict) -> dict[tuple, tuple]:
    """(optimizer, rule, residual_scale) -> (lr, (mean, std, n)) at the lr with the lowest mean over seeds."""
    best = {}
    for key, runs in rows_of(results).items():
        points = {lr: seed_statistics([r for r in runs if r["lr"] == lr]) for lr in sorted({r["lr"] for r in runs})}
        finished = [(stats[0], lr, stats) for lr, stats in points.items() if stats]
        if finished:
            _, lr, stats = min(finished)
            best[key] = (lr, stats)
    return best


def rule_summary(results: dict) -> list[str]:
    """Each rule at its own best rate against `single`; a difference counts where it exceeds twice its
    standard error, sqrt(s_a^2 / n_a + s_b^2 / n_b), the seed noise."""
    best, costs = best_rates(results), results.get("measurement_seconds", {})
    lines = [
        "| optimizer | rule | best lr | val loss, mean +- std (seeds) | vs single | beyond seed noise? | measuring, s "
        "|",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for (optimizer, rule, rs), (lr, (mean, std, n)) in best.items():
        reference = best.get((optimizer, "single", rs))
        if rule == "single" or reference is None:
            difference, verdict = "", ""
        else:
            _, (ref_mean, ref_std, ref_n) = reference
            delta, noise = mean - ref_mean, math.sqrt(std**2 / n + ref_std**2 / ref_n)
            difference = f"{delta:+.4f}"
            if min(n, ref_n) < 2:  # one seed gives no estimate of the noise
                verdict = "one seed: unknown"
            else:
                verdict = ("yes, better" if delta < 0 else "yes, worse") if abs(delta) > 2 * noise else "no"
        cost = f"{costs[rule]:.1f}" if rule in costs else ""
        lines.append(
            f"| {optimizer} | {row_label(optimizer, rule, rs).split(' ', 1)[1]} | {lr:.3g} | {mean:.4f} +- {std:.4f} "
            f"({n}) |"
            f" {difference} | {verdict} | {cost} |"
        )
    return lines


def first_step_at(curve: list[list[float]], target: float) -> float | None:
    """The step at which a val curve ([[step, loss], ...]) first reaches target, linear between evals;
    None if it never does."""
    for i, (step, loss) in enumerate(curve):
        if loss <= target:
            if i == 0:
                return float(step)
            previous_step, previous_loss = curve[i - 1]
            return previous_step + (previous_loss - target) / (previous_loss - loss) * (step - previous_step)
    return None


def steps_to_target(results: dict) -> list[str]:
    """The GPT-2 speedrun's optimization measure (modded-nanogpt ranks optimizers by the steps a fixed
    model needs to first reach a target val loss): for each optimizer and rule at its own best rate, the
    steps each seed needs to reach the val loss every seed of AdamW single at its best rate reaches by
    the end (its worst seed's final loss), between evals by linear interpolation, and the speed-up
    against the same optimizer's single."""
    best, rows = best_rates(results), rows_of(results)
    if ("adamw", "single", False) not in best:
        return []
    baseline_lr = best[("adamw", "single", False)][0]
    target = max(r["final_loss"] for r in rows[("adamw", "single", False)] if r["lr"] == baseline_lr)
    sweep = results["sweep"]
    lines = [
        f"## Steps to val loss {target:.4f}",
        "",
        f"The target is the final val loss of AdamW single's worst seed at its best rate ({baseline_lr:.3g}), so "
        f"every seed of that baseline reaches it within {sweep['steps']} steps; each row at its own best rate "
        f"(above), evals every {sweep['eval_every']} steps, linear between them.",
        "",
        "| optimizer | rule | best lr | seeds reaching it | steps, mean +- std | speed-up vs single |",
        "|---|---|---:|---:|---:|---:|",
    ]
    means = {}
    for (optimizer, rule, rs), (lr, _) in best.items():
        steps = [first_step_at(r["val_curve"], target) for r in rows[(optimizer, rule, rs)] if r["lr"] == lr]
        reached = [s for s in steps if s is not None]
        if len(reached) == len(steps):
            mean = sum(reached) / len(reached)
            std = math.sqrt(sum((s - mean) ** 2 for s in reached) / (len(reached) - 1)) if len(reached) > 1 else 0.0
            means[(optimizer, rule, rs)] = mean
            cell = f"{mean:.0f} +- {std:.0f}"
        else:
            cell = f"not every seed ({len(reached)} of {len(steps)})"
        single = means.get((optimizer, "single", rs))
        speedup = f"{single / means[(optimizer, rule, rs)]:.2f}x" if single and (optimizer, rule, rs) in means else ""
        label = row_label(optimizer, rule, rs).split(" ", 1)[1]
        lines.append(
            f"| {optimizer} | {label} | {lr:.3g} | {len(reached)} of {len(steps)} | {cell} | "
            f"{'' if rule == 'single' else speedup} |"
        )
    return lines + [""]


# The paper's GPT-2 124M overfit table as the reviewers quoted it: lowest train loss, one global rate
# against layer-wise rates. Its subset, batch and step count are unpublished.
PAPER_GPT2_OVERFIT = {
    "adamw": (1.430, 0.560),
    "adam_mini": (1.903, 0.838),
    "lion": (0.704, 0.179),
    "sophiag": (0.989, 0.538),
}


def paper_comparison(results: dict) -> list[str]:
    """Our lowest final train loss per optimizer x rule beside the paper's (gpt2 overfit sweeps only)."""
    best = best_rates(results)
    lines = [
        "## Beside the paper's table (GPT-2 124M, lowest train loss)",
        "",
        "| optimizer | single, ours | lwlr, ours | single, paper | lwlr, paper | ours: lwlr / single | paper: lwlr / "
        "single |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for optimizer, (paper_single, paper_lwlr) in PAPER_GPT2_OVERFIT.items():
        ours = [best.get((optimizer, rule, False)) for rule in ("single", "lwlr")]
        cells = [f"{point[1][0]:.3f} (lr {point[0]:.3g})" if point else "" for point in ours]
        ratio = f"{ours[1][1][0] / ours[0][1][0]:.2f}" if all(ours) else ""
        lines.append(
            f"| {optimizer} | {cells[0]} | {cells[1]} | {paper_single:.3f} | {paper_lwlr:.3f} | {ratio} | "
            f"{paper_lwlr / paper_single:.2f} |"
        )
    return lines + [""]


def write_table(results: dict, path: str) -> str:
    """table.md of one sweep's results at path; its text."""
    sweep = results["sweep"]
    if sweep.get("heldout"):
        lines = [
            f"Val loss after {sweep['steps']} steps of {sweep['micro_batch_size']} x {sweep['block_size']} tokens "
            f"from scratch, cosine "
            f"to lr / 10 ({sweep['model']}, {sweep['dataset'] or sweep['data_dir']}), mean over seeds "
            f"{sweep['seeds']}; best of each "
            "row in bold, `div` = a seed diverged.",
            "",
            "## Each rule at its own best rate",
            "",
            *rule_summary(results),
            "",
            *steps_to_target(results),
            "## Every point",
            "",
        ]
    else:
        lines = [
            f"Final train loss on {sweep['subset_batches']} fixed batches of {sweep['micro_batch_size']} x "
            f"{sweep['block_size']} "
            f"tokens after {sweep['steps']} steps at a constant lr ({sweep['model']}); best of each row in bold, "
            "`div` = diverged.",
            "",
        ]
    rows, best_by_row = rows_of(results), best_rates(results)  # a point's value is its mean over seeds
    for optimizer in dict.fromkeys(key[0] for key in rows):
        lrs = sorted({r["lr"] for r in results["runs"].values() if r["optimizer"] == optimizer})
        lines += [
            f"| {optimizer} | " + " | ".join(f"lr {lr:.3g}" for lr in lrs) + " | best |",
            "|---" * (len(lrs) + 2) + "|",
        ]
        for (opt, rule, rs), runs in rows.items():
            if opt != optimizer:
                continue
            best_lr, best_stats = best_by_row.get((opt, rule, rs), (None, None))
            cells = []
            for lr in lrs:
                stats = seed_statistics([r for r in runs if r["lr"] == lr])
                if not any(r["lr"] == lr for r in runs):
                    cells.append("")
                elif stats is None:
                    cells.append("div")
                else:
                    cells.append(f"**{stats[0]:.3f}**" if lr == best_lr else f"{stats[0]:.3f}")
            best_cell = f"{best_stats[0]:.3f}" if best_stats else "all diverged"
            lines.append(f"| {row_label(opt, rule, rs)} | " + " | ".join(cells) + f" | {best_cell} |")
        lines.append("")
    if sweep["model"] == "gpt2" and not sweep.get("heldout"):
        lines += paper_comparison(results)
    return _write(path, "\n".join(lines))


def write_depth_table(by_depth: dict[int, dict], path: str) -> str:
    """Per optimizer and residual scaling: single and lwlr at each depth's best rate (mean over seeds),
    as the final train loss (the paper's measure: the train curve's last point) and the val loss, and
    lwlr's gain (single minus lwlr; positive = lwlr better)."""
    depths = sorted(by_depth)
    lines = [
        "Depth study: best-rate loss per depth (64-wide models); gain = single - lwlr, positive where lwlr is better.",
        "",
    ]
    first = by_depth[depths[0]]["sweep"]
    for optimizer in first["optimizers"]:
        for rs in first["residual_scales"]:
            lines += [
                f"| {row_label(optimizer, 'rule', rs).replace(' rule', '')} | "
                + " | ".join(f"L={d}" for d in depths)
                + " |",
                "|---" * (len(depths) + 1) + "|",
            ]
            cells = {}
            for measure in ("train", "val"):
                for rule in first["rules"]:
                    row = []
                    for d in depths:
                        best = best_rates(by_depth[d]).get((optimizer, rule, rs))
                        runs = [
                            r
                            for r in by_depth[d]["runs"].values()
                            if best
                            and (r["optimizer"], r["rule"], r["residual_scale"], r["lr"])
                            == (optimizer, rule, rs, best[0])
                        ]
                        value = (
                            None
                            if not runs
                            else (best[1][0] if measure == "val" else sum(r["curve"][-1][1] for r in runs) / len(runs))
                        )
                        row.append(value)
                    cells[(measure, rule)] = row
                    lines.append(
                        f"| {measure} loss, {rule} | "
                        + " | ".join("div" if v is None else f"{v:.3f}" for v in row)
                        + " |"
                    )
                if ("single" in first["rules"]) and ("lwlr" in first["rules"]):
                    gains = [
                        None if a is None or b is None else a - b
                        for a, b in zip(cells[(measure, "single")], cells[(measure, "lwlr")])
                    ]
                    lines.append(
                        f"| {measure} gain of lwlr | "
                        + " | ".join("" if g is None else f"{g:+.3f}" for g in gains)
                        + " |"
                    )
            lines.append("")
    return _write(path, "\n".join(lines))


def _write(path: str, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return text


LINE_STYLES = ["-", "--", ":", "-."]


def line_style(rows: dict, optimizer: str, rule: str, residual_scale: bool) -> dict:
    """One look per row across both figures: a colour per optimizer, a line style per rule, a hollow
    marker for 1/sqrt(depth) residual scaling."""
    optimizers = list(dict.fromkeys(key[0] for key in rows))
    rules = list(dict.fromkeys(key[1] for key in rows))
    return {
        "color": f"C{optimizers.index(optimizer) % 10}",
        "linestyle": LINE_STYLES[rules.index(rule) % len(LINE_STYLES)],
        "marker": "s" if residual_scale else "o",
        "markerfacecolor": "none" if residual_scale else None,
    }


def plain_log_ticks(ax) -> None:
    """A log y axis labelled in plain numbers at 1, 2 and 5 of each decade (and 1.5, 3 within a decade)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    low, high = ax.get_ylim()
    subs = (1.0, 2.0, 5.0) if high / low > 3 else (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def plot(results: dict, out_dir: str) -> dict:
    """final_loss_vs_lr.png (a panel per optimizer, in rows of three) and best_curves.png in out_dir; what
    each draws, by line label: (lr, mean final loss) points, and the best run's (step, loss) curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows_of(results)
    drawn = {"final_loss_vs_lr": {}, "best_curves": {}}
    optimizers, rules = list(dict.fromkeys(key[0] for key in rows)), list(dict.fromkeys(key[1] for key in rows))
    columns = min(3, len(optimizers))
    grid = (len(optimizers) + columns - 1) // columns
    fig, axes = plt.subplots(grid, columns, figsize=(5.2 * columns, 4 * grid), squeeze=False)
    for ax in axes.flat[len(optimizers) :]:
        ax.set_visible(False)
    for ax, optimizer in zip(axes.flat, optimizers):
        for (opt, rule, rs), runs in rows.items():
            if opt != optimizer:
                continue
            by_lr = {lr: seed_statistics([r for r in runs if r["lr"] == lr]) for lr in sorted({r["lr"] for r in runs})}
            points = [(lr, stats[0], stats[1]) for lr, stats in by_lr.items() if stats]
            drawn["final_loss_vs_lr"][row_label(opt, rule, rs)] = [(lr, mean) for lr, mean, _ in points]
            # one optimizer a panel: its rules told apart by colour too
            style = {**line_style(rows, opt, rule, rs), "color": f"C{rules.index(rule) % 10}"}
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], label=row_label(opt, rule, rs), **style)
            if points and max(p[2] for p in points) > 0:  # several seeds: a band of +- one std
                ax.fill_between(
                    [p[0] for p in points],
                    [p[1] - p[2] for p in points],
                    [p[1] + p[2] for p in points],
                    color=style["color"],
                    alpha=0.15,
                )
            for r in runs:
                if r["diverged"]:
                    ax.scatter([r["lr"]], [ax.get_ylim()[1] if points else 1.0], marker="x", color=style["color"])
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final val loss (mean over seeds)" if results["sweep"].get("heldout") else "final train loss")
        ax.set_title(f"{optimizer} ({results['sweep']['model']}); x = diverged", fontsize=10)
        ax.grid(True, which="major", color="0.9")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "final_loss_vs_lr.png"), dpi=110)
    plt.close(fig)
    heldout, best_by_row = results["sweep"].get("heldout"), best_rates(results)
    fig, ax = plt.subplots(figsize=(10, 5))
    for key, runs in rows.items():  # the curve of each row's best rate, its first seed
        best_lr = best_by_row.get(key, (None,))[0]
        best = next((r for r in runs if r["lr"] == best_lr), None)
        if best:
            curve = best["val_curve"] if heldout else best["curve"]
            drawn["best_curves"][row_label(*key)] = [tuple(point) for point in curve]
            style = line_style(rows, *key)
            if len(curve) > 12:  # markers only where they are the points themselves
                style["marker"] = None
            ax.plot(*zip(*curve), label=f"{row_label(*key)}, lr {best['lr']:.3g}", **style)
    plain_log_ticks(ax)
    ax.grid(True, which="major", color="0.9")
    ax.set_xlabel("step")
    ax.set_ylabel("val loss" if heldout else "train loss")
    ax.set_title("best run of each row: colour the optimizer, line the rule", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "best_curves.png"), dpi=110)
    plt.close(fig)
    return drawn


def write_all(results: dict, out_dir: str) -> str:
    """table.md and both plots of one sweep's results in out_dir; the table's text."""
    text = write_table(results, os.path.join(out_dir, "table.md"))
    plot(results, out_dir)
    return text


def main(out_dir: str) -> None:
    def load(folder):
        with open(os.path.join(folder, "results.json")) as f:
            return json.load(f)

    depths = sorted(int(name[1:]) for name in os.listdir(out_dir) if name[:1] == "L" and name[1:].isdigit())
    if not depths:
        print(write_all(load(out_dir), out_dir))
        return
    by_depth = {depth: load(os.path.join(out_dir, f"L{depth}")) for depth in depths}
    for depth, results in by_depth.items():
        write_all(results, os.path.join(out_dir, f"L{depth}"))
    print(write_depth_table(by_depth, os.path.join(out_dir, "depth.md")))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench.overfit_report RESULTS_FOLDER")
    main(sys.argv[1])
