"""How far a long phase has got, for whoever waits on it: the lwlr measurement, evaluation, the sweeps,
dataset preparation. On a terminal a tqdm bar; in a log file or under torchrun, where a bar would be a
wall of carriage returns, one plain line every `every` seconds with the count, the rate and the time
left. A phase shorter than that prints nothing more than the line that announced it.
"""

import contextlib
import sys
import threading
import time

from tqdm import tqdm

EVERY_SECONDS = 10.0  # between plain progress lines; a phase shorter than this prints none
BAR_DELAY_SECONDS = 1.0  # a bar shows once its phase has taken this long: no flicker for short evals


def duration(seconds: float) -> str:
    """A time span for people: 42 s, 3 min 05 s, 2 h 07 min."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Counts `total` units of work named `what`; silent when not enabled (ranks other than 0)."""

    def __init__(
        self, what: str, total: int, unit: str = "it", enabled: bool = True, every: float | None = None, stream=None
    ):
        self.what, self.total, self.unit = what, total, unit
        self.every = EVERY_SECONDS if every is None else every
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.done = 0
        self.start = self.last_line = time.perf_counter()
        # The rate is measured from the end of the first unit on: a first unit that compiled, or warmed up
        # the allocator, would make every estimate after it too long.
        self.first_done, self.first_at = None, None
        on_terminal = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = (
            tqdm(
                total=total,
                desc=what,
                unit=unit,
                leave=False,
                dynamic_ncols=True,
                file=self.stream,
                delay=BAR_DELAY_SECONDS,
            )
            if on_terminal
            else None
        )

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.first_at is None:
            self.first_done, self.first_at = self.done, now
        if self.bar is not None:
            self.bar.update(n)
            return
        if self.enabled and now - self.last_line >= self.every and self.done < self.total:
            self.last_line = now
            print(self.line(now), file=self.stream, flush=True)

    @property
    def first_seconds(self) -> float | None:
        """How long the first update took from the start (a compile, where the first unit compiled)."""
        return None if self.first_at is None else self.first_at - self.start

    def line(self, now: float) -> str:
        measured = self.done - self.first_done
        if measured <= 0 or now <= self.first_at:  # only the first unit so far: no rate to estimate from yet
            first = duration(self.first_seconds)
            return f"{self.what}: {self.done}/{self.total} {self.unit} | the first in {first}"
        rate = measured / (now - self.first_at)
        return (
            f"{self.what}: {self.done}/{self.total} {self.unit} | {rate:.3g} {self.unit}/s"
            f" | {duration((self.total - self.done) / rate)} left"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def counted(items, progress: Progress):
    """items, with progress counting each one once its consumer comes back for the next."""
    for item in items:
        yield item
        progress.update()


def first_beating(items, what: str, enabled: bool = True, every: float | None = None, stream=None):
    """items, with a heartbeat named `what` while its consumer works on the first one (where a compiled
    model compiles, which a Progress cannot count), silent from the second on."""
    items = iter(items)
    for first in items:
        with heartbeat(what, enabled, every, stream):
            yield first
        break
    yield from items


@contextlib.contextmanager
def heartbeat(what: str, enabled: bool = True, every: float | None = None, stream=None):
    """For a phase that cannot count its work (a compilation): a line every `every` seconds saying how
    long it has taken so far, until the block ends."""
    every = EVERY_SECONDS if every is None else every
    stream = stream or sys.stdout
    done = threading.Event()
    start = time.perf_counter()

    def beat():
        while not done.wait(every):
            print(f"{what}: {duration(time.perf_counter() - start)} so far", file=stream, flush=True)

    thread = threading.Thread(target=beat, daemon=True)
    if enabled:
        thread.start()
    try:
        yield
    finally:
        done.set()
        if enabled:
            thread.join()
