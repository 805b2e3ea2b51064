"""Batches of random token windows, a pure function of (seed, stream, step), and the one answer to which
rows a rank and a micro-step take of a step's batch.

Nothing but the step number needs saving for an exact resume, and the split of a global batch over
ranks and gradient-accumulation micro-steps is fixed (BatchSplit): rank r's micro-step m takes rows
[(r * accum + m) * B, ... + B) of the step's global batch. So 2 ranks x 1 micro-step see exactly the
rows that 1 rank x 2 micro-steps sees, and their losses and gradients agree.
"""

from dataclasses import dataclass

import numpy as np
import torch

from data.tokenfile import read_tokens

# Independent random streams over the token files: training batches, eval batches, and the batches
# multipliers.py measures gradients on (so measuring does not change which batches training sees).
STREAMS = {"train": 0, "val": 1, "lwlr": 2}


@dataclass(frozen=True)
class BatchSplit:
    """How one step's global batch is cut: `rows` sequences per micro-batch, `micro_steps` of them per
    rank (gradient accumulation), over `ranks` processes."""

    rows: int
    micro_steps: int = 1
    ranks: int = 1

    @property
    def global_rows(self) -> int:
        return self.rows * self.micro_steps * self.ranks

    def first_row(self, micro: int, rank: int) -> int:
        """The first of the rows rank `rank` takes at micro-step `micro`."""
        return (rank * self.micro_steps + micro) * self.rows


class TokenBatches:
    def __init__(self, path: str, stream: str, block_size: int, vocab_size: int, seed: int, subset_batches: int = 0):
        """subset_batches > 0 cycles through that many distinct batches (the overfit experiments)."""
        self.path = path
        self.tokens = read_tokens(path, vocab_size, min_tokens=block_size + 1)
        self.block_size, self.seed, self.subset_batches = block_size, seed, subset_batches
        self.stream = STREAMS[stream]

    def window_starts(self, step: int, global_rows: int) -> np.ndarray:
        if self.subset_batches:
            step %= self.subset_batches
        rng = np.random.default_rng([self.seed, self.stream, step])
        return rng.integers(0, len(self.tokens) - self.block_size, size=global_rows)

    def get(self, step: int, split: BatchSplit, device: torch.device, micro: int = 0, rank: int = 0):
        """Inputs and next-token targets of step `step`'s rows for this micro-step and rank, each
        (split.rows, block_size) int64 on device."""
        first = split.first_row(micro, rank)
        starts = self.window_starts(step, split.global_rows)[first : first + split.rows]
        windows = np.stack([self.tokens[s : s + self.block_size + 1] for s in starts]).astype(np.int64)
        batch = torch.from_numpy(windows)
        if device.type == "cuda":  # pinned host memory lets the copy overlap the previous step's kernels
            batch = batch.pin_memory().to(device, non_blocking=True)
        else:
            batch = batch.to(device)
        return batch[:, :-1], batch[:, 1:]
