"""What the training loop reports between log steps, and its guard against a diverging run: the mean
loss of the finite steps, the skipped ones, step time, throughput, MFU, memory and the time left, kept on
the device so that the only host syncs are on log steps; one log line of them."""

import time

import torch

from runtime.device import peak_flops, peak_memory_gib
from runtime.errors import UserError
from runtime.progress import duration
from training.config import TrainConfig

EXIT_DIVERGED = 3  # the run diverged: the same command would diverge again, so a scheduler must not requeue it


class DivergedError(UserError):
    """A run whose recent steps are all non-finite (max_bad_steps in a row, or every step it ran), or whose
    weights give a non-finite val loss: nothing of it is saved or exported."""

    exit_code = EXIT_DIVERGED
    same_on_every_rank = True  # the guard's flags are all-reduced: every rank decides alike


class StepStats:
    """What the loop reports between log steps: the mean loss of the finite steps, the skipped steps, time
    and throughput, and the guard's count of consecutive non-finite steps. Kept on the device, so the only
    host syncs are on log steps."""

    def __init__(self, rt, c: TrainConfig, flops_per_step: float):
        self.rt, self.c, self.flops_per_step, self.peak = rt, c, flops_per_step, peak_flops(rt.device)
        self.loss_sum, self.skipped = torch.zeros((), device=rt.device), torch.zeros((), device=rt.device)
        self.bad_run = torch.zeros((), device=rt.device)  # consecutive non-finite steps so far, and the longest run
        self.longest_bad_run = torch.zeros((), device=rt.device)
        self.loss_bad = torch.zeros((), dtype=torch.bool, device=rt.device)  # the last step's loss non-finite
        self.steps = 0  # in this log interval
        self.steps_run = 0  # by this process
        self.restart_timer()

    def restart_timer(self) -> None:
        """Time from here on (after a log line, an eval or a save, which the step time excludes). The
        interval's loss keeps counting: an eval between two log lines splits the timing, not the loss."""
        self.timed_steps, self.timer = 0, time.perf_counter()

    def add(self, step_loss, found_inf) -> None:
        self.loss_sum += torch.where(found_inf.bool(), 0.0, step_loss)
        self.skipped += found_inf
        self.bad_run.add_(1).mul_(found_inf)
        torch.maximum(self.longest_bad_run, self.bad_run, out=self.longest_bad_run)
        torch.logical_not(torch.isfinite(step_loss), out=self.loss_bad)
        self.steps += 1
        self.steps_run += 1
        self.timed_steps += 1

    def first_step_done(self) -> float:
        """The seconds this process's first step took (compilation, kernel builds, allocator warm-up: up to
        minutes), which ms/step then leaves out, as it does evals and saves."""
        self.loss_sum.item()  # waits for the step to finish
        seconds = time.perf_counter() - self.timer
        self.first_step_seconds, self.timed_steps, self.timer = seconds, 0, time.perf_counter()
        return seconds

    def interval(self, step: int) -> dict:
        """The interval's figures for the log (step: steps done so far), then a fresh interval."""
        skipped = int(self.skipped.item())
        good = self.steps - skipped
        if self.timed_steps:
            seconds = (time.perf_counter() - self.timer) / self.timed_steps
        else:  # an interval of the first step alone: its time is the only one there is
            seconds = self.first_step_seconds
        figures = {
            "loss": self.loss_sum.item() / good if good else float("nan"),
            "ms_per_step": 1000 * seconds,
            "tokens_per_s": self.c.tokens_per_step / seconds,
            "mfu": self.flops_per_step / seconds / (self.peak * self.rt.world_size) if self.peak else None,
            "peak_mem_gib": peak_memory_gib(self.rt.device),
            "skipped_steps": skipped,
            "seconds_left": seconds * (self.c.max_steps - step),
        }  # steps only: evals and saves come on top
        self.loss_sum.zero_(), self.skipped.zero_()
        self.steps = 0
        return figures

    def line(self, r: dict) -> str:
        mfu = f" | MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
        skipped = f" | skipped {r['skipped_steps']} non-finite" if r["skipped_steps"] else ""
        left = f" | {duration(r['seconds_left'])} left" if r["step"] < self.c.max_steps else ""
        return (
            f"step {r['step']:>6}/{self.c.max_steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e}"
            f" | grad_norm {r['grad_norm']:.3f} | {r['ms_per_step']:.0f} ms/step"
            f" | {r['tokens_per_s']:,.0f} tok/s{mfu} | mem {r['peak_mem_gib']:.2f} GiB{skipped}{left}"
        )

    def last_step_bad(self) -> bool:
        return self.bad_run.item() > 0  # the same on every rank: the guard's flag was all-reduced

    def check_bad_steps(self, step: int, standing, at_end: bool = False) -> None:
        """DivergedError once max_bad_steps steps in a row were non-finite, and at the run's end (at_end) when
        its last steps were: a run whose final steps were all skipped did not train to its end, however few
        they were. standing(): which checkpoint stands, said (Trainer.standing)."""
        bad_run = int(self.bad_run.item())
        if self.longest_bad_run.item() < self.c.max_bad_steps and not (at_end and bad_run > 0):
            return
        run = max(bad_run, int(self.longest_bad_run.item()))
        what = "loss" if self.loss_bad.item() else "gradient norm (the loss was finite)"
        before_first = step - bad_run  # the last finite step, or where this process began
        if bad_run < run:  # the longest run ended within the log interval
            cause = "the steps after it were finite again"
        elif before_first > step - self.steps_run:  # a finite step came first: its update made the weights diverge
            cause = f"the update at step {before_first} left weights whose {what} is not finite"
        else:
            cause = f"the starting weights give a non-finite {what} (check the init_from weights, the data)"
        raise DivergedError(
            f"the run diverged: {run} consecutive steps up to step {step} were non-finite and skipped "
            f"(max_bad_steps={self.c.max_bad_steps}); {cause}. Nothing more is saved or exported; {standing()}. Try "
            "a lower lr, a longer warmup_steps or grad_clip, or check the multipliers (lwlr.json)"
        )
