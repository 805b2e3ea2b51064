"""Full training steps (forward, backward, optimizer) as train.py runs them, timed after warm-up
(compile excluded), for several optimizers and learning-rate rules in one run.

    # CUDA: gpt2 and gpt2-large, 1024 tokens, bf16, compiled
    python -m bench.bench_train
    python -m bench.bench_train --models gpt2-mini --steps 5     # CPU
    python -m bench.bench_train --models gpt2 --micro_batch_size 16 --steps 30
    # the default run's shapes (nanoGPT's CPU shapes: 4 layers x 128, GPT-2 vocab, 16 x 128 tokens, fp32),
    # the chunked output layer + loss against the full logits, in turns:
    python -m bench.bench_train --models gpt2-mini --rows adamw:lwlr --compare loss_chunk_rows=0,128 \
        --steps 3 --rounds 10

Each row runs training.trainer.Trainer.step, the loop's own step, on random token ids (speed does not depend on
the data): our AdamW with lr_rule=single and with lr_rule=lwlr (the multipliers' only cost is inside
the fused step), Lion, SophiaG (its Hessian refresh every hess_interval steps amortized: timed steps
are a multiple of it), AdamW-LW with its Gauss-Newton and Rademacher curvature passes (every lw_interval
steps, likewise amortized; the exact estimator, an HVP per layer, is for small models), and
torch.optim.AdamW(fused=True). MFU counts 6N + 12 L C T FLOPs per token
(PaLM, appendix B) against the device's dense bf16 peak (runtime.PEAK_BF16_FLOPS). The optimizer's
share is optimizer.step() timed alone on the same gradients. Writes bench/results/train-<device>.json
and .md (device, versions, commit).
"""

import argparse
import json
import statistics
import time

import torch

from bench.bench_layer_stats import DEFAULT_INTERVAL, time_stats
from bench.common import LOCAL, fresh_trainer, random_token_dir, results_base, sync
from optimizers.registry import spec
from runtime.device import environment, peak_flops, peak_memory_gib

# (optimizer, lr_rule, LW-AS curvature or "")
ROWS = (
    ("adamw", "single", ""),
    ("adamw", "lwlr", ""),
    ("lion", "lwlr", ""),
    ("sophiag", "lwlr", ""),
    ("adamw_lw", "single", "gauss_newton"),
    ("adamw_lw", "single", "rademacher"),
    ("adamw_torch", "single", ""),
)


def bench_row(preset, optimizer, rule, curvature, args, device, data_dir) -> list[dict]:
    """One row per value of the --compare key (one row without it), timed in turns: each of --rounds
    rounds runs --steps steps of every variant, and a variant's time is its median round, so a drift in
    the machine's speed (frequent on shared CPUs) falls on all variants alike."""
    key, values = args.compare if args.compare else (None, [None])
    overrides = dict(
        model=preset,
        block_size=args.block_size,
        micro_batch_size=args.micro_batch_size,
        tokens_per_step=args.micro_batch_size * args.block_size * args.grad_accum,
        optimizer=optimizer,
        lr_rule=rule,
        lwlr_T=1,
        lwlr_cache_dir="none",
        data_dir=data_dir,
        device=str(device),
        compile=args.compile if args.compile != "auto" else ("true" if device.type == "cuda" else "false"),
        hess_interval=10,
        warmup_steps=1,
        max_steps=10**6,
        **({"lw_curvature": curvature} if curvature else {}),
    )
    # The lwlr measurement is not timed: once per run.
    trainers = [fresh_trainer({**overrides, **({key: value} if key else {})}, device) for value in values]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup_seconds = []  # compilation happens here: with --compare compile=false,true, its one-time cost
    for trainer in trainers:
        start = time.perf_counter()
        for step in range(args.warmup):
            trainer.step(step)
        sync(device)
        warmup_seconds.append(time.perf_counter() - start)
    c = trainers[0].c
    interval = spec(optimizer).refresh_interval(c)
    steps = -(-args.steps // interval) * interval  # whole refresh intervals: their cost amortized exactly
    rounds = [[] for _ in trainers]
    for round_index in range(args.rounds):
        for trainer, times in zip(trainers, rounds):
            first = args.warmup + round_index * steps
            sync(device)
            start = time.perf_counter()
            for step in range(first, first + steps):
                trainer.step(step)
            sync(device)
            times.append((time.perf_counter() - start) / steps)
    rows = []
    # the layer statistics' cost on the same compiled step (bench/bench_layer_stats.py), after its rounds
    stats_step = args.warmup + args.rounds * steps
    for value, trainer, times, warmup_s in zip(values, trainers, rounds, warmup_seconds):
        seconds = statistics.median(times)
        optimizer_seconds = time_optimizer_alone(trainer, device, args.warmup + args.rounds * steps)
        peak = peak_flops(device)
        tokens_per_s = c.tokens_per_step / seconds
        rows.append(
            {
                "model": preset,
                "optimizer": optimizer,
                "lr_rule": rule,
                "lw_curvature": curvature or None,
                "variant": f"{key}={value}" if key else None,
                "param_groups": len(trainer.optimizer.param_groups),
                "tokens_per_step": c.tokens_per_step,
                "ms_per_step": 1000 * seconds,
                "ms_per_round": [1000 * t for t in times],
                "tokens_per_s": tokens_per_s,
                "mfu": trainer.raw_model.flops_per_token() * tokens_per_s / peak if peak else None,
                "peak_mem_gib": peak_memory_gib(device),
                "optimizer_ms": 1000 * optimizer_seconds,
                "optimizer_fraction": optimizer_seconds / seconds,
                "steps_timed": steps * args.rounds,
                "warmup_s": warmup_s,
                "layer_stats": time_stats(trainer, device, stats_step, 3, 1) if args.layer_stats else None,
            }
        )
    return rows


def time_optimizer_alone(trainer, device, step, repeats=10) -> float:
    """optimizer.step() on one step's gradients, repeated (the parameters move; the cost does not)."""
    rt = trainer.rt
    x, y = trainer.train_batches.get(step, trainer.split, rt.device)
    with trainer.ctx:
        _, loss = trainer.model(x, y)
    loss.backward()
    trainer.optimizer.found_inf = None
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        trainer.optimizer.step()
        sync(device)
        times.append(time.perf_counter() - start)
    trainer.optimizer.zero_grad(set_to_none=True)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--models", nargs="+", default=None, help="presets (default: gpt2 gpt2-large on CUDA, gpt2-mini on CPU)"
    )
    parser.add_argument("--block_size", type=int, default=None, help="default 1024 on CUDA, 128 on CPU")
    parser.add_argument("--micro_batch_size", type=int, default=None, help="default 16 on CUDA, 8 on CPU")
    parser.add_argument("--grad_accum", type=int, default=1)
    parser.add_argument(
        "--vocab_size", type=int, default=50257, help="random ids over this many tokens (82: the char-level config's)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=20,
        help="timed steps (rounded up to whole refresh intervals for SophiaG and LW-AS)",
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--compile", default="auto", help="auto (on for CUDA) | true | false")
    parser.add_argument(
        "--rows", nargs="+", default=None, help="optimizer:rule[:curvature], e.g. adamw:single adamw_lw:lwlr:rademacher"
    )
    parser.add_argument(
        "--compare",
        default=None,
        help="KEY=V1,V2,...: each row once per config value, timed in turns (e.g. loss_chunk_rows=0,128)",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="rounds of --steps steps per variant, in turns; the median round counts"
    )
    parser.add_argument(
        "--layer_stats", action="store_true", help="also each row's step with layer statistics (3 rounds)"
    )
    parser.add_argument(
        "--out", default=LOCAL, help="results folder (default out-bench/; bench/results: the committed ones)"
    )
    args = parser.parse_args(argv)
    if args.compare:
        key, _, values = args.compare.partition("=")
        args.compare = (key, values.split(","))
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.block_size = args.block_size or (1024 if cuda else 128)
    # on CPU with gpt2-mini: the default run's (and nanoGPT's) 16 x 128
    args.micro_batch_size = args.micro_batch_size or 16
    models = args.models or (["gpt2", "gpt2-large"] if cuda else ["gpt2-mini"])
    rows_wanted = [(*r.split(":"), "")[:3] for r in args.rows] if args.rows else ROWS
    env = environment(device)
    data_dir = random_token_dir(args.vocab_size)
    rows = []
    for preset in models:
        for optimizer, rule, curvature in rows_wanted:
            for row in bench_row(preset, optimizer, rule, curvature, args, device, data_dir):
                rows.append(row)
                mfu = f"{100 * row['mfu']:5.1f}% MFU" if row["mfu"] else "MFU n/a"
                print(
                    f"{preset:10} {label(row):40} {rule:7} {row['ms_per_step']:9.1f} ms/step "
                    f"{row['tokens_per_s']:12,.0f} tok/s  {mfu}"
                    f"  optimizer {row['optimizer_ms']:.2f} ms ({100 * row['optimizer_fraction']:.1f}%)  mem "
                    f"{row['peak_mem_gib']:.2f} GiB"
                )
            if cuda:
                torch.cuda.empty_cache()
    ratios = compute_ratios(rows)
    for line in ratios:
        print(line)
    write_results(args.out, env, vars(args), rows, ratios)
    return rows


def label(row) -> str:
    name = f"{row['optimizer']} ({row['lw_curvature']})" if row["lw_curvature"] else row["optimizer"]
    return f"{name}, {row['variant']}" if row.get("variant") else name


def compute_ratios(rows) -> list[str]:
    lines = []
    for preset in dict.fromkeys(r["model"] for r in rows):
        by = {(label(r), r["lr_rule"]): r for r in rows if r["model"] == preset}
        if ("adamw", "single") in by and ("adamw", "lwlr") in by:
            extra = by[("adamw", "lwlr")]["ms_per_step"] / by[("adamw", "single")]["ms_per_step"] - 1
            lines.append(f"{preset}: lr_rule=lwlr costs {100 * extra:+.2f}% step time against single (AdamW)")
        if ("adamw", "single") in by and ("adamw_torch", "single") in by:
            speedup = by[("adamw_torch", "single")]["ms_per_step"] / by[("adamw", "single")]["ms_per_step"]
            lines.append(f"{preset}: our AdamW step is {speedup:.3f}x torch.optim.AdamW(fused=True)")
        variants = [r for r in rows if r["model"] == preset and r.get("variant")]
        for row in variants:
            base = next(
                r
                for r in variants
                if (r["optimizer"], r["lr_rule"], r["lw_curvature"])
                == (row["optimizer"], row["lr_rule"], row["lw_curvature"])
            )
            if row is not base:
                lines.append(
                    f"{preset}: {label(row)} ({row['lr_rule']}) takes {row['ms_per_step'] / base['ms_per_step']:.3f}x "
                    f"the step time of "
                    f"{base['variant']}, median of {len(row['ms_per_round'])} rounds in turns; warm-up "
                    f"{row['warmup_s']:.1f} s "
                    f"against {base['warmup_s']:.1f} s"
                )
        for (name, rule), row in by.items():
            if row["lw_curvature"] and ("adamw", rule) in by:
                extra = row["ms_per_step"] / by[("adamw", rule)]["ms_per_step"] - 1
                lines.append(f"{preset}: {name} costs {100 * extra:+.1f}% step time against AdamW ({rule})")
    return lines


def write_results(out_dir, env, args, rows, ratios):
    base = results_base(out_dir, "train", env["device"])
    with open(base + ".json", "w") as f:
        json.dump({"env": env, "args": args, "rows": rows, "ratios": ratios}, f, indent=2)
    lines = [
        f"Training step on {env['device']} (torch {env['torch']}, triton {env['triton']}, commit {env['commit']}); "
        f"micro-batch {args['micro_batch_size']} x {args['block_size']} tokens, {args['steps']} timed steps after "
        f"{args['warmup']} warm-up"
        + (f", {args['rounds']} rounds in turns (median)" if args["rounds"] > 1 else "")
        + ".",
        "",
        "| model | optimizer | lr_rule | ms/step | tokens/s | MFU | optimizer ms (share) | peak GiB |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
        lines.append(
            f"| {r['model']} | {label(r)} | {r['lr_rule']} | {r['ms_per_step']:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {mfu} | "
            f"{r['optimizer_ms']:.2f} ({100 * r['optimizer_fraction']:.1f}%) | {r['peak_mem_gib']:.2f} |"
        )
    lines += [""] + [f"- {line}" for line in ratios]
    for r in rows:
        if r.get("layer_stats"):
            stats, share = r["layer_stats"], r["layer_stats"]["cost_at_interval"]
            lines.append(
                f"- {r['model']} {label(r)} {r['lr_rule']}: a step with layer statistics takes "
                f"{stats['extra_ms']:+.1f} ms ({100 * share[1]:+.1f}% of a step; at every {DEFAULT_INTERVAL}th "
                f"step, the default, {100 * share[DEFAULT_INTERVAL]:+.2f}% of the run)"
            )
    if args["device"] == "cpu":
        lines += ["", "Peak GiB on a CPU is the process's largest resident set so far (getrusage), not the row's own."]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {base}.json and {base}.md")


if __name__ == "__main__":
    main()
