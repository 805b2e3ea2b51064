"""torchrun, exiting with the code a scheduler can act on.

    python launch.py --standalone --nproc_per_node=8 train.py config/train_gpt2.py

takes torchrun's arguments and runs torchrun in this process. torchrun alone exits 1 after any stop of
its workers: signalled itself, it raises while they save and exit 75 (EX_TEMPFAIL: run the same command
again), and a worker's own exit code never reaches the scheduler. Here rank 0 writes its exit code
where this wrapper reads it (runtime.exits.report_exit_code), so the launch exits with it: 75 after a clean
stop, 74 on a full disk, 3 when the run diverged, 2 on a user error (a rank that went away included:
the survivors' code stands in when rank 0 is the one lost), torchrun's own code otherwise. SIGUSR1 (Slurm's
`--signal=USR1@90`) is passed to the workers like SIGTERM, SIGINT and SIGHUP (torchrun alone dies of it).
"""

import os
import sys
import tempfile

from runtime.exits import EXIT_CODE_FILE
from runtime.signals import EXIT_PREEMPTED


def main(argv: list[str] | None = None) -> int:
    # torchrun's --signals-to-handle defaults to PET_SIGNALS_TO_HANDLE; versions before the flag read the other
    for name in ("PET_SIGNALS_TO_HANDLE", "TORCHELASTIC_SIGNALS_TO_HANDLE"):
        os.environ.setdefault(name, "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    from torch.distributed.run import main as torchrun

    ended = None  # how torchrun itself ended, when it raised
    with tempfile.TemporaryDirectory(prefix="lwlr-launch-") as folder:
        os.environ[EXIT_CODE_FILE] = os.path.join(folder, "exit-code")  # each rank adds .RANK
        try:
            torchrun(argv)
            code = 0
        except SystemExit as e:  # torchrun's own argument errors
            code = e.code if isinstance(e.code, int) else 1
        except Exception as e:  # noqa: BLE001 ChildFailedError (a worker exited non-zero), SignalException (signalled)
            ended, code = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}", 1
        reported = rank_exit_code(folder)
    if ended is not None and reported == EXIT_PREEMPTED:  # torchrun raises after any stop, a clean one too
        print(
            f"launch.py: the run stopped and saved (exit {EXIT_PREEMPTED}); run the same command to resume",
            file=sys.stderr,
        )
    elif ended is not None:
        print(f"launch.py: torchrun ended with {ended}", file=sys.stderr)
    return reported if code != 0 and reported else code


def rank_exit_code(folder: str) -> int | None:
    """The exit code of the lowest rank of this node that reported one (rank 0's on the first node): a
    rank killed, or never started, reports none."""
    codes = {}
    for name in os.listdir(folder):
        rank = name.removeprefix("exit-code.")
        try:
            with open(os.path.join(folder, name)) as f:
                codes[int(rank)] = int(f.read())
        except (OSError, ValueError):  # a code half written as its rank died
            continue
    return codes[min(codes)] if codes else None


if __name__ == "__main__":
    sys.exit(main())
