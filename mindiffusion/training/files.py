"""Writing a file whole or not at all, so that a crash, a full disk or a power cut
never leaves half a checkpoint under its name."""
import glob
import os
import tempfile

from mindiffusion.training.errors import UserError


def write_or_explain(path: str, data: bytes, what: str) -> None:
    """Write data to path whole or not at all; `what` names the data in the one
    sentence that a failure becomes."""
    try:
        write_atomically(path, data)
    except OSError as err:
        folder = os.path.dirname(path) or "."
        raise UserError(
            f"{what} could not be written in {folder} ({err.strerror})"
        ) from None


def write_atomically(path: str, data) -> None:
    """Write the bytes `data` to `path` whole or not at all: into a file of this
    process's own beside it, flushed to the disk, then renamed over it, so that
    neither a failed write nor a power cut leaves anything but a whole file under
    its name. A failure is an OSError that names its reason."""
    folder = os.path.dirname(path) or "."
    tmp_path = None
    try:
        fd, tmp_path = tempfile.mkstemp(
            dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp"
        )
        # mkstemp's 0600 would keep the file from a group or a container's host
        # user; a plain open gives what the umask allows
        os.chmod(tmp_path, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_path, path)
        sync_folder(folder)
    finally:
        if tmp_path is not None and os.path.exists(tmp_path):
            os.remove(tmp_path)


def current_umask() -> int:
    """The process's umask, which can only be read by setting it."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_temporaries(path: str) -> list[str]:
    """Remove the temporary files that a write_atomically of `path` left when its
    process was killed between the write and the rename; only while no other process
    writes `path`, as the lock on a checkpoint ensures. Returns their names."""
    # ddpm_cifar.pth -> ddpm_cifar.pth.*.tmp
    stale = glob.glob(glob.escape(path) + ".*.tmp")
    for tmp_path in stale:
        os.remove(tmp_path)
    return stale


def sync_folder(folder: str) -> None:
    """Flush a rename in `folder` to the disk, where the system can: Windows cannot
    open a folder as a file, and there the rename is as durable as NTFS makes it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except PermissionError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
