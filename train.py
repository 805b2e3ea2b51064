"""Pretrain GPT-2 from scratch: one CPU or GPU, or many GPUs through torchrun (DDP, or FSDP2: parallel.py).

    python train.py                                   # small GPT on Shakespeare, CPU or GPU, ~5 min on 2 cores
    python train.py config/train_gpt2.py              # GPT-2 124M on OpenWebText, one GPU
    python train.py config/finetune_shakespeare.py --init_from=hf/gpt2   # fine-tune a Hugging Face GPT-2 directory
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py --model=gpt2-xl --parallel=fsdp
    # two nodes (run on each, NODE_RANK 0 and 1; MASTER the first node's address):
    torchrun --nnodes=2 --node_rank=$NODE_RANK --nproc_per_node=8 --rdzv_backend=c10d \
        --rdzv_endpoint=$MASTER:29500 train.py config/train_gpt2.py
    python train.py --help                            # every config key with its meaning

A run writes out_dir/config.json, out_dir/log.jsonl (one JSON record per log line) and checkpoints in
out_dir/step-XXXXXXXX/. Started again with the same out_dir it resumes from the newest complete
checkpoint (init_from=auto), so a torchrun restart continues where it stopped, on as many processes
as it gets (the global batch is tokens_per_step), refusing changed settings or data (resume.py).
SIGTERM, SIGINT, SIGHUP or SIGUSR1 saves a checkpoint within a step, an eval cut short, and exits with
code 75 (EX_TEMPFAIL: try again); before the first step is done it exits 75 at once, saving nothing
(launch.py carries the 75 through torchrun). One run at a time holds an out_dir (outdir.py); a full
disk ends the run with code 74.
"""

import contextlib
import dataclasses
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
import hf
import kernel_check
import lwas
import multipliers
import optim
import outdir
import parallel
import resume
from build import (
    build_optimizer,
    compiles,
    fit_micro_batch,
    gpt_config,
    grad_accumulation,
    lr_at,
    pretrained,
    token_batches,
)
from data.loader import TokenBatches
from eval import loss_only
from metrics import StepStats, lw_step_sizes
from model import GPT
from progress import Progress, duration, heartbeat
from runtime import (
    EXIT_PREEMPTED,
    Preempted,
    RunLog,
    StopRequest,
    StopVote,
    autocast,
    cache_dir,
    environment,
    init_runtime,
    precision,
    run_main,
)
from train_config import INIT_MODES, ConfigError, TrainConfig, parse_config


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


@torch.no_grad()
def evaluate(model, batches: TokenBatches, c: TrainConfig, rt, ctx, vote: StopVote | None = None) -> float | None:
    """Mean loss over the same eval_steps val batches every time, split across ranks; None when a stop
    (vote) came first: an eval of hundreds of batches must not outlast a scheduler's grace period."""
    model.eval()
    total = torch.zeros((), device=rt.device)
    with Progress("eval", c.eval_steps, "batches", enabled=rt.is_main) as progress:  # speaks only if it takes a while
        for i in range(c.eval_steps):
            if vote is not None and vote.poll(f"eval batch {i}"):
                model.train()
                return None
            rows = c.micro_batch_size
            x, y = batches.get(i, rows * rt.world_size, rt.rank * rows, rows, rt.device)
            with ctx:
                _, loss = model(x, y)
            total += loss.float()
            progress.update()
    if rt.distributed:
        with rt.waiting_for_ranks("the all-reduce of the val loss"):
            dist.all_reduce(total, op=dist.ReduceOp.AVG)
    model.train()
    return total.item() / c.eval_steps


class Trainer:
    """The model, its optimizer, and one optimizer step: what the loop below and bench/bench_train.py run."""

    def __init__(
        self,
        c: TrainConfig,
        rt,
        model: GPT,
        lr_multipliers: dict[str, float] | None,
        optimizer_state: dict | None = None,
        backend: tuple[str, str] | None = None,
    ):
        self.c, self.rt, self.raw_model = c, rt, model  # raw_model: uncompiled, unwrapped; what checkpoints hold
        self.lr_multipliers = lr_multipliers  # saved with every checkpoint: a resume never re-measures
        self.grad_accum = grad_accumulation(c, model.config.block_size, rt.world_size)
        self.global_rows = c.micro_batch_size * self.grad_accum * rt.world_size
        self.train_batches = token_batches(c, "train", "train", model.config, c.data_subset_batches)
        self.data_fingerprints = resume.data_fingerprints(c)
        self.sharded = parallel.shards(c, rt)
        self.compiled, self.compile_reason = compiles(c, rt.device, model.config.vocab_size)
        if self.sharded:  # before the optimizer: fully_shard replaces every parameter by its DTensor
            parallel.fully_shard_gpt(model, rt.device, compile_blocks=self.compiled)
        groups = optim.param_groups(model, lr_multipliers, c.weight_decay, c.lwlr_scale_decay)
        self.backend, self.backend_reason = backend or choose_backend(c, rt)
        self.optimizer = build_optimizer(c, groups, model.config.n_head, self.backend)
        if optimizer_state is not None:  # lr_scale comes back with the param groups
            if self.sharded:  # a checkpoint holds full tensors: this rank's shard of each
                optimizer_state = parallel.shard_optimizer_state(optimizer_state, self.optimizer)
            self.optimizer.load_state_dict(optimizer_state)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ctx = autocast(rt.device, c.dtype)
        self.found_inf = torch.zeros((), device=rt.device)
        if rt.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast
            torch.backends.cudnn.allow_tf32 = True
        self.model = model
        if self.compiled and self.sharded:
            self.compile_reason += "; under fsdp each block is compiled on its own, between the all-gathers"
        elif self.compiled:
            self.model = torch.compile(self.model)
        if rt.distributed and not self.sharded:
            self.model = DDP(self.model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)

    def save(self, step: int, reason: str, last_step_bad: bool) -> None:
        """A checkpoint of the state after `step` steps (rank 0 writes, every rank waits), unless the last
        step was non-finite: then the previous checkpoint stands."""
        c, rt = self.c, self.rt
        if last_step_bad:
            rt.print0(
                f"not saving at step {step} ({reason}): the last step was non-finite; the previous checkpoint stands"
            )
            return
        if self.sharded:  # every rank gathers, shard by shard; rank 0 keeps the full tensors
            tensors = {
                "model": parallel.full_model_state(self.raw_model, keep=rt.is_main),
                "optimizer": parallel.full(self.optimizer.state_dict(), keep=rt.is_main),
            }
        else:
            tensors = {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict()}
        if rt.is_main:
            meta = {
                "config": dataclasses.asdict(c),
                "world_size": rt.world_size,
                "lr_multipliers": self.lr_multipliers,
                "data": {"seed": c.seed, "next_step": step},
                "data_fingerprints": self.data_fingerprints,  # a resume on other token files is refused
            }
            rt.print0(f"saved {checkpoint.save(c.out_dir, step, tensors, meta, c.keep_last)} ({reason})")
        if rt.distributed:
            with rt.waiting_for_ranks(f"the barrier after the save at step {step}"):
                dist.barrier()

    def full_model(self) -> GPT | None:
        """The whole model on rank 0 (None elsewhere): under fsdp gathered from every rank's shards, which
        every rank takes part in."""
        if not self.sharded:
            return self.raw_model
        weights = parallel.full_model_state(self.raw_model, keep=self.rt.is_main)
        if not self.rt.is_main:
            return None
        model = GPT(self.raw_model.config).to(next(iter(weights.values())).dtype)
        model.load_state_dict(weights)
        return model

    def checkpoint_bytes(self) -> int:
        """What one checkpoint of this model and optimizer takes on disk (its tensors; once the optimizer's
        state exists, after the first step)."""
        return checkpoint.tensor_bytes({"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict()})

    def sync_context(self, sync: bool):
        """DDP all-reduces (fsdp reduce-scatters) gradients only on the last accumulation micro-step."""
        if sync or not self.rt.distributed:
            return contextlib.nullcontext()
        return parallel.gradient_sync(self.model, False) if self.sharded else self.model.no_sync()

    def step(self, step: int):
        """Optimizer step number `step` (0-based): (lr, mean loss, grad norm, found_inf), all on the device
        but lr; a non-finite loss or gradient norm skips the update on every rank."""
        c, rt = self.c, self.rt
        lr = lr_at(step, c)
        optim.set_lr(self.optimizer, lr)  # the schedule's rate, each group's lr_scale applied (optim.py)
        # Dropout and sampled labels draw from an RNG seeded by (seed, step, rank): a resume needs no RNG state.
        torch.manual_seed(c.seed + 1_000_003 * step + rt.rank)
        rows = c.micro_batch_size  # this rank's micro-steps hold rows (rank * grad_accum + micro) * rows onward
        micro_batches = [
            self.train_batches.get(step, self.global_rows, (rt.rank * self.grad_accum + micro) * rows, rows, rt.device)
            for micro in range(self.grad_accum)
        ]
        step_loss = torch.zeros((), device=rt.device)
        for micro, (x, y) in enumerate(micro_batches):
            with self.ctx, self.sync_context(micro == self.grad_accum - 1):
                _, loss = self.model(x, y)
                (loss / self.grad_accum).backward()
            step_loss += loss.detach().float() / self.grad_accum
        if rt.distributed:  # the guard below must agree on every rank
            dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
        max_norm = c.grad_clip if c.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)
        if self.sharded:  # the norm over every rank's shards, the same on each
            grad_norm = grad_norm.full_tensor()
        # The fused steps read found_inf on the device: no host sync.
        torch.logical_not(torch.isfinite(step_loss + grad_norm), out=self.found_inf)
        self.optimizer.found_inf = self.found_inf
        # What an optimizer needs around its update (SophiaG's Hessian refresh, LW-AS's curvature) it takes
        # from this step's context.
        context = optim.StepContext(
            self.model,
            self.raw_model,
            micro_batches,
            self.ctx,
            self.sync_context,
            lwas.all_reduce_mean if rt.distributed else None,
            self.found_inf,
            self.sharded,
        )
        self.optimizer.before_step(step, context)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.after_step(step, context)
        return lr, step_loss, grad_norm, self.found_inf


def choose_backend(c: TrainConfig, rt) -> tuple[str, str]:
    """The optimizer's backend and why, after the kernels' self-check where it applies (kernel_check.py)."""

    def make_optimizer(groups, backend):  # the run's optimizer over the self-check's tensors
        return build_optimizer(c, groups, kernel_check.N_HEAD, backend)

    return kernel_check.choose_backend(c, rt.device, make_optimizer, cache_dir(), say=rt.print0)


@dataclasses.dataclass
class Start:
    """Where a run begins, found and checked by start() before the run touches out_dir."""

    model: GPT
    step: int = 0
    lr_multipliers: dict[str, float] | None = None  # a fresh run measures (or computes) them once out_dir is held
    optimizer_state: dict | None = None
    resumed_from: str | None = None  # the checkpoint's folder
    changes: dict[str, tuple] | None = None  # what this resume changed (resume.check)


def start(c: TrainConfig, rt, found: tuple[str, dict] | None, fingerprints: dict) -> Start:
    """The model and, on a resume, the multipliers, optimizer state and step of the newest checkpoint
    (`found`, verified), each checked against the config, so that a refused run leaves out_dir as it was."""
    if c.init_from == "resume" and found is None:
        raise ConfigError(f"init_from=resume, but {c.out_dir} holds no complete checkpoint")
    if c.init_from == "scratch" and found is not None:
        raise ConfigError(
            f"init_from=scratch, but {c.out_dir} already holds {found[0]}: resume it or choose another out_dir"
        )
    changes = resume.check(c, found[1], found[0], fingerprints, say=rt.print0) if found else None
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
                f"{shape.n_embd}, block_size {shape.block_size})" + (measured if c.lr_rule == "lwlr" else "")
            )
        if c.lr_rule == "lwlr" and c.lwlr_file:
            multipliers.load_multipliers(c.lwlr_file, model)  # checked now; read again once out_dir is held
        return Start(model)
    path, meta = found  # multipliers come from the checkpoint: never re-measured on a resume
    say_world_size_change(c, meta, rt, model.config.block_size)
    checkpoint.restore_weights(model, path)
    optimizer_state = checkpoint.load_tensors(path, "optimizer")
    return Start(model, meta["step"], meta["lr_multipliers"], optimizer_state, path, changes)


def finished(c: TrainConfig, rt, found: tuple[str, dict] | None, fingerprints: dict) -> bool:
    """Whether out_dir already holds this run finished (a checkpoint at max_steps and its export): then
    the run says so and how to go on, and leaves every file as it is."""
    if c.init_from == "scratch" or found is None or found[1]["step"] < c.max_steps:
        return False
    path, meta = found
    resume.check(c, meta, path, fingerprints, say=lambda line: None)  # other settings are refused as a resume's
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


def main(argv: list[str] | None = None) -> int:
    c = pretrained(parse_config(argv))
    rt = init_runtime(c.device, c.dist_timeout)
    if c.eval_only:
        return loss_only(c, rt, evaluate)
    stop = StopRequest()
    try:
        return checked_then_run(c, rt, stop)
    except Preempted as reason:
        rt.print0(
            f"{reason} before the first step was done: stopped at once, nothing saved; the same command starts again"
        )
        return EXIT_PREEMPTED
    except OSError as e:  # a write no file-specific handler caught (log.jsonl, tensorboard, a checkpoint)
        problem = outdir.write_failure(e, c.out_dir)
        if problem is None:
            raise
        raise problem from None
    finally:
        stop.immediate = False  # a signal after the run is no longer the run's to act on


def checked_then_run(c: TrainConfig, rt, stop: StopRequest) -> int:
    """Every check that can refuse the run, then the run in out_dir, held alone. A refused run leaves
    out_dir as it found it, byte for byte."""
    model_config = gpt_config(c)
    parallel.check(c, rt)
    c = fit_micro_batch(c, model_config.block_size, rt.world_size, say=rt.print0)
    token_batches(c, "train", "train", model_config)
    val_batches = token_batches(c, "val", "val", model_config)
    fingerprints = resume.data_fingerprints(c)
    found = checkpoint.latest(c.out_dir, report=rt.print0)  # verified once: a 1.5B run's checksums take a while
    if finished(c, rt, found, fingerprints):
        return 0
    begin = start(c, rt, found, fingerprints)
    backend = choose_backend(c, rt)  # a failed self-check under optimizer_backend=triton stops here
    if rt.distributed:
        rt.print0(
            f"process group: {dist.get_backend()}, {rt.world_size} ranks; a collective that waits {c.dist_timeout} s "
            "for a rank ends the run, naming it (dist_timeout)"
        )
        rt.print0(parallel.memory_line(begin.model.num_params(), c.optimizer, rt.world_size, c.parallel))
    elif c.parallel == "fsdp":
        rt.print0("parallel=fsdp applies under torchrun; a single process holds the whole model")
    outdir.prepare(c.out_dir)
    with outdir.exclusive(c.out_dir, rt):
        if checkpoint.complete_steps(c.out_dir)[:1] != ([begin.step] if begin.resumed_from else []):
            # another run saved since the checks: begin from its checkpoint instead, checked the same way
            begin = start(c, rt, checkpoint.latest(c.out_dir, report=rt.print0), fingerprints)
        return run(c, rt, stop, val_batches, backend, begin)


def run(
    c: TrainConfig, rt, stop: StopRequest, val_batches: TokenBatches, backend: tuple[str, str], begin: Start
) -> int:
    """The run in an out_dir this process holds: measure or resume, train, evaluate, save."""
    chosen, why = precision(rt.device, c.dtype)
    said = "bf16 autocast, with fp32 weights, gradients, optimizer states and loss" if chosen == "bfloat16" else "fp32"
    rt.print0(f"precision: {said} ({why})")
    model, step, lr_multipliers = begin.model, begin.step, begin.lr_multipliers
    if begin.resumed_from:
        rt.print0(f"resuming from {begin.resumed_from} at step {step}")
    else:
        lwlr_batches = token_batches(c, "train", "lwlr", model.config)
        ctx = autocast(rt.device, c.dtype)
        lr_multipliers, lwlr_report = multipliers.for_config(c, model, lwlr_batches, ctx, log=rt.print0)
        if rt.is_main and lwlr_report is not None:
            multipliers.save_report(lwlr_report, c.out_dir)
    trainer = Trainer(c, rt, model, lr_multipliers, begin.optimizer_state, backend)
    if rt.is_main:
        checkpoint.remove_stale_temporaries(c.out_dir)
        resume.record_config(c.out_dir, c, step, begin.changes)
        resume.trim_log(c.out_dir, step)  # the steps this run repeats were logged before a kill: once only

    # A progress bar on a terminal (rank 0); log lines are written above it.
    on_terminal = rt.is_main and sys.stdout.isatty()
    bar = tqdm(total=c.max_steps, initial=step, unit="step", dynamic_ncols=True, disable=not on_terminal)
    log = RunLog(
        rt, c.out_dir, c.logger, dataclasses.asdict(c), c.wandb_project, echo=bar.write if on_terminal else print
    )
    name = c.model if c.init_from in INIT_MODES else f"init_from={c.init_from}"
    rt.print0(
        f"{name}: {model.num_params():,} parameters | {c.tokens_per_step:,} tokens per step"
        f" = {c.micro_batch_size} batch"
        f" * {model.config.block_size} block * {trainer.grad_accum} accum * {rt.world_size} ranks"
        f" | {len(trainer.optimizer.param_groups)} param groups | {rt.device}"
    )
    compiling = "; compiling at the first step, which takes a while" if trainer.compiled else ""
    rt.print0(f"torch.compile: {'on' if trainer.compiled else 'off'} ({trainer.compile_reason}){compiling}")
    rt.print0(f"optimizer: {c.optimizer} on the {trainer.backend} path ({trainer.backend_reason})")
    log.record(
        "start",
        {
            "step": step,
            "config": dataclasses.asdict(c),
            "env": environment(rt.device),
            "grad_accum": trainer.grad_accum,
            "precision": chosen,
            "compiled": trainer.compiled,
            "optimizer_backend": trainer.backend,
            "optimizer_backend_reason": trainer.backend_reason,
        },
    )

    stats = StepStats(rt, c, model.flops_per_token() * c.tokens_per_step)
    vote = StopVote(rt, stop)

    def stopped(at: int, during: str) -> int:
        """Save the state after step `at` and exit 75, saying what a stop during an eval did not record."""
        lost = " (its val loss is not recorded: the eval was cut short)" if during == "eval" else ""
        rt.print0(f"stop ({stop.reason}) at step {at}, during {during}{lost}: saving, then exit {EXIT_PREEMPTED}")
        log.record("stop", {"step": at, "reason": stop.reason, "during": during})
        trainer.save(at, "stop requested", stats.last_step_bad())
        bar.close()
        log.close()
        return EXIT_PREEMPTED

    first_step = step
    while step < c.max_steps:
        with heartbeat("torch.compile: compiling", enabled=trainer.compiled and rt.is_main and step == first_step):
            with rt.waiting_for_ranks(f"step {step + 1}'s gradient and loss all-reduces"):
                lr, step_loss, grad_norm, found_inf = trainer.step(step)
        stats.add(step_loss, found_inf)
        step += 1
        bar.update(1)
        if step == first_step + 1:
            stop.immediate = False  # from here on a stop saves first, within a step (vote.poll)
            seconds = stats.first_step_done()
            if trainer.compiled:
                rt.print0(f"torch.compile: compiled in {duration(seconds)} (the first step, which ms/step leaves out)")
            if rt.is_main:  # the optimizer's state now exists: the checkpoint's size is known
                warning = outdir.space_warning(c.out_dir, trainer.checkpoint_bytes(), c.keep_last)
                if warning:
                    rt.print0(warning)

        last = step == c.max_steps
        if step % c.log_interval == 0 or last:
            record = {
                "step": step,
                **stats.interval(step),
                "lr": lr,
                "grad_norm": grad_norm.item(),
                **lw_step_sizes(trainer.optimizer),
            }
            log.record("train", record, stats.line(record))
            stats.check_bad_steps(step)
            stats.restart_timer()
        if vote.poll(f"step {step}"):
            return stopped(step, "training")
        if step % c.eval_interval == 0 or last:
            val_loss = evaluate(trainer.model, val_batches, c, rt, trainer.ctx, vote)
            if val_loss is None:
                return stopped(step, "eval")
            log.record("eval", {"step": step, "val_loss": val_loss}, f"step {step:>6} | val loss {val_loss:.4f}")
            trainer.save(step, "eval", stats.last_step_bad())
            stats.restart_timer()
    bar.close()
    log.close()
    exported = trainer.full_model()
    if rt.is_main:  # the weights alone, tied wte / lm_head stored once: for sharing and for other tools
        checkpoint.export_safetensors(exported, os.path.join(c.out_dir, "model.safetensors"))
    return 0


if __name__ == "__main__":
    run_main(main)
