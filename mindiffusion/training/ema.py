"""--ema: an exponential moving average of the weights, with a warm-up.

After each optimizer step the average e moves towards the weights w,
e <- d e + (1 - d) w. A fixed decay d = DECAY forgets the initial weights slowly:
at 0.995, 63 steps still leave 0.995^62, about 73% of them, in the average. The
warm-up of diffusers' and ema-pytorch's EMA models lets a young average follow the
weights: after n updates the decay is min(DECAY, (1 + n) / (10 + n)). The first
update copies the weights; the next ones decay by 2/11, 3/12, ..., up to DECAY,
which 0.995 reaches after 1,790 updates.
"""
import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel


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
