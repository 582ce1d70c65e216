"""The training step, as the scripts' loop takes it: the prepared model and
optimizer, the guard before each optimizer step, and the --ema average after it.

The prepared `ddpm(x, c)` and `optim.step()` change how the notes' calls compute,
never what they do, as Accelerate's `prepare` does: autocast under --amp, the
gradients averaged across torchrun's ranks by DistributedDataParallel, and float16's
loss scaling, whose scaler skips a step whose gradients overflowed.

The guard reads the step's loss and gradients' largest magnitude on the host
without making a GPU wait. A GPU runs behind the Python that launches its kernels,
and reading a value that it computes waits until the GPU gets there. The notes' loop
waits once a step, at `loss.item()`, after backward. So the loss and the norm are
copied to the host as soon as they exist, during forward and at the end of backward:
when the guard reads them after that wait, they are there, and the GPU was never
stopped a second time.

--ema: after each optimizer step the average e moves towards the weights w,
e <- d e + (1 - d) w. A fixed decay d = DECAY forgets the initial weights slowly:
at 0.995, 63 steps still leave 0.995^62, about 73% of them, in the average. The
warm-up of diffusers' and ema-pytorch's EMA models lets a young average follow the
weights: after n updates the decay is min(DECAY, (1 + n) / (10 + n)). The first
update copies the weights; the next ones decay by 2/11, 3/12, ..., up to DECAY,
which 0.995 reaches after 1,790 updates.
"""
import math

import torch
import torch.nn as nn
from torch.autograd.graph import register_multi_grad_hook
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

from mindiffusion.ddpm import DDPM
from mindiffusion.training.flags import UserError

# float16 steps that overflow in a row before the run counts as diverged: by then
# the loss scale has fallen from 65536 to about 1e-5
MAX_OVERFLOWS = 32


class PreparedDDPM(nn.Module):
    """The DDPM that the loop calls: `ddpm(x, c)` is the loss of the batch x (with
    its labels c, which only a class-conditional DDPM reads), autocast to `dtype`
    under --amp and through DistributedDataParallel under torchrun (`parallel`);
    `ddpm.sample(...)` is the DDPM's own. Under float16, backward starts from the
    loss times the scaler's scale, while the loss itself stays as it is."""

    def __init__(
        self,
        ddpm: DDPM,
        parallel: nn.Module,
        dtype: torch.dtype | None,
        scaler: torch.amp.GradScaler,
        readings: "StepReadings",
    ) -> None:
        super().__init__()
        self.ddpm, self.parallel, self.dtype = ddpm, parallel, dtype
        self.scaler, self.readings = scaler, readings

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        # the labels on x's device, where the DDPM reads them
        c = c.to(x.device) if self.ddpm.n_classes is not None else None
        with torch.autocast(x.device.type, self.dtype, enabled=bool(self.dtype)):
            loss = self.parallel(x, c)
        # its copy to the host starts now, for the guard
        self.readings.take_loss(loss)
        if self.scaler.is_enabled():
            loss.register_hook(self.scaler.scale)
        return loss

    def sample(self, *args, **kwargs) -> torch.Tensor:
        return self.ddpm.sample(*args, **kwargs)


class PreparedOptimizer:
    """The notes' optimizer, whose `step()` goes through the float16 loss scaler
    under --amp fp16, as GradScaler's `scaler.step(optim)` and `scaler.update()`;
    everything else is the optimizer's own."""

    def __init__(self, optim: torch.optim.Optimizer, scaler: torch.amp.GradScaler):
        self.optim, self.scaler = optim, scaler

    def step(self) -> None:
        if not self.scaler.is_enabled():
            self.optim.step()
            return
        self.scaler.step(self.optim)
        self.scaler.update()

    def __getattr__(self, name: str):
        return getattr(self.optim, name)


class Guard:
    """Before each optimizer step: refuse a loss or gradient that is not finite, so
    that divergence never reaches the weights or the disk, and clip the gradients
    under --grad-clip; under --amp fp16, unscale them first, and let the scaler skip
    a step whose gradients overflowed, unless that goes on MAX_OVERFLOWS steps."""

    def __init__(
        self,
        optim: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        readings: "StepReadings",
        grad_clip: float | None,
    ) -> None:
        self.optim, self.scaler, self.readings = optim, scaler, readings
        self.grad_clip, self.overflows = grad_clip, 0

    def check(self, epoch: int, step: int) -> float:
        """Check step `step` of epoch `epoch` and clip; return its loss."""
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optim)
        # under fp16, the norm of the scaled gradients: infinite where they overflowed
        loss_value, norm_value = self.readings.read()
        finite = math.isfinite(norm_value)
        self.overflows = 0 if finite else self.overflows + 1
        # a loss already not finite in the forward pass is divergence: float16
        # overflows in the gradients, which the loss scale multiplies
        overflow = self.scaler.is_enabled() and not finite
        overflow = overflow and math.isfinite(loss_value)
        if overflow and self.overflows < MAX_OVERFLOWS:
            # the scaler skips this step and lowers its scale
            return loss_value
        if not (math.isfinite(loss_value) and finite):
            raise UserError(
                f"training diverged at epoch {epoch}, step {step}: the loss is "
                f"{loss_value} and the gradient norm {norm_value}"
                + (f" for {self.overflows} float16 steps in a row" if overflow else "")
                + ", so the weights were not updated and the last checkpoint is "
                "kept; try a lower --lr or --grad-clip 1.0, then --resume"
            )
        if self.grad_clip:
            parameters = [
                p for group in self.optim.param_groups for p in group["params"]
                if p.grad is not None
            ]
            torch.nn.utils.clip_grad_norm_(parameters, self.grad_clip)
        return loss_value


class StepReadings:
    """The loss and gradient norm of the step under way, for `parallel`: the DDPM,
    or under torchrun its DistributedDataParallel, whose averaged gradients count.

    The norm is the infinity norm, max |g|: infinite or NaN exactly when a gradient
    is, and unlike the sum of squares it cannot overflow, even on the scaled
    gradients of float16 training.
    """

    def __init__(self, parallel: nn.Module) -> None:
        self.loss = self.norm = self.copied = None
        # under torchrun: the futures and largest magnitudes of the step's buckets
        self.pending, self.largest = [], []
        if isinstance(parallel, DistributedDataParallel):
            parallel.register_comm_hook(self, averaging_hook)
        else:
            parameters = [p for p in parallel.parameters() if p.requires_grad]
            register_multi_grad_hook(parameters, self.gradients_done)

    def take_loss(self, loss: torch.Tensor) -> None:
        """Start the copy of the step's loss to the host."""
        self.loss = to_host(loss.detach())

    def gradients_done(self, grads) -> None:
        """At the end of backward: start the copy of the gradients' norm."""
        grads = [g for g in grads if g is not None]
        self.take_norm(torch.nn.utils.get_total_norm(grads, norm_type=math.inf))

    def take_norm(self, norm: torch.Tensor) -> None:
        self.norm = to_host(norm)
        if norm.device.type == "cuda":
            # the loss's copy was queued before this one, so one event covers both
            self.copied = torch.cuda.Event()
            self.copied.record()

    def read(self) -> tuple[float, float]:
        """The step's loss and gradient norm, as Python floats."""
        if self.copied is not None:
            # already done after the notes' loss.item(); otherwise a wait
            self.copied.synchronize()
        return self.loss.item(), self.norm.item()

    def bucket_averaged(self, future: torch.futures.Future) -> torch.Tensor:
        """A bucket of gradients, averaged across the ranks: keep its max |g|."""
        averaged = future.value()
        self.largest.append(averaged.abs().amax())
        return averaged

    def buckets_done(self, last: torch.Tensor) -> torch.Tensor:
        """Every bucket averaged: the norm of them all."""
        self.take_norm(torch.stack(self.largest).amax())
        self.largest = []
        return last


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """On a CUDA GPU, a copy of `tensor` on the CPU, queued behind the GPU's work;
    elsewhere `tensor` itself, read when it is needed."""
    return tensor.to("cpu", non_blocking=True) if tensor.is_cuda else tensor


def averaging_hook(
    readings: StepReadings, bucket
) -> torch.futures.Future[torch.Tensor]:
    """DistributedDataParallel's own averaging of a bucket of gradients, which also
    keeps the bucket's largest magnitude; the last bucket's future waits for all, so
    that the norm covers every bucket, whatever order they finish in."""
    future = allreduce_hook(None, bucket).then(readings.bucket_averaged)
    readings.pending.append(future)
    if not bucket.is_last():
        return future
    pending, readings.pending = readings.pending, []
    return torch.futures.collect_all(pending).then(
        lambda _: readings.buckets_done(future.value())
    )


def warmup_decay(decay: float, n: int) -> float:
    """The decay of the update that follows n updates: min(DECAY, (1+n)/(10+n))."""
    return min(decay, (1 + n) / (10 + n))


def averaged_copy(model: nn.Module, decay: float, warmup: bool = True) -> AveragedModel:
    """A copy of `model` whose weights, BatchNorm statistics included, follow the
    moving average of model's at each `update_parameters(model)`; its first update
    copies the weights, as torch's AveragedModel does, and its count of updates,
    `n_averaged`, travels in its state_dict, so that a resume goes on warming up
    where it stopped."""

    @torch.no_grad()
    def update(averages: list, weights: list, n_on_device: torch.Tensor) -> None:
        # the count as AveragedModel keeps it, on the CPU: reading the copy it
        # passes on would make a GPU wait
        n = int(averaged.n_averaged)
        d = warmup_decay(decay, n) if warmup else decay
        if torch.is_floating_point(averages[0]):
            # e <- d e + (1 - d) w, as a lerp of e towards w by 1 - d
            torch._foreach_lerp_(averages, weights, 1 - d)
        else:
            # BatchNorm's integer count of batches
            for e, w in zip(averages, weights):
                e.copy_(e * d + w * (1 - d))

    averaged = AveragedModel(model, multi_avg_fn=update, use_buffers=True)
    return averaged
