"""The small-scale overfit experiment: train on a small fixed subset of the training data, over and
over, at a constant learning rate, for a sweep of learning rates, and compare the final train loss of
one global rate against layer-wise rates, for each optimizer. It measures how well each setting fits
the training objective, apart from generalization.

    python -m bench.overfit --preset tiny-cpu                  # ~15 min on 2 CPU cores
    python -m bench.overfit --preset gpt2 --out_dir bench/results/overfit-gpt2
    python -m bench.overfit --preset depth                     # gpt2-large, Lion, with and without residual scaling
    python -m bench.overfit --preset tiny-cpu --optimizers adamw --lrs 1e-3 3e-3 --steps 50   # any setting overridden
    python -m bench.overfit --preset heldout-quick   # held-out mode, char-level Shakespeare (prepare it first)
    python -m bench.overfit --preset heldout-cpu     # the committed held-out comparison
    python -m bench.overfit --preset heldout-cpu --jobs 2   # two points at once, each in its own process
    python -m bench.overfit --preset heldout-muon-cpu --out_dir bench/results/overfit-heldout-cpu  # Muon's rows
    python -m bench.overfit --preset heldout-gpt2    # the same on OpenWebText with GPT-2 124M, for a GPU
    python -m bench.overfit --preset depth-cpu       # the depth study: narrow-2 ... narrow-32, +- residual scaling
    # GPT-2 124M on Shakespeare BPE: bench/gpu_science.sh runs it on one GPU
    python -m bench.overfit --preset overfit-gpt2-gpu
    # lwlr's T, measurement init and power, one at a time, with their cost
    python -m bench.overfit --preset ablations-cpu

Held-out mode (`heldout=True`): the question is not memorization but whether a rule trains
a better model. Each run trains from scratch on the whole training split for a fixed token budget
with a cosine decay to lr / 10, and its score is the val loss at the end (and its curve). Several
seeds per point; the table gives each rule at its own best rate, mean +- std over seeds, and whether
its difference from `single` exceeds twice the standard error of that difference. The grids and
budgets of the presets were fixed before any of their results were seen.

Points run one after another, or `--jobs N` at once, each in a process of its own at the preset's
`--threads` (the thread count a committed table was made with: a point's numbers depend on it and on
its settings, never on what runs beside it). A model this small does not spread over threads, so on
more cores more jobs, not more threads, is what speeds a sweep up.

Every run of a sweep starts from the same init (the seed) and sees the same K batches in the same
order; only the optimizer, the rule and the learning rate differ. The final train loss is the mean
loss over the K subset batches at the final weights (eval mode, no dropout). A run whose loss turns
non-finite, or exceeds its starting loss by DIVERGED_MARGIN, stops there and is recorded as diverged.
The folder gets results.json (every run: its settings, loss curve, final loss, diverged flag, after
each run, so an interrupted sweep resumes and finished points are skipped; a stop signal ends it at
once with exit 75), table.md (rows optimizer x rule, columns lr, the best of each row in bold) and two
plots: final loss against lr, and the loss curves of each row's best run (bench/overfit_report.py,
which also redraws them from results.json).
"""

import argparse
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import signal
import sys
import time

import torch

import multipliers
from bench.common import LOCAL, fresh_trainer
from bench.overfit_report import write_all, write_depth_table
from eval import evaluate
from model import GPT
from runtime.device import environment
from runtime.files import write_atomically
from runtime.progress import duration
from runtime.signals import EXIT_PREEMPTED, Preempted, StopRequest
from training import build
from training.config import BASELINES, MEASURED_RULES, parse_config

DIVERGED_MARGIN = 1.0  # nats above the starting loss

# 6 points a factor 3.16 apart; Lion's steps are sign-sized, so its grid sits 10x lower. On tiny-cpu
# the grids first ended a point lower and the best AdamW and Lion points sat on the top edge.
LR_GRIDS = {
    "adamw": [3.16e-4, 1e-3, 3.16e-3, 1e-2, 3.16e-2, 1e-1],
    "adam_mini": [3.16e-4, 1e-3, 3.16e-3, 1e-2, 3.16e-2, 1e-1],
    "sophiag": [3.16e-4, 1e-3, 3.16e-3, 1e-2, 3.16e-2, 1e-1],
    "lion": [3.16e-5, 1e-4, 3.16e-4, 1e-3, 3.16e-3, 1e-2],
    # LW-AS: lr is the multiplier eta on the curvature step sizes (1 = as computed)
    "sgdm_lw": [0.03, 0.1, 0.3, 1.0, 3.16],  # 3.16 added after 1.0 came out best
    "adamw_lw": [0.03, 0.1, 0.3, 1.0],
}


@dataclasses.dataclass
class Sweep:
    model: str
    optimizers: list[str]
    rules: list[str]
    lrs: dict[str, list[float]]  # per optimizer
    residual_scales: list[bool]
    seeds: list[int]
    steps: int
    subset_batches: int  # K distinct batches, repeated in order
    micro_batch_size: int
    block_size: int
    warmup_steps: int  # a short linear warmup, then constant
    lwlr_T: int
    dataset: str = "shakespeare"
    data_dir: str = ""  # a folder with train.bin instead of data/<dataset>
    device: str = "auto"
    log_every: int = 5  # loss-curve resolution (a host sync each time)
    heldout: bool = False  # held-out mode: whole train split, cosine to lr / 10, scored by val loss (see above)
    eval_every: int = 50  # held-out mode: val-loss curve resolution
    eval_steps: int = 20  # held-out mode: val batches per evaluation
    # the depth study: one sweep per model f"narrow-{depth}"
    depths: list[int] = dataclasses.field(default_factory=list)
    # The CPU presets' committed tables were made in fp32, before dtype=auto chose bf16 on CPUs that compute
    # it natively: they keep fp32, so they reproduce. The GPU presets take bf16 autocast (auto, on CUDA).
    dtype: str = "float32"
    # torch threads per point. A point's numbers depend on it (the order of a matmul's sums), so the CPU
    # presets pin the 2 their committed tables were made with on 2 cores; 0 = torch's default (GPU presets).
    threads: int = 2
    # config keys an optimizer's points take beyond the sweep's (muon's AdamW-part rate), recorded with each run
    optimizer_settings: dict[str, dict] = dataclasses.field(default_factory=dict)


# The overfit sweep on CPU: (4 optimizers x 6 lrs + 9 LW-AS etas) x 2 rules = 66 runs of 100 steps on gpt2-tiny,
# 4 fixed batches of 4 x 64 tokens.
TINY_CPU = Sweep(
    model="gpt2-tiny",
    optimizers=["adamw", "adam_mini", "lion", "sophiag", "sgdm_lw", "adamw_lw"],
    rules=["single", "lwlr"],
    lrs=LR_GRIDS,
    residual_scales=[False],
    seeds=[0],
    steps=100,
    subset_batches=4,
    micro_batch_size=4,
    block_size=64,
    warmup_steps=10,
    lwlr_T=20,
)

# The committed held-out comparison's model, data, budget and seeds; the Muon rows and the ablations keep
# them (the same points, so they share its results folder).
HELDOUT_CPU = Sweep(
    model="gpt2-mini",
    optimizers=["adamw", "lion"],
    rules=["single", "lwlr", "fan_in", "depth_increasing"],
    lrs={"adamw": [3.16e-4, 1e-3, 3.16e-3, 1e-2, 3.16e-2], "lion": [3.16e-5, 1e-4, 3.16e-4, 1e-3, 3.16e-3]},
    residual_scales=[False],
    seeds=[0, 1, 2],
    steps=300,
    subset_batches=0,
    micro_batch_size=16,
    block_size=128,
    warmup_steps=30,
    lwlr_T=100,
    dataset="shakespeare_char",
    heldout=True,
    eval_every=50,
)

PRESETS = {
    "tiny-cpu": TINY_CPU,
    # Blockwise LR (ICML 2025) and lwlr_matrices beside tiny-cpu's AdamW and Lion rows, on its grids, written into
    # its folder (`--out_dir bench/results/overfit-tiny-cpu`, which keeps their single and lwlr points): 2 rules x
    # (6 + 7) rates = 26 new runs. The grids are the committed rows', Lion's with the 3.16e-2 point added there
    # after lwlr peaked on its edge; fixed before any of these runs.
    "tiny-rules-cpu": dataclasses.replace(
        TINY_CPU,
        optimizers=["adamw", "lion"],
        rules=["single", "lwlr", "blockwise", "lwlr_matrices"],
        lrs=LR_GRIDS | {"lion": LR_GRIDS["lion"] + [3.16e-2]},
    ),
    # GPT-2 124M. The published subset size, batch and steps are unknown; ours: 16 distinct batches of
    # 8 x 1024 tokens (131k tokens) for 2000 steps (125 passes), 100 warmup steps, lwlr T=100.
    "gpt2": Sweep(
        model="gpt2",
        optimizers=["adamw", "adam_mini", "lion", "sophiag"],
        rules=["single", "lwlr"],
        lrs={
            "adamw": [1e-4, 3e-4, 6e-4, 1.2e-3, 2.4e-3],
            "adam_mini": [1e-4, 3e-4, 6e-4, 1.2e-3, 2.4e-3],
            "sophiag": [1e-4, 3e-4, 6e-4, 1.2e-3, 2.4e-3],
            "lion": [1.5e-5, 3e-5, 6e-5, 1.2e-4, 2.4e-4],
        },
        residual_scales=[False],
        seeds=[0],
        steps=2000,
        subset_batches=16,
        micro_batch_size=8,
        block_size=1024,
        warmup_steps=100,
        lwlr_T=100,
        dataset="openwebtext",
        dtype="auto",
        threads=0,  # a GPU preset: torch's default
    ),
    # The depth study: gpt2-large (36 blocks), Lion, lr 3.75e-5 to 2.4e-4 (5 points a factor 1.59 apart),
    # single vs layer-wise, each without and with 1/sqrt(depth) residual scaling.
    "depth": Sweep(
        model="gpt2-large",
        optimizers=["lion"],
        rules=["single", "lwlr"],
        lrs={"lion": [3.75e-5 * 6.4 ** (i / 4) for i in range(5)]},
        residual_scales=[False, True],
        seeds=[0],
        steps=2000,
        subset_batches=16,
        micro_batch_size=4,
        block_size=1024,
        warmup_steps=100,
        lwlr_T=100,
        dataset="openwebtext",
        dtype="auto",
        threads=0,  # a GPU preset: torch's default
    ),
    # Held-out comparisons, char-level Shakespeare (data/shakespeare_char): gpt2-mini there is
    # 0.84M parameters, 95% of them in the blocks. 2,048 characters per step; 4 rules x 2 optimizers x 3 seeds.
    # quick: 2 lrs x 100 steps, about 10 min on 2 cores (predicted from 90 ms/step); cpu: 5 lrs x 300 steps
    # (614k characters, 0.13 epochs), about 60 min (predicted).
    "heldout-quick": dataclasses.replace(
        HELDOUT_CPU, lrs={"adamw": [1e-3, 3.16e-3], "lion": [1e-4, 3.16e-4]}, steps=100, warmup_steps=10
    ),
    "heldout-cpu": HELDOUT_CPU,
    # Muon beside heldout-cpu's AdamW and Lion rows: its model, data, budget and seeds, written into its folder
    # (`--out_dir bench/results/overfit-heldout-cpu`). The grid was fixed before any run: 5 rates a factor 3.16
    # apart around the speedrun's 0.05, the AdamW part (embeddings, output layer, LayerNorms, biases) at AdamW
    # single's best rate there, 0.00316; Newton-Schulz in fp32 (optimizers/muon.py: bf16 is emulated on these CPUs).
    # 3 rules x 5 rates x 3 seeds = 45 runs.
    "heldout-muon-cpu": dataclasses.replace(
        HELDOUT_CPU,
        optimizers=["muon"],
        rules=["single", "lwlr", "fan_in"],
        lrs={"muon": [3.16e-3, 1e-2, 3.16e-2, 1e-1, 3.16e-1]},
        optimizer_settings={"muon": {"adamw_lr": 3.16e-3, "muon_ns_dtype": "float32"}},
    ),
    # Blockwise LR (ICML 2025) and lwlr_matrices beside heldout-cpu's AdamW and Lion rows, and Adam-mini (the
    # optimizer both papers pair with) under single, lwlr, fan_in and both: heldout-cpu's model, data, budget
    # and seeds, written into its folder (`--out_dir bench/results/overfit-heldout-cpu`, which keeps its
    # single, lwlr and fan_in points). The grids were fixed before any run: heldout-cpu's, and Adam-mini on
    # AdamW's. (2 + 2 + 5) rules x 5 rates x 3 seeds = 135 new runs.
    "heldout-rules-cpu": dataclasses.replace(
        HELDOUT_CPU,
        optimizers=["adamw", "lion", "adam_mini"],
        rules=["single", "lwlr", "fan_in", "blockwise", "lwlr_matrices"],
        lrs=HELDOUT_CPU.lrs | {"adam_mini": HELDOUT_CPU.lrs["adamw"]},
    ),
    # The depth study at CPU scale: 64-wide models of 2 to 32 blocks, with and without 1/sqrt(depth) residual
    # scaling, single against lwlr at each cell's best of 3 rates, AdamW and Lion, one seed; held-out mode, so
    # each run reports the train loss (the paper's measure) and the val loss. 120 runs of 200 steps.
    "depth-cpu": Sweep(
        model="narrow-2",
        optimizers=["adamw", "lion"],
        rules=["single", "lwlr"],
        lrs={"adamw": [1e-3, 3.16e-3, 1e-2], "lion": [1e-4, 3.16e-4, 1e-3]},
        residual_scales=[False, True],
        seeds=[0],
        steps=200,
        subset_batches=0,
        micro_batch_size=16,
        block_size=128,
        warmup_steps=20,
        lwlr_T=50,
        dataset="shakespeare_char",
        heldout=True,
        eval_every=100,
        depths=[2, 4, 8, 16, 32],
    ),
    # Ablations the paper leaves open, one at a time around its defaults (T=100, fan_out init, power 1/2), on
    # val loss, AdamW, with the measuring cost beside each; the grid and budget are heldout-cpu's, so
    # `--out_dir bench/results/overfit-heldout-cpu` reuses its single and lwlr points. 120 runs, about 60 min
    # (predicted).
    "ablations-cpu": dataclasses.replace(
        HELDOUT_CPU,
        optimizers=["adamw"],
        rules=[
            "single",
            "lwlr",
            "lwlr:T=1",
            "lwlr:T=10",
            "lwlr:init=fan_in",
            "lwlr:init=model",
            "lwlr:power=0.25",
            "lwlr:power=0.75",
        ],
        lrs={"adamw": [3.16e-4, 1e-3, 3.16e-3, 1e-2, 3.16e-2]},
    ),
    # GPT-2 124M on one GPU in the 8 minutes of bench/gpu_science.sh, on the embedded Shakespeare in GPT-2
    # BPE (the only data that reaches the GPU machine; for memorizing a few fixed batches, any text does).
    # Sizes from a predicted step: 8 x 1024 tokens, about 7 TFLOP forward and backward, about 30 ms in
    # bf16 uncompiled on an H200 (~25% MFU). Overfit: 4 optimizers x 2 rules x 3 rates around each one's
    # GPT-2 default = 24 runs of 300 steps (37 passes over 8 batches), about 270 s with each run's model
    # init. Not compiled: a cold compile (~60 s) plus a retrace per run (~10 s) would cost more than its
    # ~12 ms a step saves over 300 steps. lwlr measured once (T=100) and reused through the cache.
    "overfit-gpt2-gpu": Sweep(
        model="gpt2",
        optimizers=["adamw", "lion", "sophiag", "adam_mini"],
        rules=["single", "lwlr"],
        lrs={
            "adamw": [3e-4, 6e-4, 1.2e-3],
            "sophiag": [3e-4, 6e-4, 1.2e-3],
            "adam_mini": [3e-4, 6e-4, 1.2e-3],
            "lion": [3e-5, 6e-5, 1.2e-4],
        },
        residual_scales=[False],
        seeds=[0],
        steps=300,
        subset_batches=8,
        micro_batch_size=8,
        block_size=1024,
        warmup_steps=30,
        lwlr_T=100,
        dtype="auto",
        threads=0,  # a GPU preset: torch's default
    ),
    # Held-out at 124M: AdamW, 4 rules x 2 rates x 2 seeds = 16 runs of 100 steps of 8 x 1024 tokens (819k
    # tokens, 0.6 epochs of the 1.4M-token train split), cosine to lr / 10; about 110 s predicted.
    "heldout-gpt2-gpu": Sweep(
        model="gpt2",
        optimizers=["adamw"],
        rules=["single", "lwlr", "fan_in", "blockwise"],
        lrs={"adamw": [6e-4, 1.2e-3]},
        residual_scales=[False],
        seeds=[0, 1],
        steps=100,
        subset_batches=0,
        micro_batch_size=8,
        block_size=1024,
        warmup_steps=10,
        lwlr_T=100,
        heldout=True,
        eval_every=50,
        eval_steps=10,
        dtype="auto",
        threads=0,  # a GPU preset: torch's default
    ),
    # GPT-2 124M on OpenWebText for a GPU: 2000 steps of 8 x 1024 tokens (16M tokens), not run here.
    "heldout-gpt2": Sweep(
        model="gpt2",
        optimizers=["adamw", "lion"],
        rules=["single", "lwlr", "fan_in", "depth_increasing", "blockwise", "lwlr_matrices"],
        lrs={"adamw": [3e-4, 6e-4, 1.2e-3, 2.4e-3], "lion": [3e-5, 6e-5, 1.2e-4, 2.4e-4]},
        residual_scales=[False],
        seeds=[0, 1, 2],
        steps=2000,
        subset_batches=0,
        micro_batch_size=8,
        block_size=1024,
        warmup_steps=100,
        lwlr_T=100,
        dataset="openwebtext",
        heldout=True,
        eval_every=250,
        eval_steps=50,
        dtype="auto",
        threads=0,  # a GPU preset: torch's default
    ),
}


# Settings every run of a results file must share; the grid itself (optimizers, rules, lrs, seeds,
# residual scales) may grow between invocations.
RESULT_DEFINING = (
    "model",
    "steps",
    "subset_batches",
    "micro_batch_size",
    "block_size",
    "warmup_steps",
    "lwlr_T",
    "dataset",
    "data_dir",
    "heldout",
    "eval_steps",
    "dtype",
)


def run_key(optimizer, rule, lr, residual_scale, seed) -> str:
    return f"{optimizer}|{rule}|{lr:.6g}|{'rs' if residual_scale else 'plain'}|{seed}"


# Ablations are rules with settings: "lwlr:T=10", "lwlr:init=model", "lwlr:power=0.25" (one at a time).
ABLATION_KEYS = {"T": ("lwlr_T", int), "init": ("lwlr_init", str), "power": ("lwlr_power", float)}


def parse_rule(rule: str) -> tuple[str, dict]:
    """ "lwlr:T=10" -> ("lwlr", {"lwlr_T": 10}); a plain rule has no settings."""
    base, _, settings = rule.partition(":")
    overrides = {}
    for setting in filter(None, settings.split(",")):
        name, _, value = setting.partition("=")
        if name not in ABLATION_KEYS:
            raise ValueError(f"rule {rule!r}: unknown setting {name!r}; choose from {', '.join(ABLATION_KEYS)}")
        key, kind = ABLATION_KEYS[name]
        overrides[key] = kind(value)
    return base, overrides


def config_overrides(
    sweep: Sweep, optimizer: str, rule: str, lr: float, residual_scale: bool, seed: int, device: torch.device
) -> dict:
    base_rule, settings = parse_rule(rule)
    return (
        dict(
            model=sweep.model,
            block_size=sweep.block_size,
            micro_batch_size=sweep.micro_batch_size,
            tokens_per_step=sweep.micro_batch_size * sweep.block_size,
            data_subset_batches=sweep.subset_batches,
            dataset=sweep.dataset,
            data_dir=sweep.data_dir,
            optimizer=optimizer,
            lr_rule=base_rule,
            lr=lr,
            warmup_steps=sweep.warmup_steps,
            schedule="cosine" if sweep.heldout else "constant",
            min_lr=lr / 10,
            eval_steps=sweep.eval_steps,
            max_steps=sweep.steps,
            residual_scale=residual_scale,
            seed=seed,
            lwlr_T=sweep.lwlr_T,
            device=str(device),
            compile="false",
            max_bad_steps=1,
            dtype=sweep.dtype,
            # The full-logits loss the committed sweep points were made with: the chunked one agrees to 1e-6
            # per step, but 100 steps at the edge of stability amplify that past the table's last digit.
            loss_chunk_rows=0,
        )
        | sweep.optimizer_settings.get(optimizer, {})
        # an ablation's settings replace the sweep's (lwlr_T)
        | settings
    )


def measurement_seconds(sweep: Sweep, rule: str, device: torch.device) -> float:
    """What a rule's multipliers cost to measure (seed 0, no cache): the price beside an ablation's effect."""
    c = parse_config(
        [f"--{k}={v}" for k, v in config_overrides(sweep, sweep.optimizers[0], rule, 1e-3, False, 0, device).items()]
        + ["--lwlr_cache_dir=none"]
    )
    torch.manual_seed(c.seed)
    model = GPT(build.gpt_config(c)).to(device)
    start = time.perf_counter()
    multipliers.for_config(c, model, build.token_batches(c, "train", "lwlr", model.config))  # its progress said
    return time.perf_counter() - start


def run_one(
    sweep: Sweep, optimizer: str, rule: str, lr: float, residual_scale: bool, seed: int, device: torch.device
) -> dict:
    overrides = config_overrides(sweep, optimizer, rule, lr, residual_scale, seed, device)
    trainer = fresh_trainer(overrides, device)  # the seed's init: the same for every run of this seed
    curve, val_curve, start_loss, diverged = [], [], None, False
    val_batches = build.token_batches(trainer.c, "val", "val", trainer.raw_model.config) if sweep.heldout else None
    for step in range(sweep.steps):
        _, loss, _, found_inf, _ = trainer.step(step)
        if sweep.heldout and ((step + 1) % sweep.eval_every == 0 or step == sweep.steps - 1):
            val_curve.append([step + 1, evaluate(trainer.model, val_batches, trainer.c, trainer.rt, trainer.ctx)])
        if step % sweep.log_every == 0 or step == sweep.steps - 1:
            value = loss.item()
            start_loss = value if start_loss is None else start_loss
            curve.append([step, value])
            if not math.isfinite(value) or found_inf.item() or value > start_loss + DIVERGED_MARGIN:
                diverged = True
                break
    final = None if diverged else (val_curve[-1][1] if sweep.heldout else subset_loss(trainer, device))
    if final is not None and not math.isfinite(final):
        diverged, final = True, None
    run = {
        "optimizer": optimizer,
        "rule": rule,
        "lr": lr,
        "residual_scale": residual_scale,
        "seed": seed,
        "final_loss": final,
        "diverged": diverged,
        "curve": curve,
        "steps_run": curve[-1][0] + 1 if curve else 0,
        **({"settings": sweep.optimizer_settings[optimizer]} if optimizer in sweep.optimizer_settings else {}),
    }
    return {**run, "val_curve": val_curve} if sweep.heldout else run


@torch.no_grad()
def subset_loss(trainer, device) -> float:
    """Mean loss over the K subset batches at the final weights."""
    c = trainer.c
    model = trainer.raw_model.eval()
    total = 0.0
    for k in range(c.data_subset_batches):
        x, y = trainer.train_batches.get(k, trainer.split, device)
        with trainer.ctx:
            _, loss = model(x, y)
        total += loss.item()
    model.train()
    return total / c.data_subset_batches


def load_results(path: str, sweep: Sweep) -> dict:
    if not os.path.isfile(path):
        return {"sweep": dataclasses.asdict(sweep), "runs": {}}
    with open(path) as f:
        results = json.load(f)
    saved = results["sweep"]
    # older files lack newer keys: those count at the sweep's default
    changed = [key for key in RESULT_DEFINING if saved.get(key, getattr(Sweep, key, None)) != getattr(sweep, key)]
    if changed:
        raise ValueError(
            f"{path} holds a sweep with other {', '.join(changed)}; its runs would not compare: use another --out_dir"
        )
    merged = dataclasses.asdict(sweep)  # a rerun may extend the grid: keep the union, earlier entries first
    for key in ("optimizers", "rules", "seeds", "residual_scales"):
        merged[key] = list(dict.fromkeys(saved[key] + merged[key]))
    merged["lrs"] = {
        o: sorted(set(saved["lrs"].get(o, [])) | set(merged["lrs"].get(o, []))) for o in merged["optimizers"]
    }
    results["sweep"] = merged
    return results


def save_results(path: str, results: dict) -> None:
    write_atomically(path, lambda f: json.dump(results, f, indent=1))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="tiny-cpu")
    parser.add_argument(
        "--out_dir",
        default=None,
        help="default out-bench/overfit-<preset>; bench/results/overfit-<preset>: the committed one",
    )
    parser.add_argument("--optimizers", nargs="+")
    parser.add_argument("--rules", nargs="+", help=f"from single, {', '.join(MEASURED_RULES + BASELINES)}")
    parser.add_argument("--lrs", nargs="+", type=float, help="one grid for every optimizer")
    parser.add_argument("--residual_scales", nargs="+", choices=["false", "true"])
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--depths", nargs="+", type=int, help="the depth study: one sweep per narrow-<depth> model")
    for name in (
        "steps",
        "subset_batches",
        "micro_batch_size",
        "block_size",
        "warmup_steps",
        "lwlr_T",
        "log_every",
        "eval_every",
        "eval_steps",
    ):
        parser.add_argument(f"--{name}", type=int)
    parser.add_argument("--model")
    parser.add_argument("--dataset")
    parser.add_argument("--data_dir")
    parser.add_argument("--device")
    parser.add_argument("--threads", type=int, help="torch threads per point (the preset's: its table was made so)")
    parser.add_argument("--jobs", type=int, help="points at once, one process each (default: cores / threads)")
    args = parser.parse_args(argv)
    sweep = dataclasses.replace(PRESETS[args.preset])
    for name in (
        "optimizers",
        "rules",
        "seeds",
        "depths",
        "steps",
        "subset_batches",
        "micro_batch_size",
        "block_size",
        "warmup_steps",
        "lwlr_T",
        "log_every",
        "eval_every",
        "eval_steps",
        "model",
        "dataset",
        "data_dir",
        "device",
        "threads",
    ):
        if getattr(args, name) is not None:
            setattr(sweep, name, getattr(args, name))
    if args.lrs:
        sweep.lrs = {optimizer: args.lrs for optimizer in sweep.optimizers}
    if args.residual_scales:
        sweep.residual_scales = [value == "true" for value in args.residual_scales]
    missing = [o for o in sweep.optimizers if o not in sweep.lrs]
    if missing:
        raise ValueError(f"no lr grid for {missing}: pass --lrs")
    device = torch.device(sweep.device if sweep.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = args.out_dir or os.path.join(LOCAL, f"overfit-{args.preset}")
    jobs = args.jobs or default_jobs(sweep, device)
    if not sweep.depths:
        return run_sweep(sweep, out_dir, device, jobs)
    by_depth = {
        depth: run_sweep(
            dataclasses.replace(sweep, model=f"narrow-{depth}", depths=[]),
            os.path.join(out_dir, f"L{depth}"),
            device,
            jobs,
        )
        for depth in sweep.depths
    }
    print(write_depth_table(by_depth, os.path.join(out_dir, "depth.md")))
    return by_depth


def run_point(sweep: Sweep, point: tuple, device: torch.device) -> tuple[tuple, dict]:
    """One point at sweep.threads torch threads, timed; what a worker process runs. The process's thread
    count is put back after: a caller's own runs (a test's, in the same process) must not inherit it."""
    before = torch.get_num_threads()
    if sweep.threads:
        torch.set_num_threads(sweep.threads)
    try:
        start = time.perf_counter()
        run = run_one(sweep, *point, device)
        seconds, threads = time.perf_counter() - start, torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    # where it ran: a results.json may gather points from several machines (the Muon rows beside heldout-cpu's)
    return point, {**run, "seconds": seconds, "threads": threads, "env": environment(device)}


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent alone answers it


def run_points(sweep: Sweep, points: list[tuple], device: torch.device, jobs: int):
    """(point, run) for every point as it finishes: in this process when jobs is 1, else in `jobs` spawned
    worker processes (fresh interpreters: nothing of one point's run reaches another's). A point's numbers
    depend on its settings and thread count alone, never on jobs (tests/test_overfit.py checks bitwise).
    A stop ends the workers with the sweep; the points they were running run again on the next start."""
    if jobs <= 1:
        for point in points:
            yield run_point(sweep, point, device)
        return
    with multiprocessing.get_context("spawn").Pool(jobs, initializer=_worker_init) as pool:  # exit: terminate
        yield from pool.imap_unordered(functools.partial(run_point, sweep, device=device), points)


def default_jobs(sweep: Sweep, device: torch.device) -> int:
    """As many points at once as the cores hold at sweep.threads each; one on a GPU."""
    if device.type != "cpu":
        return 1
    return max(1, (os.cpu_count() or 1) // max(1, sweep.threads or torch.get_num_threads()))


def run_sweep(sweep: Sweep, out_dir: str, device: torch.device, jobs: int = 1) -> dict:
    """Every point of the sweep not in out_dir/results.json yet, then the table and plots of all of them."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    results = load_results(path, sweep)
    results["env"] = environment(device)
    points = [
        (o, r, lr, rs, s)
        for o in sweep.optimizers
        for r in sweep.rules
        for lr in sweep.lrs[o]
        for rs in sweep.residual_scales
        for s in sweep.seeds
    ]
    pending = [point for point in points if run_key(*point) not in results["runs"]]
    if len(pending) < len(points):
        print(f"{len(points) - len(pending)} of {len(points)} points are in {path} already: skipped, kept as they are")
    started, ran = time.perf_counter(), 0
    for point, run in run_points(sweep, pending, device, jobs):  # as each finishes; this process writes alone
        results["runs"][run_key(*point)] = run
        save_results(path, results)
        ran += 1
        outcome = "diverged" if run["diverged"] else f"final loss {run['final_loss']:.4f}"
        left = duration((time.perf_counter() - started) / ran * (len(pending) - ran))
        print(
            f"[{len(points) - len(pending) + ran}/{len(points)}] {run_key(*point)}: {outcome} ({run['seconds']:.0f} s) "
            f"| {len(pending) - ran} to run, about {left} left",
            flush=True,
        )
    costs = results.setdefault("measurement_seconds", {})
    for rule in sweep.rules:
        # the cost column: one timed, uncached measurement
        if parse_rule(rule)[0] in MEASURED_RULES and rule not in costs:
            print(f"{rule}: timing one measurement of its multipliers, uncached (the table's cost column) ...")
            costs[rule] = measurement_seconds(sweep, rule, device)
            print(f"{rule}: measured in {duration(costs[rule])}", flush=True)
            save_results(path, results)
    print(write_all(results, out_dir))
    print(f"wrote {out_dir}/results.json, table.md, final_loss_vs_lr.png, best_curves.png")
    return results


if __name__ == "__main__":
    StopRequest()  # a stop signal unwinds the sweep at once: results.json already holds every finished point
    try:
        main()
    except Preempted as reason:
        print(f"{reason}: the sweep stopped; the same command runs the points not in results.json", flush=True)
        sys.exit(EXIT_PREEMPTED)
