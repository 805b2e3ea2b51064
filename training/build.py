"""What a TrainConfig builds, and nothing else: the data folder, the model's config, batches and their
split over ranks and micro-steps, the learning-rate schedule, the optimizer (its registry entry's
constructor), whether the run compiles and whether it shards. The rest of training/, the root's entry
points and bench/ import it; of them it imports only training.config and training.hf.
"""

import dataclasses
import difflib
import math
import os
import shutil

import torch

from data import vocab
from data.loader import BatchSplit, TokenBatches
from model import GPT, PRESETS, GPTConfig
from optimizers.registry import spec
from runtime.device import precision
from training import hf
from training.config import INIT_MODES, ConfigError, TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository's: data/<dataset> is there


def data_dir(c: TrainConfig) -> str:
    """data_dir, or data/<dataset>, which must be a dataset of the repository's (one with a prepare script)."""
    if c.data_dir:
        return c.data_dir
    path = os.path.join(ROOT, "data", c.dataset)
    if not os.path.isdir(path):
        datasets = sorted(
            name
            for name in os.listdir(os.path.join(ROOT, "data"))
            if os.path.isfile(os.path.join(ROOT, "data", name, "prepare.py"))
        )
        close = difflib.get_close_matches(c.dataset, datasets, n=1)
        raise ConfigError(
            f"dataset={c.dataset!r}: no data/{c.dataset}/ folder; {f'did you mean {close[0]}? ' if close else ''}"
            f"the datasets are {', '.join(datasets)} (or give --data_dir=FOLDER)"
        )
    return path


def gpt_config(c: TrainConfig, vocab_size: int | None = None) -> GPTConfig:
    """The model a config trains: its preset with the dataset's vocabulary (data/vocab.py; GPT-2's unless
    the data has a vocab.json), block_size, dropout, residual scaling and the loss chunking applied."""
    if c.model not in PRESETS:
        raise ConfigError(f"model={c.model!r}: choose a preset of model.py, one of {', '.join(PRESETS)}")
    vocab_size = vocab_size or vocab.load(data_dir(c)).size
    config = GPTConfig.from_preset(
        c.model,
        vocab_size=vocab_size,
        dropout=c.dropout,
        residual_scale=c.residual_scale,
        loss_chunk_rows=c.loss_chunk_rows,
    )
    block_size = c.block_size or config.block_size
    # A pretrained directory's own positions govern a fine-tune (pretrained() checked block_size against them).
    from_preset = c.init_from in INIT_MODES
    if from_preset and block_size > config.block_size:
        raise ConfigError(f"block_size={block_size} exceeds the {c.model} preset's {config.block_size}")
    config.block_size = block_size
    return config


def token_batches(
    c: TrainConfig, split: str, stream: str, model_config: GPTConfig, subset_batches: int = 0
) -> TokenBatches:
    """Batches over data_dir (or data/<dataset>)/<split>.bin, from the named random stream."""
    return TokenBatches(
        os.path.join(data_dir(c), f"{split}.bin"),
        stream,
        model_config.block_size,
        model_config.vocab_size,
        c.seed,
        subset_batches,
    )


def fit_micro_batch(c: TrainConfig, block_size: int, world_size: int, say=print) -> TrainConfig:
    """The config with the largest micro_batch_size, up to the configured one, that splits tokens_per_step
    evenly over world_size processes, so that one config runs unchanged under torchrun on any number
    of processes its global batch allows (nanoGPT's habit: the global batch stays, the accumulation
    adapts). A change is said; a global batch that no micro-batch splits is a ConfigError naming the
    values that would."""
    rows_per_rank, remainder = divmod(c.tokens_per_step, block_size * world_size)
    if remainder or rows_per_rank == 0:
        unit = block_size * world_size
        lower = c.tokens_per_step - c.tokens_per_step % unit
        nearest = " or ".join(f"{t:,}" for t in (lower, lower + unit) if t > 0)
        counts = [n for n in range(1, 17) if c.tokens_per_step % (block_size * n) == 0]
        processes = f"; or run on {', '.join(map(str, counts))} processes" if counts else ""
        processes_word = "process" if world_size == 1 else "processes"
        raise ConfigError(
            f"tokens_per_step={c.tokens_per_step:,} cannot be split over {world_size} {processes_word} of sequences of "
            f"block_size={block_size}: it must be a multiple of block_size * processes = {unit:,}. "
            f"tokens_per_step={nearest} would{processes}"
        )
    micro = max(m for m in range(1, min(c.micro_batch_size, rows_per_rank) + 1) if rows_per_rank % m == 0)
    if micro == c.micro_batch_size:
        return c
    say(
        f"batch: micro_batch_size {c.micro_batch_size} -> {micro}, so that tokens_per_step={c.tokens_per_step:,} "
        f"splits over "
        f"{world_size} processes: {micro} batch * {block_size} block * {rows_per_rank // micro} accum * {world_size} "
        f"processes"
    )
    return dataclasses.replace(c, micro_batch_size=micro, lw_micro_batch_size=min(c.lw_micro_batch_size, micro))


def grad_accumulation(c: TrainConfig, block_size: int, world_size: int) -> int:
    """Micro-steps per optimizer step: tokens_per_step = micro_batch_size * block_size * grad_accum * world_size."""
    rows_per_micro_step = c.micro_batch_size * block_size * world_size
    if c.tokens_per_step % rows_per_micro_step:
        raise ConfigError(
            f"tokens_per_step={c.tokens_per_step} is not a multiple of micro_batch_size * block_size * world_size"
            f" = {c.micro_batch_size} * {block_size} * {world_size} = {rows_per_micro_step}"
        )
    return c.tokens_per_step // rows_per_micro_step


def batch_split(c: TrainConfig, block_size: int, world_size: int) -> BatchSplit:
    """How a training step's batch is cut: micro_batch_size rows, grad_accum micro-steps, world_size ranks."""
    return BatchSplit(c.micro_batch_size, grad_accumulation(c, block_size, world_size), world_size)


def eval_split(c: TrainConfig, world_size: int) -> BatchSplit:
    """How an eval batch is cut: micro_batch_size rows on each rank, one micro-step."""
    return BatchSplit(c.micro_batch_size, 1, world_size)


def lr_at(step: int, c: TrainConfig) -> float:
    """Linear warmup to lr, then cosine to min_lr at lr_decay_steps (or constant: the overfit runs)."""
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    if c.schedule == "constant":
        return c.lr
    decay_steps = c.lr_decay_steps or c.max_steps
    if step >= decay_steps:
        return c.min_lr
    progress = (step - c.warmup_steps) / max(1, decay_steps - c.warmup_steps)
    return c.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (c.lr - c.min_lr)


# compile=auto on a CPU, measured on 2 cores (docs/benchmarks.md): compiling costs 45 to 80 s once. With
# bf16 autocast (a CPU with AVX512-BF16 or AMX) the default run (GPT-2's 50,257-token vocabulary, whose
# output layer dominates the step) then steps at 0.66x, 285 ms a step saved, repaid after about 160 of its
# 200 steps; the char-level config (82 tokens) saves 7.6 ms a step, which would take 5,300 steps to repay.
# In fp32 (an AVX2-only CPU) the default run's compiled step was 0.92x, about 0.11 s saved a step, and its
# 82 s compile was not repaid in 200 steps.
CPU_COMPILE_MIN_VOCAB = 10_000
CPU_COMPILE_MIN_STEPS = 200


def compiles(c: TrainConfig, device: torch.device, vocab_size: int) -> tuple[bool, str]:
    """Whether the run torch.compiles its model, and why, in words."""
    if c.compile != "auto":
        return c.compile == "true", f"compile={c.compile}"
    if device.type == "cuda":
        return True, "compile=auto on CUDA"
    if precision(device, c.dtype)[0] != "bfloat16":
        return False, (
            "compile=auto on a CPU: off in fp32, where the default run's compiled step was no faster "
            "(docs/benchmarks.md)"
        )
    if vocab_size < CPU_COMPILE_MIN_VOCAB or c.max_steps < CPU_COMPILE_MIN_STEPS:
        return False, (
            f"compile=auto on a CPU: off below a {CPU_COMPILE_MIN_VOCAB:,}-token vocabulary or {CPU_COMPILE_MIN_STEPS} "
            "steps, where its compile would not be repaid (docs/benchmarks.md)"
        )
    if not (shutil.which("c++") or shutil.which("g++")):
        return False, "compile=auto on a CPU: off, no C++ compiler on PATH for inductor"
    return True, "compile=auto on a CPU with bf16: a GPT-2-sized output layer over 200+ steps repays its compile"


def shared_compiled_model(c: TrainConfig, rt, model: GPT) -> torch.nn.Module | None:
    """torch.compile(model), for lwlr's measurement and then the Trainer's steps, where the run compiles
    the whole model (not under fsdp, which compiles each block between its all-gathers): one compile, and
    the measurement at a compiled step's speed. None where the run does not compile it so."""
    compiled, _ = compiles(c, rt.device, model.config.vocab_size)
    return torch.compile(model) if compiled and not shards(c, rt) else None


def build_optimizer(
    c: TrainConfig, groups: list[dict], n_head: int, backend: str | None = None
) -> torch.optim.Optimizer:
    """The config's optimizer over groups, by its registry entry; backend (triton | torch, the self-check's
    choice, optimizers.self_check.choose_backend) or the config's optimizer_backend."""
    return spec(c.optimizer).build(c, groups, n_head, backend or c.optimizer_backend)


def shards(c: TrainConfig, rt) -> bool:
    """Whether the run shards: parallel=fsdp under torchrun, on one rank too (the code path a multi-GPU run
    takes, on one GPU). A plain process holds the whole model whatever parallel says."""
    return rt.distributed and c.parallel == "fsdp"


def check_optimizer(c: TrainConfig, rt) -> None:
    """A config the optimizer cannot run (sharded, where the run shards), refused before any work: one
    ConfigError, its registry entry's words."""
    problem = spec(c.optimizer).refuses(c, shards(c, rt))
    if problem:
        raise ConfigError(problem)


# A fine-tune's lwlr measurement: T=10 batches unless lwlr_T is given. In the ablation (docs/findings.md,
# ablations-cpu) T=1 and T=10 gave the multipliers and val loss of T=100 at a tenth of the cost or less,
# and a pretrained model's backward is the expensive part of a short fine-tune.
FINETUNE_LWLR_T = 10


def pretrained(c: TrainConfig) -> TrainConfig:
    """The config of a run that starts from a Hugging Face GPT-2 directory (init_from=PATH): the model's
    shape and positions are the directory's (block_size 0 takes all of them), lwlr measures at the loaded
    weights (lwlr_init=model) over FINETUNE_LWLR_T batches, unless the config sets lwlr_init or lwlr_T.
    Other configs come back as they are."""
    if c.init_from in INIT_MODES:
        return c
    path = c.init_from
    if not os.path.isdir(path):
        raise ConfigError(
            f"init_from={path!r} is neither {', '.join(INIT_MODES)} nor a local directory. Nothing is ever downloaded: "
            "for GPT-2's weights, download a Hugging Face directory first (`hf download openai-community/gpt2 "
            "--local-dir "
            "hf/gpt2`, from huggingface_hub; versions before 0.34 call it `huggingface-cli download`) and pass its path"
        )
    try:
        weights = hf.read_config(path)
        preset = hf.preset_of(weights)
    except hf.PretrainedError as e:
        raise ConfigError(f"init_from: {e}") from None
    if "model" in c.given and c.model != preset:
        raise ConfigError(
            f"model={c.model!r} disagrees with init_from={path}, which holds a {preset}: drop model or make it "
            f"{preset!r}"
        )
    dataset_vocab = vocab.load(data_dir(c)).size
    if weights.vocab_size != dataset_vocab:
        raise ConfigError(
            f"init_from={path} has a vocabulary of {weights.vocab_size} tokens, the dataset {data_dir(c)} one of "
            f"{dataset_vocab}"
        )
    if c.block_size > weights.block_size:
        raise ConfigError(f"block_size={c.block_size} exceeds the {weights.block_size} positions of init_from={path}")
    return dataclasses.replace(
        c,
        model=preset,
        block_size=c.block_size or weights.block_size,
        lwlr_init=c.lwlr_init if "lwlr_init" in c.given else "model",
        lwlr_T=c.lwlr_T if "lwlr_T" in c.given else FINETUNE_LWLR_T,
    )
