"""A lock on a run's checkpoint, held for the run's life, so that a second run
started on the same folder, by a requeued job or a command given twice, is refused
instead of overwriting the first. The operating system releases it when the
process ends, however it ends."""
import os

from mindiffusion.errors import UserError

try:
    import fcntl
except ImportError:
    # Windows
    fcntl = None
    import msvcrt


def release(file) -> None:
    """Give the lock up, also for the DataLoader workers that forked with it open."""
    if fcntl is not None:
        fcntl.flock(file.fileno(), fcntl.LOCK_UN)
    file.close()


def hold_lock(path: str, folder: str):
    """Take the lock file at `path`, or say which process holds it; the open file
    returned holds it until `release` or the end of the process."""
    file = open(path, "a+")
    try:
        if fcntl is not None:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            file.seek(0)
            msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError:
        file.seek(0)
        holder = file.read().strip() or "unknown"
        file.close()
        raise UserError(
            f"{folder} is in use by another run (process {holder}): wait for it to "
            f"end, or choose another --out"
        ) from None
    file.seek(0)
    file.truncate()
    file.write(f"{os.getpid()}\n")
    file.flush()
    return file
