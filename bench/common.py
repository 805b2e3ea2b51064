"""What the benchmark scripts share: device synchronization, where results are written, and a Trainer
built straight from config overrides."""

import os

import torch

import build
import multipliers
import train
from model import GPT
from runtime import Runtime

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def results_base(out_dir: str, kind: str, device_name: str) -> str:
    """out_dir/<kind>-<device slug>: the path of a result file, without its extension."""
    os.makedirs(out_dir, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "-" for ch in device_name.lower()).strip("-")
    return os.path.join(out_dir, f"{kind}-{slug}")


def fresh_trainer(overrides: dict, device: torch.device) -> train.Trainer:
    """A single-process Trainer from config overrides: the seed's init, multipliers measured (not logged
    or saved). What the benchmarks and the overfit sweep run; a training run uses start() instead."""
    c = train.parse_config([f"--{key}={value}" for key, value in overrides.items()])
    torch.manual_seed(c.seed)
    model = GPT(build.gpt_config(c)).to(device)
    lr_multipliers, _ = multipliers.for_config(c, model, build.token_batches(c, "train", "lwlr", model.config), log=lambda *_: None)
    return train.Trainer(c, Runtime(0, 0, 1, device), model, lr_multipliers)
