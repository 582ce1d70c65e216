"""The files a run writes beside its checkpoint, and how: each written whole or not
at all, so that a crash, a full disk or a power cut never leaves half a file under
its name; the lock on the checkpoint, held for the run's life; a checkpoint read
back as tensors and plain values only; and the record, one CSV row per epoch.

The record's columns:

    epoch,step,loss,lr,images_per_s,seconds

`loss` is the mean training loss over the epoch's steps (rank 0's, under torchrun),
`step` the optimizer steps done so far, and `seconds` the epoch's training time:
from its first batch to its last step, so without the grid and the save between two
epochs. The sums of an unfinished epoch travel in the checkpoint, so a run
stopped in the middle of an epoch and resumed writes the same row as one that never
stopped, timings aside. The file is rewritten whole at each row, so that a full
disk leaves the rows before it as they were.
"""
import csv
import errno
import glob
import io
import os
import pickle
import tempfile
import time

import filelock
import torch

from mindiffusion.training.flags import UserError


def output_folder(out: str) -> None:
    """Make the folder --out names, or say in one sentence why it cannot be made."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a folder: choose another --out")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {out} cannot be made ({err.strerror})") from None
    if why := cannot_write_in(out):
        raise UserError(f"--out {out} cannot be written in ({why}): choose another "
                        f"--out")


def cannot_write_in(folder: str) -> str | None:
    """Why no file can be written in `folder`, such as "Read-only file system", found
    by writing one that goes at once; None where one can."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as err:
        return err.strerror or str(err)


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


def hold_lock(checkpoint: str) -> filelock.FileLock:
    """Take the lock file of `checkpoint`, beside it, or say in one sentence which
    process holds it, or why it cannot be taken. A second run started on the same
    folder, by a requeued job or a command given twice, is refused instead of
    overwriting the first; the system gives the lock up when the process ends,
    however it ends."""
    path = checkpoint + ".lock"
    lock = filelock.FileLock(path)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise UserError(
            f"{checkpoint} is in use by another run (process {holder(path)}): "
            f"wait for it to end, or choose another --out"
        ) from None
    except PermissionError as err:
        raise UserError(
            f"{path} cannot be written ({err.strerror}): choose an --out where "
            f"this user can write"
        ) from None
    except OSError as err:
        if err.errno == errno.EROFS:
            raise UserError(
                f"{path} cannot be written: --out is on a read-only file system, "
                f"choose another --out"
            ) from None
        # Lustre or NFS mounted without locks: ENOLCK
        raise UserError(
            f"the file system of {path} cannot lock files ({err.strerror}), which "
            f"keeps a second run off this checkpoint: choose an --out on a local disk"
        ) from None
    # the process id after the first byte, which Windows keeps locked from others
    with open(path, "r+") as file:
        file.seek(1)
        file.write(f"{os.getpid()}\n")
        # an earlier holder's longer id
        file.truncate()
    return lock


def release(lock: filelock.FileLock) -> None:
    """Give the lock up, and remove its file: first, where the system allows it, so
    that no other run takes the lock of a file about to go; on Windows, which
    removes no open file, after."""
    if os.name != "nt":
        os.remove(lock.lock_file)
    lock.release()
    if os.name == "nt" and os.path.exists(lock.lock_file):
        os.remove(lock.lock_file)


def holder(path: str) -> str:
    """The process id written in the lock file at `path`, or "unknown"."""
    try:
        with open(path) as file:
            file.seek(1)
            return file.read().strip("\0\n ") or "unknown"
    except OSError:
        return "unknown"


def load_checkpoint(path: str) -> dict:
    """The checkpoint at `path`, on the CPU, as tensors and plain values only. The
    weights alone, as the notes' scripts save them, are a checkpoint with nothing
    but its "model"."""
    if not os.path.exists(path):
        raise UserError(f"there is no checkpoint at {path}")
    unreadable = f"{path} is not a readable checkpoint"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only=True names the first class or function the file would import
        if "GLOBAL" in str(err):
            raise UserError(
                f"{path} refused: it holds Python objects besides tensors "
                f"and plain values, and loading them could run code"
            ) from None
        raise UserError(unreadable) from None
    except Exception:
        # another kind of file fails in many ways: an IndexError for a CSV, ...
        raise UserError(unreadable) from None
    if isinstance(state, dict) and "sqrtab" in state:
        # the notes' torch.save(ddpm.state_dict(), ...)
        state = {"model": state}
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(unreadable)
    return state


def weights_alone(state: dict) -> bool:
    """Whether a checkpoint that load_checkpoint read is the weights alone, as a
    notes' script saves them: no recipe, optimizer or random state beside them."""
    return set(state) == {"model"}


FIELDS = ("epoch", "step", "loss", "lr", "images_per_s", "seconds")


class Record:
    """The CSV at `path`, and the running sums of the epoch under way."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.steps, self.loss_sum, self.images, self.seconds = 0, 0.0, 0, 0.0
        self.batches = 0
        self.start_epoch()

    def add(self, loss: float, images: int) -> None:
        """Count one optimizer step, its loss and the images of its global batch."""
        # the epoch's training time ends with its last step, before its grid
        self.last_step = time.perf_counter()
        self.steps += 1
        self.batches += 1
        self.images += images
        self.loss_sum += loss

    def start_epoch(self) -> None:
        """Start the epoch's clock from now: the prepared loader calls it as the
        epoch's first batch is asked for, so that what came between two epochs is
        left out."""
        self.clock = self.last_step = time.perf_counter()

    def end_epoch(self, epoch: int, lr: float) -> None:
        """Write epoch `epoch`'s row, and start the sums of the next."""
        seconds = self.seconds + self.last_step - self.clock
        row = dict(
            epoch=epoch,
            step=self.steps,
            loss=self.loss_sum / max(self.batches, 1),
            lr=lr,
            images_per_s=round(self.images / seconds, 2) if seconds else 0.0,
            seconds=round(seconds, 2),
        )
        self.write([*self.rows(), row])
        self.loss_sum, self.batches, self.images, self.seconds = 0.0, 0, 0, 0.0
        self.start_epoch()

    def state_dict(self) -> dict:
        seconds = self.seconds + time.perf_counter() - self.clock
        return dict(
            steps=self.steps,
            loss_sum=self.loss_sum,
            batches=self.batches,
            images=self.images,
            seconds=seconds,
        )

    def resume(self, state: dict | None, epoch: int) -> None:
        """Take up the sums of a checkpoint that stands in epoch `epoch`, and drop
        the rows of that epoch and later, which a run killed after writing them
        but before its checkpoint may have left."""
        if state is not None:
            self.steps, self.loss_sum = state["steps"], state["loss_sum"]
            self.batches, self.images = state["batches"], state["images"]
            self.seconds = state["seconds"]
        self.start_epoch()
        if os.path.exists(self.path):
            self.write([row for row in self.rows() if int(row["epoch"]) < epoch])

    def rows(self) -> list[dict]:
        """The rows written so far, also from a record that a spreadsheet saved
        with a byte-order mark (Excel's "CSV UTF-8")."""
        if not os.path.exists(self.path):
            return []
        with open(self.path, newline="", encoding="utf-8-sig") as file:
            reader = csv.DictReader(file)
            rows = list(reader)
        if "epoch" not in (reader.fieldnames or ["epoch"]):
            raise UserError(
                f"{self.path} is not the record this trainer writes (its columns: "
                f"{', '.join(reader.fieldnames)}): move it away, or give another --out"
            )
        return rows

    def write(self, rows: list[dict]) -> None:
        """Write the record with these rows, whole or not at all."""
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        try:
            write_atomically(self.path, text.getvalue().encode())
        except OSError as err:
            raise UserError(
                f"the record {self.path} could not be written ({err.strerror}): "
                f"its rows so far and the previous checkpoint are kept; make room "
                f"or give another --out, then --resume"
            ) from None
