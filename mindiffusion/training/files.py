"""Writing a file whole or not at all, so that a crash, a full disk or a power cut
never leaves half a checkpoint under its name."""
import os
import tempfile


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
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_path, path)
        sync_folder(folder)
    finally:
        if tmp_path is not None and os.path.exists(tmp_path):
            os.remove(tmp_path)


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
