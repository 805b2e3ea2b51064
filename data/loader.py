"""Batches of random token windows, a pure function of (seed, split, step).

Nothing but the step number needs saving for an exact resume, and the split of a global batch over
ranks and gradient-accumulation micro-steps is fixed: rank r's micro-step m takes rows
[(r * accum + m) * B, ... + B) of the step's global batch. So 2 ranks x 1 micro-step see exactly the
rows that 1 rank x 2 micro-steps sees, and their losses and gradients agree.
"""

import numpy as np
import torch

from data.tokenfile import read_tokens

# Independent random streams over the token files: training batches, eval batches, and the batches
# multipliers.py measures gradients on (so measuring does not change which batches training sees).
STREAMS = {"train": 0, "val": 1, "lwlr": 2}


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

    def get(self, step: int, global_rows: int, first_row: int, rows: int, device: torch.device):
        """Inputs and next-token targets, each (rows, block_size) int64 on device."""
        starts = self.window_starts(step, global_rows)[first_row : first_row + rows]
        windows = np.stack([self.tokens[s : s + self.block_size + 1] for s in starts]).astype(np.int64)
        batch = torch.from_numpy(windows)
        if device.type == "cuda":  # pinned host memory lets the copy overlap the previous step's kernels
            batch = batch.pin_memory().to(device, non_blocking=True)
        else:
            batch = batch.to(device)
        return batch[:, :-1], batch[:, 1:]
