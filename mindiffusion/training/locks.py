"""A lock on a run's checkpoint, held for the run's life, so that a second run
started on the same folder, by a requeued job or a command given twice, is refused
instead of overwriting the first. The operating system releases it when the
process ends, however it ends; a run that ends normally removes its lock file."""
import errno
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


# what a lock held by another process raises: flock's EWOULDBLOCK, msvcrt's EACCES
HELD = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES, errno.EDEADLK}


def hold_lock(checkpoint: str):
    """Take the lock file of `checkpoint`, beside it, or say in one sentence which
    process holds it, or why it cannot be taken; the open file returned holds it
    until `release` or the end of the process."""
    path = checkpoint + ".lock"
    while True:
        try:
            file = open(path, "a+")
        except OSError as err:
            raise UserError(
                f"{path} cannot be written ({err.strerror}): choose an --out where "
                f"this user can write"
            ) from None
        try:
            lock(file)
        except OSError as err:
            file.close()
            if err.errno not in HELD:
                # Lustre or NFS mounted without locks: ENOLCK
                raise UserError(
                    f"the file system of {path} cannot lock files ({err.strerror}), "
                    f"which keeps a second run off this checkpoint: choose an --out "
                    f"on a local disk"
                ) from None
            raise UserError(
                f"{checkpoint} is in use by another run (process {holder(path)}): "
                f"wait for it to end, or choose another --out"
            ) from None
        # a run that ended meanwhile may have removed the file this one locked
        if os.path.exists(path) and os.path.samefile(path, file.name):
            break
        file.close()
    file.seek(0)
    file.truncate()
    # the process id after the first byte, which msvcrt keeps locked from others
    file.write(f"\n{os.getpid()}\n")
    file.flush()
    return file


def holder(path: str) -> str:
    """The process id written in the lock file at `path`, or "unknown"."""
    try:
        with open(path) as file:
            file.seek(1)
            return file.read().strip() or "unknown"
    except OSError:
        return "unknown"


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
