"""Around the optimizer's step: the guard before it, and the --ema average after it.

The guard reads the step's loss and the largest magnitude of its gradients, max |g|:
infinite or NaN exactly when a gradient is, and unlike the sum of squares it cannot
overflow, even on the scaled gradients of float16 training. Under torchrun the
gradients it reads are DistributedDataParallel's averages, the same on every rank.
The notes' loop already waits for the GPU once a step, at `loss.item()`, after
backward; the guard's reading waits only for the norm's one small kernel after it.

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
from torch.optim.swa_utils import AveragedModel

from mindiffusion.training.flags import UserError

# float16 steps that overflow in a row before the run counts as diverged: by then
# the loss scale has fallen from 65536 to about 1e-5
MAX_OVERFLOWS = 32


class Guard:
    """Before each optimizer step: refuse a loss or gradient that is not finite, so
    that divergence never reaches the weights or the disk. Under --amp fp16, whose
    gradients the caller has unscaled, a step whose gradients overflowed is left to
    the scaler, which skips it, unless that goes on MAX_OVERFLOWS steps."""

    def __init__(self, optim: torch.optim.Optimizer, scaled: bool) -> None:
        self.optim, self.scaled, self.overflows = optim, scaled, 0

    def check(self, loss: torch.Tensor, epoch: int, step: int) -> float:
        """Check step `step` of epoch `epoch`; return its loss as a float."""
        grads = [
            p.grad for group in self.optim.param_groups for p in group["params"]
            if p.grad is not None
        ]
        norm = torch.nn.utils.get_total_norm(grads, norm_type=math.inf)
        # one copy to the host for both
        loss_value, norm_value = torch.stack([loss.detach().float(), norm]).tolist()
        finite = math.isfinite(norm_value)
        self.overflows = 0 if finite else self.overflows + 1
        # a loss already not finite in the forward pass is divergence: float16
        # overflows in the gradients, which the loss scale multiplies
        overflow = self.scaled and not finite and math.isfinite(loss_value)
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
        return loss_value


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
