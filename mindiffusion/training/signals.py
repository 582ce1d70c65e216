"""Stop signals: a run ends after the step under way, saved, rather than at once.

SIGTERM and SIGINT (Ctrl-C) are what `timeout`, SLURM and a terminal send; SLURM's
--signal sends SIGUSR1 ahead of the end of a job. A second Ctrl-C quits at once, and
during a grid any second stop signal does, since the epoch is saved before its grid.
"""
import contextlib
import signal

# Windows has SIGTERM and SIGINT only
STOP_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGTERM", "SIGINT", "SIGUSR1")
    if hasattr(signal, name)
)
# the last signal received since the run started, or 0, and how many came
received = count = 0
# while a grid is drawn, what a first signal prints and a second one raises
during_grid = None


class Stopped(Exception):
    """The run saved and stopped on a signal; it exits with 128 + the signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


def name(signum: int) -> str:
    return signal.Signals(signum).name


def noted(signum: int) -> None:
    """Say at once that a stop during a grid will wait for the grid's end."""
    print(f"\n{name(signum)}: noted; the run stops after this grid, its epoch "
          f"already saved (send it again to stop now)", flush=True)


def remember(signum: int, frame) -> None:
    global received, count
    previous, received = received, signum
    count += 1
    again = previous != 0
    if during_grid is not None and again:
        raise Stopped(signum, during_grid(signum))
    if during_grid is not None:
        noted(signum)
    elif signum == signal.SIGINT and previous == signal.SIGINT:
        raise KeyboardInterrupt


@contextlib.contextmanager
def stop_on_signals():
    """While the run lasts, a stop signal ends it after the current step."""
    global received, count
    received = count = 0
    previous = {signum: signal.signal(signum, remember) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        received = count = 0
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def grid_in_progress(message):
    """While a grid is drawn: a first signal is acknowledged at once, and a second
    raises Stopped with message(signum)."""
    global during_grid
    during_grid = message
    try:
        yield
    finally:
        during_grid = None


def ignore_stop_signals(worker_id: int) -> None:
    """The start of each DataLoader worker: stop signals are left to the training
    process. A scheduler signals every process of a job, and a worker that one
    killed would end the run with a traceback before the save."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
