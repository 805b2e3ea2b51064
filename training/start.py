"""Where a run begins, decided before it touches out_dir: every check that can refuse it (the config, the
data, the checkpoints, the sharding, the optimizer's kernels), a finished run said as such, and the start
itself, fresh or from the newest complete checkpoint; then, in the out_dir the run holds, its records
(config.json, the log trimmed to the checkpoint) and the lines that say what runs. A refused run leaves
out_dir as it found it, byte for byte.
"""

import dataclasses
import os
import uuid

import torch
import torch.distributed as dist

from data.loader import TokenBatches
from model import GPT
from runtime import threads
from runtime.device import environment, precision
from training import checkpoint, hf, memory, resume
from training.build import check_optimizer, fit_micro_batch, gpt_config, grad_accumulation, token_batches
from training.config import INIT_MODES, MEASURED_RULES, ConfigError, TrainConfig
from training.runlog import RunLog
from training.trainer import Trainer, choose_backend


def say_world_size_change(c: TrainConfig, meta: dict, rt, block_size: int) -> None:
    """The number of processes may change on a resume (an elastic restart): batches are a pure function
    of (seed, step) and tokens_per_step fixes the global batch, so grad_accum follows from the new world
    size. What is drawn per rank (dropout masks, SophiaG's sampled labels, LW-AS's curvature rows) then
    comes out otherwise, a statistically equivalent continuation rather than the same one."""
    if meta["world_size"] != rt.world_size:
        grad_accum = grad_accumulation(c, block_size, rt.world_size)
        rt.print0(
            f"resuming a run of {meta['world_size']} processes on {rt.world_size}: the same "
            f"{c.tokens_per_step:,} tokens per step, grad_accum {grad_accum}"
        )


@dataclasses.dataclass
class Start:
    """Where a run begins, found and checked by start() before the run touches out_dir."""

    model: GPT
    step: int = 0
    multipliers: dict[str, float] | None = None  # a fresh run measures (or computes) them once out_dir is held
    optimizer_state: dict | None = None
    resumed_from: str | None = None  # the checkpoint's folder
    changes: dict[str, tuple] | None = None  # what this resume changed (resume.check)
    # Which checkpoints are the run's (checkpoint.belongs): new for a fresh run, the checkpoint's on a resume.
    run_id: str | None = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)


def start(c: TrainConfig, rt, found: tuple[str, dict] | None, fingerprints: dict) -> Start:
    """The model and, on a resume, the multipliers, optimizer state and step of the newest checkpoint
    (`found`, verified), each checked against the config, so that a refused run leaves out_dir as it was."""
    if c.init_from == "resume" and found is None:
        raise ConfigError(f"init_from=resume, but {c.out_dir} holds no complete checkpoint")
    if c.init_from == "scratch" and found is not None:
        raise ConfigError(
            f"init_from=scratch, but {c.out_dir} already holds {found[0]}: resume it or choose another out_dir"
        )
    if c.init_from == "scratch" and checkpoint.complete_steps(c.out_dir):
        raise ConfigError(
            f"init_from=scratch, but {c.out_dir} already holds step folders, none of which verifies: move them out "
            "of it (they may hold what a disk error hid), or choose another out_dir"
        )
    computes_in = precision(rt.device, c.dtype)[0]
    changes = resume.check(c, found[1], found[0], fingerprints, rt.print0, computes_in) if found else None
    torch.manual_seed(c.seed)
    model = GPT(gpt_config(c)).to(rt.device)
    if found is None:
        if c.init_from not in INIT_MODES:  # a restart resumes from out_dir's checkpoints instead
            hf.load_weights(model, c.init_from)
            measured = (
                f"; lwlr measures at them over T={c.lwlr_T} batches (lwlr_init={c.lwlr_init}; fan_out "
                "re-initializes as the paper does)"
            )
            shape = model.config
            rt.print0(
                f"init_from: the weights of {c.init_from} ({shape.n_layer} layers, {shape.n_head} heads, width "
                f"{shape.n_embd}, block_size {shape.block_size})" + (measured if c.lr_rule in MEASURED_RULES else "")
            )
        return Start(model)
    path, meta = found  # multipliers come from the checkpoint: never re-measured on a resume
    say_world_size_change(c, meta, rt, model.config.block_size)
    checkpoint.restore_weights(model, path)
    optimizer_state = checkpoint.load_optimizer_state(path, meta)
    return Start(model, meta["step"], meta["multipliers"], optimizer_state, path, changes, meta.get("run_id"))


def finished(c: TrainConfig, rt, found: tuple[str, dict] | None, fingerprints: dict) -> bool:
    """Whether out_dir already holds this run finished (a checkpoint at max_steps and its export): then
    the run says so and how to go on, and leaves every file as it is."""
    if c.init_from == "scratch" or found is None or found[1]["step"] < c.max_steps:
        return False
    path, meta = found
    # other settings are refused as a resume's
    resume.check(c, meta, path, fingerprints, lambda line: None, precision(rt.device, c.dtype)[0])
    if not os.path.isfile(os.path.join(c.out_dir, "model.safetensors")):
        return False  # stopped before its export: the run writes it
    decay = f" --lr_decay_steps={meta['step']}" if c.schedule == "cosine" and not c.lr_decay_steps else ""
    rt.print0(
        f"{c.out_dir} holds a finished run: step {meta['step']} of max_steps={c.max_steps} ({path}); nothing to do, "
        f"no file changed. To train it further, run the same command with --max_steps=MORE{decay} "
        "--allow_resume_changes=max_steps"
        f"{' (so the cosine stays at min_lr past its end)' if decay else ''}; to "
        "start another run, give another --out_dir"
    )
    return True


@dataclasses.dataclass
class Plan:
    """A run checked and ready to begin: its config (the micro-batch fitted to the ranks), its val batches,
    its data's fingerprints, its optimizer's backend, where it begins, and the step folders it saw."""

    c: TrainConfig
    val_batches: TokenBatches
    fingerprints: dict
    backend: tuple[str, str]
    begin: Start
    steps_seen: list[int]


def checked(c: TrainConfig, rt) -> Plan | None:
    """Every check that can refuse the run, before out_dir is touched; None when out_dir holds this run
    finished (said, and every file left as it is)."""
    model_config = gpt_config(c)
    check_optimizer(c, rt)
    c = fit_micro_batch(c, model_config.block_size, rt.world_size, say=rt.print0)
    token_batches(c, "train", "train", model_config)
    val_batches = token_batches(c, "val", "val", model_config)
    fingerprints = resume.data_fingerprints(c)
    steps_seen = checkpoint.complete_steps(c.out_dir)
    found = verified_checkpoint(c, rt)  # verified once: a 1.5B run's checksums take a while
    if finished(c, rt, found, fingerprints):
        return None
    begin = start(c, rt, found, fingerprints)
    backend = choose_backend(c, rt)  # a failed self-check under optimizer_backend=triton stops here
    if rt.distributed:
        rt.print0(
            f"process group: {dist.get_backend()}, {rt.world_size} ranks; a collective that waits {c.dist_timeout} s "
            "for a rank ends the run, naming it (dist_timeout)"
        )
        rt.print0(memory.memory_line(begin.model.num_params(), c.optimizer, rt.world_size, c.parallel))
    elif c.parallel == "fsdp":
        rt.print0("parallel=fsdp applies under torchrun; a single process holds the whole model")
    return Plan(c, val_batches, fingerprints, backend, begin, steps_seen)


def verified_checkpoint(c: TrainConfig, rt) -> tuple[str, dict] | None:
    """out_dir's newest checkpoint that verifies, the ones that do not said; when it holds some and none
    verifies, the run is refused (init_from=scratch refuses any), never started over on top of them."""
    found, rejected = checkpoint.scan(c.out_dir)
    for path, error in rejected:
        rt.print0(checkpoint.skipped_line(path, error))
    if found is None and rejected and c.init_from != "scratch":
        raise checkpoint.none_verifies(c.out_dir, rejected)
    return found


def held(plan: Plan, rt) -> Plan:
    """The plan once out_dir is held: where another run saved since the checks, begin from its checkpoint
    instead, checked the same way (the same folders are not verified twice)."""
    begin, c = plan.begin, plan.c
    if checkpoint.complete_steps(c.out_dir) == plan.steps_seen:
        return plan
    begin = start(c, rt, verified_checkpoint(c, rt), plan.fingerprints)
    return dataclasses.replace(plan, begin=begin)


def say_precision(c: TrainConfig, rt) -> str:
    """The precision the run computes in, said; returned by name (bfloat16 or float32)."""
    chosen, why = precision(rt.device, c.dtype)
    said = "bf16 autocast, with fp32 weights, gradients, optimizer states and loss" if chosen == "bfloat16" else "fp32"
    rt.print0(f"precision: {said} ({why})")
    return chosen


def say_threads(rt) -> None:
    """On a CPU: the threads torch computes with and why, how they wait, and a warning if the machine is
    already busy."""
    if rt.device.type != "cpu":
        return
    count, why = rt.threads
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    rt.print0(f"threads: {count} ({why}; --threads or OMP_NUM_THREADS sets it), OMP_WAIT_POLICY={policy}")
    ranks_on_host = int(os.environ.get("LOCAL_WORLD_SIZE", rt.world_size))
    warning = threads.busy_warning(count, ranks_on_host)
    if warning:
        rt.print0(warning)


def record(c: TrainConfig, rt, begin: Start) -> None:
    """out_dir's records as of where the run begins: what killed writes left removed, config.json's history,
    and the log's records past the checkpoint dropped (the steps this run repeats: logged once only)."""
    if rt.is_main:
        checkpoint.remove_stale_temporaries(c.out_dir)
        resume.record_config(c.out_dir, c, begin.step, begin.changes)
        resume.trim_logs(c.out_dir, begin.step)


def announce(c: TrainConfig, rt, trainer: Trainer, log: RunLog, step: int, chosen_precision: str) -> None:
    """The lines that say what runs (the model, the batch, compilation, the optimizer) and the start record."""
    model = trainer.raw_model
    name = c.model if c.init_from in INIT_MODES else f"init_from={c.init_from}"
    rt.print0(
        f"{name}: {model.num_params():,} parameters | {c.tokens_per_step:,} tokens per step"
        f" = {c.micro_batch_size} batch"
        f" * {model.config.block_size} block * {trainer.split.micro_steps} accum * {rt.world_size} ranks"
        f" | {len(trainer.optimizer.param_groups)} param groups | {rt.device}"
    )
    compiling = "; compiling at the first step, which takes a while" if trainer.compiles_at_first_step else ""
    if trainer.compiled and not trainer.compiles_at_first_step:
        compiling = "; compiled by lwlr's measurement, which ran through the same graph"
    rt.print0(f"torch.compile: {'on' if trainer.compiled else 'off'} ({trainer.compile_reason}){compiling}")
    rt.print0(f"optimizer: {c.optimizer} on the {trainer.backend} path ({trainer.backend_reason})")
    log.record(
        "start",
        {
            "step": step,
            "config": c.as_dict(),
            "env": environment(rt.device),
            "grad_accum": trainer.split.micro_steps,
            "precision": chosen_precision,
            "compiled": trainer.compiled,
            "optimizer_backend": trainer.backend,
            "optimizer_backend_reason": trainer.backend_reason,
        },
    )
