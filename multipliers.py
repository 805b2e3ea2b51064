"""Where a training run's learning-rate multipliers come from, and what is written about them.

    python multipliers.py [config/FILE.py] [--key=value ...]   # measure with a training config: lwlr.json, lwlr.png
    python multipliers.py --compare a.json b.json              # max and mean deviation in percent (the paper's Table 3)
    python multipliers.py --plot out/lwlr.json                 # redraw out/lwlr.png from its lwlr.json

for_config(c, model) gives what a TrainConfig asks for: none for lr_rule=single; a baseline rule
(lwlr.baseline_multipliers); an lwlr.json named by lwlr_file, checked against the model; or lwlr's
Algorithm 1 (lwlr.compute_multipliers), measured once per set of settings and then reused from a cache.
lr_rule=lwlr_matrices takes lwlr's multipliers the same way (file, cache or measurement) and keeps them
for the blocks' weight matrices only (lwlr.lwlr_matrices_multipliers).
The lwlr.json report holds, per layer, its name, shape, size, mean |gradient| and multiplier; the plot
shows the multipliers in model order (the paper's Figures 4 and 5).
"""

import dataclasses
import hashlib
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

from data.loader import BatchSplit
from data.tokenfile import fingerprint
from lwlr import (
    baseline_multipliers,
    lwlr_matrices_multipliers,
    measure_grad_mean_abs,
    multipliers_from_grads,
    numels_of,
)
from model import GPT, param_role
from runtime.device import autocast
from runtime.errors import UserError
from runtime.exits import run_main
from runtime.files import DiskFullError, cache_dir, write_atomically
from runtime.progress import Progress, counted, first_beating
from runtime.ranks import init_runtime
from training import hf, outdir
from training.build import gpt_config, token_batches
from training.config import INIT_MODES, MEASURED_RULES, ConfigError, parse_config

FLOAT32 = torch.finfo(torch.float32)


class LwlrFileError(UserError):
    """An lwlr.json (lwlr_file, or one given to --compare) that cannot serve this model."""


def load_multipliers(path: str, model: torch.nn.Module) -> tuple[dict[str, float], dict]:
    """Multipliers from an lwlr.json, checked against the model's layers, and the file's whole report."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
        layers = data["layers"]
        multipliers = {layer["name"]: float(layer["multiplier"]) for layer in layers}
        shapes = {layer["name"]: tuple(layer["shape"]) for layer in layers}
    except (OSError, ValueError, KeyError, TypeError) as e:  # ValueError: JSON syntax, undecodable bytes
        raise LwlrFileError(f"lwlr_file {path}: not a readable lwlr.json ({type(e).__name__}: {e})") from None
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    extra, missing = sorted(set(multipliers) - set(params)), sorted(set(params) - set(multipliers))
    if extra:
        raise LwlrFileError(f"lwlr_file {path}: layer(s) {', '.join(extra)} are not in the model")
    if missing:
        raise LwlrFileError(f"lwlr_file {path}: no multiplier for the model's layer(s) {', '.join(missing)}")
    # Same names, other sizes (another n_embd or vocabulary): multipliers measured on a different model.
    wrong = [
        f"{name} {list(shapes[name])} (model {list(p.shape)})"
        for name, p in params.items()
        if shapes[name] != tuple(p.shape)
    ]
    if wrong:
        raise LwlrFileError(
            f"lwlr_file {path} was measured on another model: shapes differ for {', '.join(wrong[:3])}"
            + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else "")
        )
    # The optimizers hold each multiplier in float32: one that is no positive normal number there is no rate.
    bad = [name for name, m in multipliers.items() if not (math.isfinite(m) and FLOAT32.tiny <= m <= FLOAT32.max)]
    if bad:
        raise LwlrFileError(
            f"lwlr_file {path}: multipliers of {', '.join(bad[:5])} are not positive finite float32 numbers "
            f"({FLOAT32.tiny:.3g} to {FLOAT32.max:.3g})"
        )
    return multipliers, data


def report(module, multipliers: dict[str, float], grad_mean_abs: dict[str, float] | None, **meta) -> dict:
    """The content of lwlr.json: per layer name, shape, numel, mean |g| and multiplier, plus how it was made."""
    params = dict(module.named_parameters())
    layers = [
        {
            "name": name,
            "shape": list(params[name].shape),
            "numel": params[name].numel(),
            "grad_mean_abs": grad_mean_abs[name] if grad_mean_abs else None,
            "multiplier": m,
        }
        for name, m in multipliers.items()
    ]
    return {**meta, "layers": layers}


def save_report(data: dict, out_dir: str) -> None:
    """lwlr.json and lwlr.png, each whole or not at all (runtime.files.write_atomically). They hold what was
    measured, not how long it took (a report's "seconds"): the same settings write the same bytes."""
    data = {key: value for key, value in data.items() if key != "seconds"}
    write_atomically(os.path.join(out_dir, "lwlr.json"), lambda f: json.dump(data, f, indent=1))
    write_atomically(os.path.join(out_dir, "lwlr.png"), lambda f: plot(data, f), mode="wb")


KIND_COLORS = {  # one per model.ParamRole.kind, in every plot of layers
    "q": "tab:blue",
    "k": "tab:cyan",
    "v": "tab:green",
    "attn_out": "tab:olive",
    "mlp_in": "tab:orange",
    "mlp_out": "tab:red",
    "embedding": "tab:purple",
    "position": "tab:pink",
    "bias": "tab:gray",
    "layernorm": "black",
    "other": "tab:brown",
}


def plot(data: dict, path: str) -> dict:
    """Multipliers in model order on a log axis: all layers, and the blocks' weight matrices alone (the
    paper's Figures 4 and 5), each block's span shaded in turn and numbered, the legend beside the data.
    Returns what each panel draws: {panel: {kind: [(position, multiplier)]}}."""
    import matplotlib  # here, not at the top: pyplot takes 1.3 s to import, and only a plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    layers = data["layers"]
    matrices = [layer for layer in layers if param_role(layer["name"]).is_block_matrix]
    drawn = {}
    fig, axes = plt.subplots(2, 1, figsize=(11, 7.5))
    for ax, subset, title in ((axes[0], layers, "every tensor"), (axes[1], matrices, "the blocks' weight matrices")):
        blocks = [param_role(layer["name"]).block for layer in subset]
        for block in sorted({b for b in blocks if b is not None}):  # each block's span, shaded every other one
            span = [i for i, b in enumerate(blocks) if b == block]
            if block % 2 == 0:
                ax.axvspan(span[0] - 0.5, span[-1] + 0.5, color="0.93", zorder=0)
            every = max(1, len(set(blocks)) // 12)  # at most about a dozen numbers along the top
            if block % every == 0:
                ax.text(
                    (span[0] + span[-1]) / 2,
                    0.985,
                    str(block),
                    transform=ax.get_xaxis_transform(),
                    ha="center",
                    va="top",
                    fontsize=8,
                    color="0.35",
                )
        drawn[title] = {}
        kinds = [param_role(layer["name"]).kind for layer in subset]
        for kind, color in KIND_COLORS.items():
            points = [(i, layer["multiplier"]) for i, layer in enumerate(subset) if kinds[i] == kind]
            if points:
                ax.scatter(*zip(*points), s=16, color=color, label=kind, zorder=2)
                drawn[title][kind] = points
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.axhline(1.0, color="gray", lw=0.6, zorder=1)
        ax.set_xlim(-1, len(subset))
        ax.set_xlabel("tensor, in model order (shaded and numbered: the transformer blocks)")
        ax.set_ylabel("lr multiplier")
        ax.set_title(f"{title}", loc="left", fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle(
        f"{data.get('model', '')} {data.get('rule', 'lwlr')} multipliers (init {data.get('init')}, T={data.get('T')}, "
        f"power {data.get('power')})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")  # path may be an open file
    plt.close(fig)
    return drawn


def compare(path_a: str, path_b: str) -> tuple[float, float]:
    """Max and mean |m_a - m_b| / m_b in percent over the layers both files share."""
    a, b = ({layer["name"]: layer["multiplier"] for layer in json.load(open(p))["layers"]} for p in (path_a, path_b))
    if set(a) != set(b):
        raise LwlrFileError(f"{path_a} and {path_b} cover different layers")
    deviations = [100 * abs(a[n] - b[n]) / b[n] for n in b]
    return max(deviations), sum(deviations) / len(deviations)


def for_config(c, model, batches, ctx=None, log=print, forward=None) -> tuple[dict[str, float] | None, dict | None]:
    """The multipliers a TrainConfig asks for (None for lr_rule=single) and the report to save; lwlr and
    lwlr_matrices measure on `batches` (training.build.token_batches of the "lwlr" stream), through
    `forward` where given (the run's compiled model: lwlr.measure_grad_mean_abs)."""
    if c.lr_rule == "single":
        return None, None
    meta = {"rule": c.lr_rule, "model": c.model, "dataset": c.data_dir or c.dataset, "seed": c.seed}
    if c.lr_rule not in MEASURED_RULES:
        multipliers = baseline_multipliers(model, c.lr_rule)
        return multipliers, report(model, multipliers, None, **meta)
    measured, data = lwlr_for_config(c, model, batches, ctx, log, forward)
    if c.lr_rule == "lwlr":
        return measured, data
    multipliers = lwlr_matrices_multipliers(model, measured)
    grads = {layer["name"]: layer["grad_mean_abs"] for layer in data["layers"]}
    how_measured = {key: value for key, value in data.items() if key != "layers"}  # T, init, power, source ...
    return multipliers, report(model, multipliers, None if None in grads.values() else grads, **how_measured | meta)


def lwlr_for_config(c, model, batches, ctx=None, log=print, forward=None) -> tuple[dict[str, float], dict]:
    """lwlr's multipliers for a TrainConfig and their report: read from lwlr_file, reused from the cache, or
    measured (and cached)."""
    meta = {"rule": "lwlr", "model": c.model, "dataset": c.data_dir or c.dataset, "seed": c.seed}
    if c.lwlr_file:
        multipliers, _ = load_multipliers(c.lwlr_file, model)
        return multipliers, report(model, multipliers, None, **meta, source=c.lwlr_file)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    cache_path = measurement_cache_path(c, model, batches.path, ctx, compiled=forward is not None)
    cached = _cached_report(cache_path, model, rank)
    if cached is not None:
        log(
            f"lwlr: reusing the multipliers measured with these settings ({cache_path}); --lwlr_cache_dir=none "
            f"measures again"
        )
        return {layer["name"]: layer["multiplier"] for layer in cached["layers"]}, {**cached, "source": cache_path}
    device = next(model.parameters()).device
    whole = BatchSplit(c.micro_batch_size)  # each of the T batches whole, on the rank it falls to
    mine = (batches.get(t, whole, device) for t in range(rank, c.lwlr_T, world))
    graph = " through the run's compiled model (compiling at the first batch)" if forward is not None else ""
    log(f"lwlr: measuring each layer's mean |gradient| at init ({c.lwlr_init}) over T={c.lwlr_T} batches{graph} ...")
    start = time.perf_counter()
    with Progress("lwlr", len(range(rank, c.lwlr_T, world)), "batches", enabled=rank == 0) as progress:
        batches_in = counted(mine, progress)
        if forward is not None:  # the first batch compiles the run's model: minutes a count cannot show
            batches_in = first_beating(batches_in, "lwlr: compiling at the first batch", enabled=rank == 0)
        grads = measure_grad_mean_abs(model, batches_in, c.lwlr_T, c.lwlr_init, ctx, forward)
    seconds = {"measurement": time.perf_counter() - start}
    # The first batch compiled the model the steps run: the run's compile, not lwlr's. A rank that got no
    # batch (T below the world size) compiled nothing here: its first step does.
    if forward is not None and progress.first_seconds is not None:
        seconds["compile"] = progress.first_seconds
    multipliers = multipliers_from_grads(grads, numels_of(model), c.lwlr_power)
    compiled = f", {seconds['compile']:.1f} s of it the first, which compiled the model" if "compile" in seconds else ""
    log(
        f"lwlr: measured {len(grads)} layers over T={c.lwlr_T} batches of {c.micro_batch_size} in "
        f"{seconds['measurement']:.1f} s{compiled}"
    )
    meta.update(
        T=c.lwlr_T,
        init=c.lwlr_init,
        power=c.lwlr_power,
        micro_batch_size=c.micro_batch_size,
        block_size=model.config.block_size,
        world_size=world,
    )
    if forward is not None:
        meta["compiled"] = True  # through the run's compiled graph
    data = report(model, multipliers, grads, **meta)
    if cache_path and rank == 0:
        _write_atomically(cache_path, data)
    return multipliers, {**data, "seconds": seconds}  # how long it took, for the run's summary (never saved)


def for_run(c, rt, model, forward=None) -> tuple[dict[str, float] | None, float | None]:
    """A fresh run's multipliers, in an out_dir it holds: measured (or computed, or read) as for_config
    says, through `forward` where given (the run's compiled model), with lwlr.json and lwlr.png written
    beside the run. Also, where the measurement ran `forward` and so compiled it, the seconds that took
    (its first batch), else None."""
    batches = token_batches(c, "train", "lwlr", model.config)
    multipliers, report = for_config(c, model, batches, autocast(rt.device, c.dtype), rt.print0, forward)
    if rt.is_main and report is not None:
        save_report(report, c.out_dir)
    return multipliers, (report or {}).get("seconds", {}).get("compile")


def check_source(c, model) -> None:
    """Refuse, before a run touches out_dir, an lwlr_file that cannot serve its model (read again, once
    out_dir is held, by for_run)."""
    if c.lr_rule in MEASURED_RULES and c.lwlr_file:
        load_multipliers(c.lwlr_file, model)


CACHE_VERSION = 1  # bump when the measurement changes what it computes


def measurement_cache_path(c, model, data_path: str, ctx, compiled: bool = False) -> str | None:
    """Where multipliers measured with exactly these settings are kept: the model (its config, so its
    shapes and init), the data (its tokens' fingerprint, so token files written again with the same
    tokens keep their measurement; path, size and modification time for a file without one), seed, T,
    init, power, batch size, precision and whether it ran compiled. None when lwlr_cache_dir=none. The measurement is
    deterministic given these."""
    if c.lwlr_cache_dir == "none":
        return None
    directory = cache_dir() if c.lwlr_cache_dir == "auto" else c.lwlr_cache_dir
    stat = os.stat(data_path)
    tokens = fingerprint(data_path)
    precision = str(ctx.fast_dtype) if isinstance(ctx, torch.autocast) else "torch.float32"
    settings = {
        "version": CACHE_VERSION,
        "model": dataclasses.asdict(model.config),
        "data": [tokens, stat.st_size] if tokens else [os.path.realpath(data_path), stat.st_size, stat.st_mtime_ns],
        "seed": c.seed,
        "T": c.lwlr_T,
        "init": c.lwlr_init,
        "power": c.lwlr_power,
        "micro_batch_size": c.micro_batch_size,
        "precision": precision,
    }
    if compiled:  # a compiled graph rounds otherwise; the eager measurements keep their keys
        settings["compiled"] = True
    if c.init_from not in INIT_MODES:  # fine-tuning: the measured network depends on the loaded weights
        weights = hf.weights_file(c.init_from)
        settings["init_from"] = [os.path.realpath(weights), os.path.getsize(weights), os.stat(weights).st_mtime_ns]
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(os.path.expanduser(directory), f"{c.model}-{key}.json")


def _cached_report(path: str | None, model, rank: int) -> dict | None:
    """The cached lwlr.json at path, as rank 0 finds it (every rank takes rank 0's answer, so all measure
    or none do); an unreadable or mismatched file is ignored and measured over."""
    data = None
    if path and rank == 0 and os.path.isfile(path):
        try:
            _, data = load_multipliers(path, model)  # names, shapes, positive finite values
        except LwlrFileError:  # unreadable, malformed or another model's: measured over
            pass
    if dist.is_initialized():
        shared = [data]
        dist.broadcast_object_list(shared, src=0)
        data = shared[0]
    return data


def _write_atomically(path: str, data: dict) -> None:
    """Best effort: a cache that cannot be written costs a measurement next time, never the run."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomically(path, lambda f: json.dump(data, f, indent=1))
    except (OSError, DiskFullError):
        pass


def print_table(data: dict) -> None:
    print(f"{'layer':44} {'shape':>14} {'mean |g|':>11} {'multiplier':>10}")
    for layer in data["layers"]:
        g = f"{layer['grad_mean_abs']:.3e}" if layer["grad_mean_abs"] is not None else "-"
        print(f"{layer['name']:44} {str(tuple(layer['shape'])):>14} {g:>11} {layer['multiplier']:10.3f}")
    values = [layer["multiplier"] for layer in data["layers"]]
    print(f"{len(values)} layers; multipliers from {min(values):.3f} to {max(values):.3f}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--plot"]:
        if len(argv) != 2:
            raise ConfigError("usage: python multipliers.py --plot OUT/lwlr.json   # redraws OUT/lwlr.png from it")
        with open(argv[1]) as f:
            data = json.load(f)
        figure = os.path.join(os.path.dirname(argv[1]), "lwlr.png")
        write_atomically(figure, lambda f: plot(data, f), mode="wb")
        print(f"wrote {figure}")
        return 0
    if argv[:1] == ["--compare"]:
        if len(argv) != 3:
            raise ConfigError("usage: python multipliers.py --compare a.json b.json")
        worst, mean = compare(argv[1], argv[2])
        print(f"deviation of {argv[1]} from {argv[2]}: max {worst:.2f}%, mean {mean:.2f}%")
        return 0
    c = parse_config(argv)
    if c.lr_rule == "single":
        raise ConfigError("lr_rule=single has no multipliers to measure; use lwlr (the default) or a baseline rule")
    rt = init_runtime(c.device, c.dist_timeout)
    torch.manual_seed(c.seed)
    model = GPT(gpt_config(c)).to(rt.device)
    batches = token_batches(c, "train", "lwlr", model.config)
    if rt.is_main:
        outdir.prepare(c.out_dir)
    # Held as a run holds it: a run training there is not overwritten, nor does one start meanwhile.
    with outdir.exclusive(c.out_dir, rt):
        _, data = for_config(c, model, batches, autocast(rt.device, c.dtype), log=rt.print0)
        if rt.is_main:
            save_report(data, c.out_dir)
            print_table(data)
            print(f"wrote {os.path.join(c.out_dir, 'lwlr.json')} and lwlr.png")
    return 0


if __name__ == "__main__":
    run_main(main)
