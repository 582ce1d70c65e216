"""The record of a run: one CSV row per epoch, beside the checkpoint.

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
import io
import os
import time

from mindiffusion.training.errors import UserError
from mindiffusion.training.files import write_atomically

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
        """The rows written so far."""
        if not os.path.exists(self.path):
            return []
        with open(self.path, newline="") as file:
            return list(csv.DictReader(file))

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
