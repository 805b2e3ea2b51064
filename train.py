"""Pretrain GPT-2 from scratch: one CPU or GPU, or many GPUs through torchrun (DDP, or FSDP2).

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
as it gets (the global batch is tokens_per_step), refusing changed settings or data (training/resume.py).
SIGTERM, SIGINT, SIGHUP or SIGUSR1 saves a checkpoint within a step, an eval cut short, and exits with
code 75 (EX_TEMPFAIL: try again); before the first step is done it exits 75 at once, saving nothing
(launch.py carries the 75 through torchrun). One run at a time holds an out_dir (training/outdir.py); a
full disk ends the run with code 74. docs/architecture.md says how the code fits together.

This file is the command line and the loop; what the loop runs is training/ (the Trainer and its step,
where a run begins, checkpoints), optimizers/ and runtime/ (ranks, devices, signals).
"""

import sys

from runtime import threads
from runtime.exits import check_before_imports, run_main
from training.config import parse_config

if __name__ == "__main__":
    # A bad flag or config file is refused before torch loads (its import takes seconds, many more on a
    # busy machine); main() parses the same arguments again, in microseconds.
    check_before_imports(lambda: parse_config(sys.argv[1:]))
threads.before_torch()  # OpenMP reads its wait policy once, as torch loads

import math
import os
import time

from tqdm import tqdm

import multipliers
from eval import evaluate, loss_only
from runtime.progress import duration, heartbeat
from runtime.ranks import init_runtime
from runtime.signals import EXIT_PREEMPTED, Preempted, StopRequest, StopVote
from training import checkpoint, outdir, start, summary
from training.build import pretrained, shared_compiled_model
from training.layer_stats import LayerStats
from training.metrics import DivergedError, StepStats
from training.runlog import RunLog
from training.trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    c = pretrained(parse_config(argv))
    rt = init_runtime(c.device, c.dist_timeout, c.threads)
    if c.eval_only:
        return loss_only(c, rt)
    stop = StopRequest()
    try:
        plan = start.checked(c, rt)  # every check that can refuse the run; None: out_dir holds it, finished
        if plan is None:
            return 0
        if not plan.begin.resumed_from:
            multipliers.check_source(plan.c, plan.begin.model)  # an lwlr_file that cannot serve the model
        outdir.prepare(c.out_dir)
        with outdir.exclusive(c.out_dir, rt):
            return run(start.held(plan, rt), rt, stop)
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
    except RuntimeError as e:  # a rank lost in a collective no waiting_for_ranks names (the lwlr measurement's)
        lost = rt.vanished(e, "a collective")
        if lost is None:
            raise
        raise lost from None
    finally:
        stop.immediate = False  # a signal after the run is no longer the run's to act on


def run(plan: start.Plan, rt, stop: StopRequest) -> int:
    """The run in an out_dir this process holds: measure or resume, train, evaluate, save, export, and say
    what it did."""
    c, begin = plan.c, plan.begin
    began = time.perf_counter()
    chosen_precision = start.say_precision(c, rt)
    start.say_threads(rt)
    compiled_model = shared_compiled_model(c, rt, begin.model)  # compiled once: lwlr's probe and the steps
    if begin.resumed_from:  # multipliers come from the checkpoint: never re-measured on a resume
        rt.print0(f"resuming from {begin.resumed_from} at step {begin.step}")
        layer_multipliers, measured, compiled_in = begin.multipliers, 0.0, None
    else:
        layer_multipliers, compiled_in = multipliers.for_run(c, rt, begin.model, compiled_model)
        measured = time.perf_counter() - began
    trainer = Trainer(
        c, rt, begin.model, layer_multipliers, begin.optimizer_state, plan.backend, begin.run_id, compiled_model
    )
    trainer.compiles_at_first_step = trainer.compiled and compiled_in is None
    start.record(c, rt, begin)
    # A progress bar on a terminal (rank 0); log lines are written above it.
    on_terminal = rt.is_main and sys.stdout.isatty()
    bar = tqdm(total=c.max_steps, initial=begin.step, unit="step", dynamic_ncols=True, disable=not on_terminal)
    log = RunLog(rt, c.out_dir, c.logger, c.as_dict(), c.wandb_project, echo=bar.write if on_terminal else print)
    start.announce(c, rt, trainer, log, begin.step, chosen_precision)
    stats = StepStats(rt, c, trainer.raw_model.flops_per_token() * c.tokens_per_step)
    step, stopped_during = train_loop(c, rt, trainer, plan.val_batches, log, stats, StopVote(rt, stop), bar, begin.step)
    if stopped_during:
        lost = " (its val loss is not recorded: the eval was cut short)" if stopped_during == "eval" else ""
        rt.print0(
            f"stop ({stop.reason}) at step {step}, during {stopped_during}{lost}: saving, then exit {EXIT_PREEMPTED}"
        )
        # came_after_step: the steps done when the signal came; a stop is answered within one (two under torchrun)
        said = {"step": step, "reason": stop.reason, "during": stopped_during, "came_after_step": stop.came_after_step}
        log.record("stop", said)
        trainer.save(step, "stop requested", stats.last_step_bad())
    trainer.wait_for_save()  # fsdp's saves land in the background: the last one, and the stop's, before the exit
    bar.close()
    log.close()
    if stopped_during:
        return EXIT_PREEMPTED
    exported = trainer.full_model()
    if rt.is_main:  # the weights alone, tied wte / lm_head stored once: for sharing and for other tools
        checkpoint.export_safetensors(exported, os.path.join(c.out_dir, "model.safetensors"))
        first = getattr(stats, "first_step_seconds", 0.0)
        # The run's compile, once, wherever it came: lwlr's first batch, or the first step.
        in_lwlr = compiled_in or 0.0
        at_first_step = first if trainer.compiles_at_first_step else 0.0
        seconds = {
            "compile": in_lwlr + at_first_step,
            "lwlr measurement": measured - in_lwlr,
            "first step": first - at_first_step,
            "steps, evals, saves": time.perf_counter() - began - measured - first,
        }
        done = summary.summarize(c, begin.step, step, seconds, trainer.run_id)
        summary.write(c.out_dir, done)
        rt.print0(summary.block(done))
    return 0


def train_loop(c, rt, trainer: Trainer, val_batches, log: RunLog, stats: StepStats, vote, bar, step: int):
    """Steps from `step` to max_steps, each logged, evaluated and saved at its interval. Returns the step
    reached and, when a stop signal came first, where it came ("training" or "eval"), else None."""
    first_step = vote.stop.steps_done = step
    evaluated = False
    layer_stats = LayerStats(trainer.raw_model) if c.layer_stats_interval else None
    while step < c.max_steps:
        compiling = trainer.compiles_at_first_step and step == first_step
        with heartbeat("torch.compile: compiling", enabled=compiling and rt.is_main):
            with rt.waiting_for_ranks(f"step {step + 1}'s gradient and loss all-reduces"):
                stats_step = layer_stats is not None and (step + 1) % c.layer_stats_interval == 0
                lr, step_loss, grad_norm, found_inf, layers = trainer.step(step, layer_stats if stats_step else None)
        if layers is not None:
            log.layers(layers)
        stats.add(step_loss, found_inf)
        step += 1
        vote.stop.steps_done = step
        bar.update(1)
        if step == first_step + 1:
            first_step_done(c, rt, trainer, stats, vote)
        last = step == c.max_steps
        if step % c.log_interval == 0 or last:
            record = {
                "step": step,
                **stats.interval(step),
                "lr": lr,
                "grad_norm": grad_norm.item(),
                **trainer.optimizer.log_values(),
            }
            log.record("train", record, stats.line(record))
            stats.check_bad_steps(step, trainer.standing)
            stats.restart_timer()
        if vote.poll(f"step {step}"):
            return step, "training"
        if step % c.eval_interval == 0 or last:
            compiles = trainer.compiled and not evaluated  # the first eval compiles its own graph
            val_loss, evaluated = evaluate(trainer.model, val_batches, c, rt, trainer.ctx, vote, compiles), True
            if val_loss is None:
                return step, "eval"
            log.record("eval", {"step": step, "val_loss": val_loss}, f"step {step:>6} | val loss {val_loss:.4f}")
            if not math.isfinite(val_loss):
                raise DivergedError(
                    f"the run diverged: the val loss at step {step} is {val_loss}, so the weights give non-finite "
                    f"outputs. Nothing more is saved or exported; {trainer.standing()}. Try a lower lr, a longer "
                    "warmup_steps or grad_clip"
                )
            trainer.save(step, "eval", stats.last_step_bad())
            stats.restart_timer()
    stats.check_bad_steps(step, trainer.standing, at_end=True)
    return step, None


def first_step_done(c, rt, trainer: Trainer, stats: StepStats, vote: StopVote) -> None:
    """From here on a stop saves first, within a step (vote.poll). The first step's time (a compile) is
    said and left out of ms/step; the optimizer's state now exists, so the checkpoint's size is known."""
    vote.stop.immediate = False
    seconds = stats.first_step_done()
    if trainer.compiles_at_first_step:
        rt.print0(f"torch.compile: compiled in {duration(seconds)} (the first step, which ms/step leaves out)")
    if rt.is_main:
        warning = outdir.space_warning(c.out_dir, trainer.checkpoint_bytes(), c.keep_last)
        if warning:
            rt.print0(warning)


if __name__ == "__main__":
    run_main(main)
