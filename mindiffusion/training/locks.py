"""A lock on a run's checkpoint, held for the run's life, so that a second run
started on the same folder, by a requeued job or a command given twice, is refused
instead of overwriting the first. The operating system releases it when the
process ends, however it ends; a run that ends normally removes its lock file."""
import os

from mindiffusion.training.errors import UserError

try:
    import fcntl
except ImportError:
    # Windows
    fcntl = None
    import msvcrt


def lock(file) -> None:
    """Lock the open `file`, or raise OSError at once if another process has."""
    if fcntl is not None:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        file.seek(0)
        msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)


def hold_lock(path: str, folder: str):
    """Take the lock file at `path`, or say which process holds it; the open file
    returned holds it until `release` or the end of the process."""
    while True:
        file = open(path, "a+")
        try:
            lock(file)
        except OSError:
            file.seek(0)
            holder = file.read().strip() or "unknown"
            file.close()
            raise UserError(
                f"{folder} is in use by another run (process {holder}): wait for it "
                f"to end, or choose another --out"
            ) from None
        # a run that ended meanwhile may have removed the file this one locked
        if os.path.exists(path) and os.path.samefile(path, file.name):
            break
        file.close()
    file.seek(0)
    file.truncate()
    file.write(f"{os.getpid()}\n")
    file.flush()
    return file


def release(file) -> None:
    """Remove the lock file and give the lock up, also for the DataLoader workers
    that forked with it open."""
    if fcntl is None:
        # Windows removes no file that is open
        file.close()
        os.remove(file.name)
        return
    os.remove(file.name)
    fcntl.flock(file.fileno(), fcntl.LOCK_UN)
    file.close()
