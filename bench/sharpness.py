"""Each parameter tensor's curvature, at a run's checkpoint or at lwlr's measurement init: the mean of its
block of the Gauss-Newton diagonal, per tensor and per block type in the Sharpness Disparity paper's groups
(Embed, QK, FFN, VO, Norm: lwlr.BLOCK_TYPES), which Blockwise LR's rates are built on.

    python -m bench.sharpness --out_dir out                    # out's newest checkpoint, on its training data
    python -m bench.sharpness --init config/train_shakespeare_char.py --model=gpt2   # lwlr's measurement init
    python -m bench.sharpness --out_dir out --batches 50 --samples 2 --report_dir /tmp/s

The estimator is the one SophiaG's Hessian refresh and LW-AS's gauss_newton curvature use
(optimizers/sampled_labels.py): over the N tokens of a batch, the gradient g_hat of the mean loss against
labels sampled from the model's own predictions has E[N g_hat_i^2] = G_ii, the diagonal of the Gauss-Newton
matrix of the mean loss. A tensor's sharpness is the mean of N g_hat_i^2 over its elements, over `samples`
draws on each of `batches` batches (the training split's lwlr stream: the batches lwlr measures on), in
fp32. A block type's is the parameter-weighted mean of its tensors' (its trace over its size).

Writes sharpness.json (every tensor, every block type, how it was measured) and sharpness.md (the tables)
into --report_dir: by default the run's out_dir, or out-bench/sharpness-init with --init.
"""

import argparse
import json
import os
import sys
import time

import torch

from bench.common import LOCAL
from data.loader import BatchSplit
from lwlr import BLOCK_TYPES
from model import GPT, init_weights, param_role
from optimizers.sampled_labels import sampled_label_loss
from runtime.exits import run_main
from runtime.files import write_atomically
from runtime.progress import Progress, counted
from runtime.ranks import init_runtime
from training import build, checkpoint
from training.config import TrainConfig, parse_config


def gauss_newton_diagonal_means(model: torch.nn.Module, batches, samples: int = 1) -> dict[str, float]:
    """name -> the mean over the tensor's elements of N g_hat^2 (an unbiased estimate of its Gauss-Newton
    diagonal's mean), averaged over `samples` sampled-label draws on each (x, _) in batches."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    sums = torch.zeros(len(named), dtype=torch.float64)
    draws = 0
    for x, _ in batches:
        tokens = x.numel()
        for _ in range(samples):
            logits, _ = model(x)
            grads = torch.autograd.grad(sampled_label_loss(logits), [p for _, p in named], allow_unused=True)
            for i, g in enumerate(grads):
                if g is not None:
                    sums[i] += tokens * g.double().pow(2).mean().item()
            draws += 1
    if draws == 0:
        raise ValueError("no batch to estimate the curvature on")
    return {name: total / draws for (name, _), total in zip(named, sums.tolist())}


def block_type(name: str) -> str:
    return BLOCK_TYPES.get(param_role(name).layer, "other")


def summarize(model: torch.nn.Module, curvature: dict[str, float]) -> dict:
    """Per tensor (name, kind, block type, size, sharpness) and per block type (the parameter-weighted mean),
    the block types in increasing sharpness."""
    params = dict(model.named_parameters())
    tensors = [
        {
            "name": name,
            "kind": param_role(name).kind,
            "block_type": block_type(name),
            "numel": params[name].numel(),
            "sharpness": value,
        }
        for name, value in curvature.items()
    ]
    types = {}
    for t in tensors:
        entry = types.setdefault(t["block_type"], {"numel": 0, "trace": 0.0, "tensors": 0})
        entry["numel"] += t["numel"]
        entry["trace"] += t["sharpness"] * t["numel"]
        entry["tensors"] += 1
    by_type = {
        kind: {"sharpness": e["trace"] / e["numel"], "numel": e["numel"], "tensors": e["tensors"]}
        for kind, e in sorted(types.items(), key=lambda item: item[1]["trace"] / item[1]["numel"])
    }
    return {"tensors": tensors, "block_types": by_type, "order": " < ".join(by_type)}


def markdown(result: dict) -> str:
    lines = [
        f"Gauss-Newton diagonal, mean per tensor: {result['source']}, {result['batches']} batches x "
        f"{result['samples']} sampled-label draws of {result['tokens_per_batch']} tokens, fp32.",
        "",
        f"Block types, least sharp first: {result['order']}",
        "",
        "| block type | tensors | parameters | sharpness |",
        "|---|---:|---:|---:|",
    ]
    for kind, e in result["block_types"].items():
        lines.append(f"| {kind} | {e['tensors']} | {e['numel']:,} | {e['sharpness']:.3e} |")
    lines += ["", "| tensor | kind | block type | parameters | sharpness |", "|---|---|---|---:|---:|"]
    for t in result["tensors"]:
        lines.append(f"| {t['name']} | {t['kind']} | {t['block_type']} | {t['numel']:,} | {t['sharpness']:.3e} |")
    return "\n".join(lines) + "\n"


def model_and_config(args, rest: list[str]) -> tuple[GPT, TrainConfig, str, str]:
    """The model to measure, the config its batches come from, what it is and a short label of it."""
    if args.init:
        c = parse_config(rest)
        torch.manual_seed(c.seed)
        model = GPT(build.gpt_config(c))
        if c.lwlr_init != "model":
            init_weights(model, c.lwlr_init)
        return model, c, f"{c.model} at lwlr's measurement init ({c.lwlr_init}), seed {c.seed}", "init"
    if rest:
        raise SystemExit(f"error: config keys ({' '.join(rest)}) go with --init; a checkpoint brings its own")
    path, meta = checkpoint.find(args.out_dir)
    c = TrainConfig(**meta["config"])
    return checkpoint.load_model(path, meta), c, f"{path} (step {meta['step']})", f"step {meta['step']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out_dir", help="a run's out_dir: its newest verified checkpoint")
    where.add_argument("--init", action="store_true", help="a training config's model at lwlr's measurement init")
    parser.add_argument("--batches", type=int, default=20, help="batches of the training split's lwlr stream")
    parser.add_argument("--samples", type=int, default=1, help="sampled-label draws per batch")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--report_dir", help="where sharpness.json and sharpness.md go")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    model, c, source, label = model_and_config(args, rest)
    device = init_runtime(args.device).device
    model = model.to(device).train()
    batches = build.token_batches(c, "train", "lwlr", model.config)
    split = BatchSplit(c.micro_batch_size)
    started = time.perf_counter()
    with Progress("sharpness", args.batches, "batches") as progress:
        chosen = (batches.get(t, split, device) for t in range(args.batches))
        curvature = gauss_newton_diagonal_means(model, counted(chosen, progress), args.samples)
    result = {
        "source": source,
        "label": label,
        "batches": args.batches,
        "samples": args.samples,
        "tokens_per_batch": c.micro_batch_size * model.config.block_size,
        "seconds": time.perf_counter() - started,
        **summarize(model, curvature),
    }
    report_dir = args.report_dir or (os.path.join(LOCAL, "sharpness-init") if args.init else args.out_dir)
    os.makedirs(report_dir, exist_ok=True)
    write_atomically(os.path.join(report_dir, "sharpness.json"), lambda f: json.dump(result, f, indent=1))
    write_atomically(os.path.join(report_dir, "sharpness.md"), lambda f: f.write(markdown(result)))
    print(f"block types, least sharp first: {result['order']}")
    print(f"wrote {report_dir}/sharpness.json and sharpness.md ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    run_main(main)
