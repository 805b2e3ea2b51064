"""What the benchmark scripts share: device synchronization, where results are written, and a Trainer
built straight from config overrides."""

import json
import os
import tempfile

import numpy as np
import torch

import multipliers
from data import vocab
from data.tokenfile import write_tokens
from model import GPT
from runtime import host_memory
from runtime.device import autocast
from runtime.ranks import Runtime
from training import build
from training.config import parse_config
from training.trainer import Trainer

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")  # the committed results
# Where a benchmark writes unless told otherwise: untracked (.gitignore's /out*/), so running one never
# changes a committed file; `--out bench/results` (or --out_dir bench/results/...) updates those on purpose.
LOCAL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "out-bench")


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def results_base(out_dir: str, kind: str, device_name: str) -> str:
    """out_dir/<kind>-<device slug>: the path of a result file, without its extension."""
    os.makedirs(out_dir, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "-" for ch in device_name.lower()).strip("-")
    return os.path.join(out_dir, f"{kind}-{slug}")


def write_results(out_dir: str, kind: str, env: dict, rows: list[dict], text: str) -> None:
    """A benchmark's rows and environment as out_dir/<kind>-<device>.json, its table as .md, both said."""
    base = results_base(out_dir, kind, env["device"])
    with open(base + ".json", "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {base}.json and .md")


def random_token_dir(vocab_size: int, path: str | None = None, train_tokens: int = 1 << 21) -> str:
    """train.bin and val.bin of uniformly random ids (speed does not depend on the data), and a vocab.json
    of vocab_size characters unless that is GPT-2's vocabulary, so a run sizes its embedding from it."""
    path = path or tempfile.mkdtemp(prefix="bench-data-")
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    write_tokens(os.path.join(path, "train.bin"), rng.integers(0, vocab_size, train_tokens), vocab_size)
    write_tokens(os.path.join(path, "val.bin"), rng.integers(0, vocab_size, train_tokens // 10), vocab_size)
    if vocab_size != vocab.GPT2Vocab.size:
        vocab.save_chars(path, [chr(0x100 + i) for i in range(vocab_size)])
    return path


def fresh_trainer(overrides: dict, device: torch.device) -> Trainer:
    """A single-process Trainer from config overrides: the seed's init, multipliers measured (not logged
    or saved). What the benchmarks and the overfit sweep run; a training run uses start() instead."""
    c = parse_config([f"--{key}={value}" for key, value in overrides.items()])
    if device.type == "cpu":  # as runtime.ranks.init_runtime does for a training run
        host_memory.retain_freed_memory()
    torch.manual_seed(c.seed)
    model = GPT(build.gpt_config(c)).to(device)
    rt = Runtime(0, 0, 1, device)
    compiled_model = build.shared_compiled_model(c, rt, model)  # as a training run: lwlr's probe compiled
    batches = build.token_batches(c, "train", "lwlr", model.config)
    ctx = autocast(device, c.dtype)
    layer_multipliers, _ = multipliers.for_config(c, model, batches, ctx, lambda *_: None, compiled_model)
    return Trainer(c, rt, model, layer_multipliers, compiled_model=compiled_model)
