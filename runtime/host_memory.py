"""Host memory a CPU run frees, kept for its next step instead of handed back to the operating system.

A step on a CPU allocates and frees the same large tensors every time (the default run's output layer: a
25.7 MB chunk of logits and its gradient, the 25.7 MB embedding gradient). glibc's malloc serves each
block that large with a fresh mmap and returns it with munmap when it is freed, or trims the freed top
of its heap, so every step touches new pages and pays a page fault and the kernel's zeroing for each
4 KiB of them. Keeping freed memory in the heap (as CUDA's caching allocator keeps device memory) lets
the next step reuse pages already mapped. The process's memory then stays at its peak, which the step
reaches again anyway. Measured on the default run's step, 2-core AVX512-BF16 CPU: docs/benchmarks.md.
"""

import ctypes
import ctypes.util
import platform

# mallopt(3)'s parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
NEVER_TRIM = -1  # mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely"
# Blocks at least this large still get an mmap of their own. glibc caps the threshold (32 MiB on 64-bit
# systems in its manual; some versions take more), so a refused value falls back to the cap.
MMAP_THRESHOLDS = (1 << 30, 32 << 20)

_retained = False


def retain_freed_memory() -> bool:
    """Keep freed host memory for reuse (glibc's malloc only; elsewhere nothing changes). Whether it is
    kept; idempotent."""
    global _retained
    if _retained:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not any(libc.mallopt(M_MMAP_THRESHOLD, size) == 1 for size in MMAP_THRESHOLDS):
        return False
    _retained = libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
    return _retained
