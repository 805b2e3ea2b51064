"""How many CPU threads torch computes with, how its OpenMP threads wait, and a warning when the machine
is already busy. Measured on a 2-core AVX-512 machine (python -m bench.bench_threads; docs/benchmarks.md):
beside other heavy jobs, threads that spin while they wait (OpenMP's default) slowed the default run's
step 1.5x (one job) and 2.2x (four jobs) against threads that sleep (OMP_WAIT_POLICY=PASSIVE), which
cost nothing on a quiet machine; every core stayed faster than one thread in each case. So the defaults
are every core and PASSIVE. This module imports no torch: the wait policy must be set before torch loads
its OpenMP runtime, which reads it once.
"""

import os

WAIT_POLICY = "PASSIVE"


def before_torch() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the user set one. Call before torch is imported."""
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)


def choose(threads: int, ranks_on_host: int = 1) -> tuple[int, str]:
    """The thread count for a config's `threads` (0: OMP_NUM_THREADS if set, else this process's share of
    the cores) and why, in words."""
    cores = os.cpu_count() or 1
    if threads:
        return threads, f"threads={threads}"
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"]), f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    if ranks_on_host > 1:
        return max(1, cores // ranks_on_host), f"{cores} cores over {ranks_on_host} ranks on this host"
    return cores, f"every core of {cores}"


def busy_warning(threads: int, ranks_on_host: int = 1) -> str | None:
    """A warning when the machine's load already exceeds what its cores leave for this run's threads."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # not on every system
        return None
    if load <= cores:
        return None
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    sleeping = " (waiting threads sleep rather than spin)" if policy == "PASSIVE" else ""
    return (
        f"warning: this machine is busy (load {load:.1f} on {cores} cores) before the run adds its "
        f"{threads * ranks_on_host} thread{'s' * (threads * ranks_on_host > 1)}: every step will be slower. "
        f"OMP_WAIT_POLICY={policy}{sleeping}; what other jobs cost a step: docs/benchmarks.md, threads"
    )
