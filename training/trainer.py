"""The model, its optimizer, and one optimizer step: what train.py's loop runs, and the benchmarks and the
overfit sweeps with it. Also its checkpoint (the state after a step) and the whole model for export.
"""

import contextlib

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model import GPT
from optimizers import base, self_check
from runtime import fsdp
from runtime.device import autocast, precision
from runtime.files import cache_dir
from runtime.ranks import all_reduce_mean
from training import checkpoint, resume
from training.build import batch_split, build_optimizer, compiles, lr_at, shards, token_batches
from training.config import TrainConfig
from training.layer_stats import LayerStats
from training.sharded import ShardedSaver


class Trainer:
    """The model, its optimizer, and one optimizer step."""

    def __init__(
        self,
        c: TrainConfig,
        rt,
        model: GPT,
        multipliers: dict[str, float] | None,
        optimizer_state: dict | None = None,
        backend: tuple[str, str] | None = None,
        run_id: str | None = None,
        compiled_model: torch.nn.Module | None = None,
    ):
        """compiled_model: torch.compile(model) already made (training.build.shared_compiled_model, which
        lwlr's measurement ran through), used where the run compiles the whole model."""
        self.c, self.rt, self.raw_model = c, rt, model  # raw_model: uncompiled, unwrapped; what checkpoints hold
        self.run_id = run_id  # in every checkpoint: retention removes the run's own alone
        self.multipliers = multipliers  # saved with every checkpoint: a resume never re-measures
        self.split = batch_split(c, model.config.block_size, rt.world_size)  # which rows a rank and micro-step take
        self.train_batches = token_batches(c, "train", "train", model.config, c.data_subset_batches)
        self.data_fingerprints = resume.data_fingerprints(c)
        self.sharded = shards(c, rt)
        self.compiled, self.compile_reason = compiles(c, rt.device, model.config.vocab_size)
        if self.sharded:  # before the optimizer: fully_shard replaces every parameter by its DTensor
            fsdp.fully_shard_model(model, model.transformer.h, rt.device, compile_units=self.compiled)
        self.saver = ShardedSaver(rt, c.out_dir) if self.sharded else None  # a collective: its process group
        groups = base.param_groups(model, multipliers, c.weight_decay, c.lwlr_scale_decay)
        self.backend, self.backend_reason = backend or choose_backend(c, rt)
        self.optimizer = build_optimizer(c, groups, model.config.n_head, self.backend)
        if optimizer_state is not None:  # each group's multiplier comes back with the param groups
            if self.sharded:  # a checkpoint holds full tensors: this rank's shard of each
                optimizer_state = fsdp.shard_optimizer_state(optimizer_state, self.optimizer)
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
            self.model = compiled_model if compiled_model is not None else torch.compile(self.model)
        # Whether the first step compiles; False where lwlr's measurement already ran compiled_model (train.py).
        self.compiles_at_first_step = self.compiled
        if rt.distributed and not self.sharded:
            self.model = DDP(self.model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)

    def save(self, step: int, reason: str, last_step_bad: bool) -> None:
        """A checkpoint of the state after `step` steps, unless the last step was non-finite: then the previous
        checkpoint stands, if there is one. Under fsdp every rank writes its shards in the background
        (training/sharded.py: wait_for_save); otherwise rank 0 writes a full one and every rank waits."""
        c, rt = self.c, self.rt
        if last_step_bad:
            rt.print0(f"not saving at step {step} ({reason}): the last step was non-finite; {self.standing()}")
            return
        meta = self.meta(step) if rt.is_main else None
        if self.sharded:
            model_state = self.raw_model.state_dict(keep_vars=True)  # the tied embedding one tensor, stored once
            with rt.waiting_for_ranks(f"the save in flight, before the save at step {step}"):
                self.saver.save(step, model_state, self.optimizer.state_dict(), meta, c.keep_last, reason)
            return
        if rt.is_main:
            tensors = {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict()}
            path = checkpoint.save(c.out_dir, step, tensors, meta, c.keep_last, say=rt.print0)
            rt.print0(f"saved {path} ({reason})")
        if rt.distributed:
            with rt.waiting_for_ranks(f"the barrier after the save at step {step}"):
                dist.barrier()

    def wait_for_save(self) -> None:
        """Returns once no save is in flight (fsdp's are written in the background), raising what it met."""
        if self.saver is not None:
            with self.rt.waiting_for_ranks("the sharded save in flight"):
                self.saver.wait()

    def meta(self, step: int) -> dict:
        """meta.json's account of the run at `step`, beside the checkpoint's files."""
        c, rt = self.c, self.rt
        return {
            "config": c.as_dict(),
            "world_size": rt.world_size,
            "run_id": self.run_id,
            "precision": precision(rt.device, c.dtype)[0],  # what dtype came to here: a resume compares it
            "multipliers": self.multipliers,
            "data": {"seed": c.seed, "next_step": step},
            "data_fingerprints": self.data_fingerprints,  # a resume on other token files is refused
        }

    def standing(self) -> str:
        """Which checkpoint of the run stands, said (a divergence or a skipped save names it)."""
        own = checkpoint.own_steps(self.c.out_dir, self.run_id)
        if not own:
            return "no checkpoint of this run exists yet"
        return f"the last checkpoint, {checkpoint.step_dir(self.c.out_dir, own[0])}, stands"

    def full_model(self) -> GPT | None:
        """The whole model on rank 0 (None elsewhere): under fsdp gathered from every rank's shards, which
        every rank takes part in."""
        if not self.sharded:
            return self.raw_model
        weights = fsdp.full_model_state(self.raw_model, keep=self.rt.is_main)
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
        return fsdp.gradient_sync(self.model, False) if self.sharded else self.model.no_sync()

    def step(self, step: int, layer_stats: LayerStats | None = None):
        """Optimizer step number `step` (0-based): (lr, mean loss, grad norm, found_inf), all on the device
        but lr; a non-finite loss or gradient norm skips the update on every rank. With layer_stats, also
        what the step did to each tensor: its record (training.layer_stats), else None."""
        c, rt = self.c, self.rt
        lr = lr_at(step, c)
        # the schedule's rate; each optimizer's step applies each group's multiplier (base.layer_lr)
        base.set_lr(self.optimizer, lr)
        # Dropout and sampled labels draw from an RNG seeded by (seed, step, rank): a resume needs no RNG state.
        torch.manual_seed(c.seed + 1_000_003 * step + rt.rank)
        accum = self.split.micro_steps
        micro_batches = [self.train_batches.get(step, self.split, rt.device, micro, rt.rank) for micro in range(accum)]
        step_loss = torch.zeros((), device=rt.device)
        for micro, (x, y) in enumerate(micro_batches):
            with self.ctx, self.sync_context(micro == accum - 1):
                _, loss = self.model(x, y)
                (loss / accum).backward()
            step_loss += loss.detach().float() / accum
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
        context = base.StepContext(
            self.model,
            self.raw_model,
            micro_batches,
            self.ctx,
            self.sync_context,
            all_reduce_mean if rt.distributed else None,
            self.found_inf,
            self.sharded,
        )
        self.optimizer.before_step(step, context)
        if layer_stats is not None:
            layer_stats.before()
        self.optimizer.step()
        record = layer_stats.after(step + 1) if layer_stats is not None else None
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.after_step(step, context)
        return lr, step_loss, grad_norm, self.found_inf, record


def choose_backend(c: TrainConfig, rt) -> tuple[str, str]:
    """The optimizer's backend and why, after the kernels' self-check where it applies (self_check.py)."""

    def make_optimizer(groups, backend):  # the run's optimizer over the self-check's tensors
        return build_optimizer(c, groups, self_check.N_HEAD, backend)

    return self_check.choose_backend(c, rt.device, make_optimizer, cache_dir(), say=rt.print0)
