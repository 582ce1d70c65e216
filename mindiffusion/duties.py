"""The run's duties around each optimizer step, besides the step itself.

Before the step: refuse a loss or gradient that is not finite, so that divergence
never reaches the weights or the disk, and clip the gradients under --grad-clip.
After it: save every --save-every steps, and stop cleanly when a signal came. Under
--amp fp16, the loss is scaled for backward and the gradients unscaled before the
step, as torch's GradScaler does, with the notes' loss.backward() and optim.step().
"""
import contextlib
import math
import signal

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from mindiffusion import cli
from mindiffusion.checkpoints import Checkpoint, Start

# what a scheduler sends before it stops a job (SLURM's --signal sends SIGUSR1 ahead)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# the signal received while a step ran, or 0
received = 0
# float16 steps that overflow in a row before the run counts as diverged: by then
# the loss scale has fallen from 65536 to about 1e-5
MAX_OVERFLOWS = 32


class Stopped(Exception):
    """The run saved and stopped on a signal; it exits with 128 + the signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


def remember(signum: int, frame) -> None:
    global received
    # a second Ctrl-C quits at once
    if signum == signal.SIGINT and received == signal.SIGINT:
        raise KeyboardInterrupt
    received = signum


@contextlib.contextmanager
def stop_on_signals():
    """While the run lasts, a stop signal ends it after the current step."""
    global received
    received = 0
    previous = {signum: signal.signal(signum, remember) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        received = 0
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def ignore_stop_signals(worker_id: int) -> None:
    """The start of each DataLoader worker: stop signals are left to the training
    process. A scheduler signals every process of a job, and a worker that one
    killed would end the run with a traceback before the save."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class StepDuties:
    """Calls before and after each optimizer step, for the run of `checkpoint`."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        start: Start,
        dataloader: DataLoader,
        save_every: int | None,
        grad_clip: float | None,
    ) -> None:
        self.checkpoint, self.save_every, self.grad_clip = (
            checkpoint, save_every, grad_clip
        )
        # at its start, the dataloader still holds whole epochs
        self.batches_per_epoch = len(dataloader)
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.global_batch = dataloader.batch_size * world_size
        self.epoch, self.batches, self.steps = start.epoch, start.batches, 0
        self.overflows = 0
        if checkpoint.scaler.is_enabled():
            checkpoint.ddpm.register_forward_hook(self.scale_backward)

    def scale_backward(self, ddpm, inputs, loss: torch.Tensor) -> None:
        """Make backward start from the loss times the scale, while the loss itself,
        and the progress bar's, stay as they are."""
        loss.register_hook(self.checkpoint.scaler.scale)

    def before_step(self, epoch: int, loss: torch.Tensor) -> None:
        """Clip under --grad-clip, and stop if the loss or a gradient is not finite;
        under fp16, a gradient that overflowed skips the step instead."""
        if epoch != self.epoch:
            self.epoch, self.batches = epoch, 0
        optim, scaler = self.checkpoint.optim, self.checkpoint.scaler
        parameters = [
            p for group in optim.param_groups for p in group["params"]
            if p.grad is not None
        ]
        if scaler.is_enabled():
            scaler.unscale_(optim)
        # without --grad-clip the bound is infinite: the gradients are multiplied by
        # exactly 1, and only their total norm is read
        norm = torch.nn.utils.clip_grad_norm_(parameters, self.grad_clip or math.inf)
        loss_value, norm_value = loss.item(), norm.item()
        self.checkpoint.record.add(loss_value, self.global_batch)
        finite = math.isfinite(norm_value)
        self.overflows = 0 if finite else self.overflows + 1
        overflow = scaler.is_enabled() and not finite
        if overflow and self.overflows < MAX_OVERFLOWS:
            # float16 overflowed: the scaler lowers its scale, and this step is
            # skipped, for the optimizer leaves alone what has no gradient
            for p in parameters:
                p.grad = None
        elif not (math.isfinite(loss_value) and finite):
            raise cli.UserError(
                f"training diverged at epoch {epoch}, step {self.batches + 1}: the "
                f"loss is {loss_value} and the gradient norm {norm_value}"
                + (f" for {self.overflows} float16 steps in a row" if overflow else "")
                + ", so the weights were not updated and the last checkpoint is "
                "kept; try a lower --lr or --grad-clip 1.0, then --resume"
            )

    def after_step(self) -> None:
        """Save every --save-every steps, and stop here if a signal came."""
        if self.checkpoint.scaler.is_enabled():
            self.checkpoint.scaler.update()
        self.batches += 1
        self.steps += 1
        epoch_done = self.batches == self.batches_per_epoch
        # the epoch's end saves anyway, after its grid
        if self.save_every and self.steps % self.save_every == 0 and not epoch_done:
            self.checkpoint.save(self.epoch, self.batches)
        signum = torch.tensor(received)
        if dist.is_initialized():
            # under torchrun, every rank stops after the same step
            dist.all_reduce(signum, dist.ReduceOp.MAX, group=cli.patient_group)
        if not signum:
            return
        if epoch_done:
            where = f"the end of epoch {self.epoch}, before its grid"
            self.checkpoint.save(self.epoch + 1)
        else:
            where = f"epoch {self.epoch}, step {self.batches}"
            self.checkpoint.save(self.epoch, self.batches)
        name = signal.Signals(int(signum)).name
        raise Stopped(
            int(signum),
            f"stopped by {name} after {where}: saved in {self.checkpoint.path}; "
            f"run the same command with --resume to go on",
        )
