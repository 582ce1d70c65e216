"""Stop signals: a run ends after the step under way, saved, rather than at once.

SIGTERM and SIGINT (Ctrl-C) are what `timeout`, SLURM and a terminal send; SLURM's
--signal sends SIGUSR1 ahead of the end of a job. Each signal is acknowledged at
once. A second one skips the grid that would follow the save, never the save; during
a grid, whose epoch is saved before it, a second one stops at once.
"""
import contextlib
import os
import signal
import sys

# Windows has SIGTERM and SIGINT only
STOP_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGTERM", "SIGINT", "SIGUSR1")
    if hasattr(signal, name)
)
# the last signal received since the run started, or 0, and how many came
received = count = 0
# while a grid is drawn, what a second signal raises, and what the save before the
# grid kept, which a first signal's acknowledgement names
during_grid = grid_saved = None


class Stopped(Exception):
    """The run saved and stopped on a signal; it exits with 128 + the signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


def name(signum: int) -> str:
    return signal.Signals(signum).name


def tell(text: str) -> None:
    """Print `text` from a signal handler: a print that the signal interrupted, or a
    reader that went away, must not turn the stop into a traceback."""
    try:
        print(text, flush=True)
    except (RuntimeError, OSError):
        pass


def noted(signum: int, saved: str) -> None:
    """Say at once that a stop during a grid will wait for the grid's end; `saved`
    says what the save before the grid kept, such as "its epoch"."""
    tell(f"\n{name(signum)}: noted; the run stops after this grid, {saved} "
         f"already saved (send it again to stop now)")


def remember(signum: int, frame) -> None:
    global received, count
    previous, received = received, signum
    count += 1
    again = previous != 0
    if during_grid is not None and again:
        raise Stopped(signum, during_grid.format(signal=name(signum)))
    if during_grid is not None:
        noted(signum, grid_saved)
    elif again:
        tell(f"\n{name(signum)} again: the run still saves after the step under "
             f"way, then stops without drawing a grid")
    else:
        tell(f"\n{name(signum)}: noted; the run saves after the step under way, "
             f"then stops (send it again to skip the grid after the save)")


class StopSafeStream:
    """sys.stdout or sys.stderr while a run lasts. Once a stop signal has come, a
    reader that went away, such as the `tee` of
    `python -m mindiffusion.train mnist | tee log`
    that the terminal's Ctrl-C ended too, no longer raises BrokenPipeError before
    the save: the stream's descriptor then writes to nowhere."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str):
        return self.guarded(self.stream.write, text)

    def flush(self) -> None:
        self.guarded(self.stream.flush)

    def guarded(self, call, *args):
        try:
            return call(*args)
        except OSError:
            if not received:
                raise
            nowhere = os.open(os.devnull, os.O_WRONLY)
            os.dup2(nowhere, self.stream.fileno())
            os.close(nowhere)
            return len(args[0]) if args else None

    def __getattr__(self, attribute: str):
        return getattr(self.stream, attribute)


@contextlib.contextmanager
def stop_on_signals():
    """While the run lasts, a stop signal ends it after the current step."""
    global received, count
    received = count = 0
    previous = {signum: signal.signal(signum, remember) for signum in STOP_SIGNALS}
    # None where there is no console, as under Windows' pythonw
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (stream and StopSafeStream(stream) for stream in streams)
    try:
        yield
    finally:
        # what is still buffered, while a reader that went away is forgiven
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        sys.stdout, sys.stderr = streams
        received = count = 0
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def grid_in_progress(message: str, saved: str | None):
    """While a grid is drawn: a first signal is acknowledged at once, naming what
    the save before the grid kept, `saved`, and a second raises Stopped with
    `message`, whose {signal} names it."""
    global during_grid, grid_saved
    during_grid, grid_saved = message, saved
    try:
        yield
    finally:
        during_grid = grid_saved = None


def ignore_stop_signals(worker_id: int) -> None:
    """The start of each DataLoader worker: stop signals are left to the training
    process. A scheduler signals every process of a job, and a worker that one
    killed would end the run with a traceback before the save."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
