"""The run's duties around each optimizer step, as hooks on the optimizer, so that
the notes' `optim.step()` stands alone in the loop.

Before the step: refuse a loss or gradient that is not finite, so that divergence
never reaches the weights or the disk, and clip the gradients under --grad-clip;
under --amp fp16, unscale them, as torch's GradScaler does. After it: the --ema
update, a save every --save-every steps, a clean stop when a signal came, and the
--grid-minutes grids within an epoch.

None of it stops a GPU more than the notes' own `loss.item()` does: the guard reads
values already on the host (readings.py), only --grad-clip passes over
the gradients, and under torchrun the ranks meet about signals only every
SIGNAL_EVERY steps.
"""
import math
from collections.abc import Callable

import torch
from torch.optim.swa_utils import AveragedModel

from mindiffusion.training import signals
from mindiffusion.training.checkpoints import Checkpoint
from mindiffusion.training.data import PreparedLoader
from mindiffusion.training.distributed import largest, world_size
from mindiffusion.training.errors import UserError
from mindiffusion.training.readings import StepReadings

# float16 steps that overflow in a row before the run counts as diverged: by then
# the loss scale has fallen from 65536 to about 1e-5
MAX_OVERFLOWS = 32
# under torchrun, the steps between the ranks' checks for a stop signal: a stop comes
# at most SIGNAL_EVERY - 1 steps later (a quarter of a second at 512 images a step
# and 20,000 images/s), and the gloo collective is paid once in so many steps
SIGNAL_EVERY = 10


class StepDuties:
    """The pre- and post-step hooks of `checkpoint.optim`, for a run that trains from
    `loader`; `readings` holds the loss and gradient norm of the step under way, and
    grid_within_epoch(epoch, batches) draws a --grid-minutes grid when it is due."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        loader: PreparedLoader,
        readings: StepReadings,
        batches: int,
        save_every: int | None,
        grad_clip: float | None,
        ema: AveragedModel | None,
        grid_within_epoch: Callable[[int, int], None],
    ) -> None:
        self.checkpoint, self.loader, self.readings = checkpoint, loader, readings
        self.grid_within_epoch = grid_within_epoch
        self.save_every, self.grad_clip, self.ema = save_every, grad_clip, ema
        self.global_batch = loader.batch_size * world_size()
        self.epoch, self.batches, self.steps = loader.epoch, batches, 0
        self.overflows = 0
        checkpoint.optim.register_step_pre_hook(self.before_step)
        checkpoint.optim.register_step_post_hook(self.after_step)

    def before_step(self, optim, args, kwargs) -> None:
        """Clip under --grad-clip, and stop if the loss or a gradient is not finite;
        under fp16, a gradient that overflowed skips the step instead."""
        if self.loader.epoch != self.epoch:
            self.epoch, self.batches = self.loader.epoch, 0
        scaler = self.checkpoint.scaler
        parameters = [
            p for group in optim.param_groups for p in group["params"]
            if p.grad is not None
        ]
        if scaler.is_enabled():
            scaler.unscale_(optim)
        # under fp16, the norm of the scaled gradients: infinite where they overflowed
        loss_value, norm_value = self.readings.read()
        self.checkpoint.record.add(loss_value, self.global_batch)
        finite = math.isfinite(norm_value)
        self.overflows = 0 if finite else self.overflows + 1
        # a loss already not finite in the forward pass is divergence: float16
        # overflows in the gradients, which the loss scale multiplies
        overflow = scaler.is_enabled() and not finite and math.isfinite(loss_value)
        if overflow and self.overflows < MAX_OVERFLOWS:
            # float16 overflowed: the scaler lowers its scale, and this step is
            # skipped, for the optimizer leaves alone what has no gradient
            for p in parameters:
                p.grad = None
        elif not (math.isfinite(loss_value) and finite):
            raise UserError(
                f"training diverged at epoch {self.epoch}, step {self.batches + 1}: "
                f"the loss is {loss_value} and the gradient norm {norm_value}"
                + (f" for {self.overflows} float16 steps in a row" if overflow else "")
                + ", so the weights were not updated and the last checkpoint is "
                "kept; try a lower --lr or --grad-clip 1.0, then --resume"
            )
        elif self.grad_clip:
            torch.nn.utils.clip_grad_norm_(parameters, self.grad_clip)

    def after_step(self, optim, args, kwargs) -> None:
        """Update the --ema average, save every --save-every steps, stop here if a
        signal came and draw a --grid-minutes grid when due, unless this step ended
        its epoch: the epoch's end saves and draws."""
        if self.ema is not None:
            self.ema.update_parameters(self.checkpoint.ddpm)
        if self.checkpoint.scaler.is_enabled():
            self.checkpoint.scaler.update()
        self.batches += 1
        self.steps += 1
        if self.batches == self.loader.batches_per_epoch:
            return
        if self.save_every and self.steps % self.save_every == 0:
            self.checkpoint.save(self.epoch, self.batches)
        # under torchrun, the ranks meet only every SIGNAL_EVERY steps
        if world_size() == 1 or self.steps % SIGNAL_EVERY == 0:
            self.stop_if_signalled()
            self.grid_within_epoch(self.epoch, self.batches)

    def stop_if_signalled(self) -> None:
        """Save and stop if a stop signal came; under torchrun, every rank stops
        after the same step."""
        signum = largest(signals.received)
        if signum:
            self.checkpoint.save(self.epoch, self.batches)
            raise signals.Stopped(
                signum,
                f"stopped by {signals.name(signum)} after epoch {self.epoch}, step "
                f"{self.batches}: saved in {self.checkpoint.path}; run the same "
                f"command with --resume to go on",
            )
