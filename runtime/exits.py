"""How a script ends: a UserError is one `error:` line and its exit code (2 unless it says otherwise), a
bug keeps its traceback (exit 1), and rank 0's code reaches launch.py, which torchrun's own exit code
cannot carry. The other codes a scheduler reads: 3 (training.metrics, the run diverged: the same command
would diverge again), 74 (runtime.files, a full disk), 75 (runtime.signals, stopped by a signal: run the
same command again).

This module imports no torch, so that a script can refuse a bad command line before it loads torch
(check_before_imports), which takes seconds, and many on a busy machine."""

import os
import sys

from runtime.errors import UserError

EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): stopped by a signal (runtime/signals.py), run the same command again


def say(error: UserError) -> None:
    """The error's one line, on stderr: from rank 0 alone when every rank meets it alike."""
    if not (error.same_on_every_rank and int(os.environ.get("RANK", "0")) != 0):
        print(f"error: {error}", file=sys.stderr)


def run_main(main) -> None:
    """Run a script's main(): a UserError (runtime.errors) prints one `error:` line and exits with its class's
    exit_code, 2 unless it says otherwise; anything else is a bug and keeps its traceback. The process
    group is always torn down so torchrun ranks exit cleanly."""
    code = 1
    try:
        code = main()
    except UserError as e:
        say(e)
        code = e.exit_code
    finally:  # code stays 1 for a bug, whose traceback follows
        dist = sys.modules.get("torch.distributed")  # loaded by whatever started a process group
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()
        report_exit_code(code)
    if code == EXIT_PREEMPTED:
        # A stop has written what it keeps and closed its files; the interpreter's teardown (torch.compile's
        # worker pool, among others) would take seconds more of a scheduler's grace period.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def check_before_imports(check) -> None:
    """Run a script's torch-free check of its command line (the config's parse) before the script imports
    the rest: a UserError ends it at once, with its one line and exit code, as run_main would."""
    try:
        check()
    except UserError as e:
        say(e)
        report_exit_code(e.exit_code)
        sys.exit(e.exit_code)


EXIT_CODE_FILE = "LWLR_EXIT_CODE_FILE"  # set by launch.py, which torchrun's own exit code cannot replace


def report_exit_code(code: int) -> None:
    """Each rank writes its exit code where launch.py reads it (torchrun itself exits 1 after any stop):
    rank 0's is the run's, another's stands in when rank 0 is the one that went away."""
    path = os.environ.get(EXIT_CODE_FILE)
    if path:
        with open(f"{path}.{int(os.environ.get('RANK', '0'))}", "w") as f:
            f.write(str(code))
