"""The trainer's grids: what draws them (the model or its --ema average, DDPM's walk
or DDIM's, --cond's rows of classes), the walk itself with a bar over its steps and
stop signals heard, the image each recipe makes of the samples, written whole, and
the random state that an epoch's grid leaves, which the save before it keeps.
"""
import contextlib
import io
import os

import torch
import torch.nn as nn
from torchvision.utils import make_grid, save_image

from mindiffusion.ddim import DDIM
from mindiffusion.ddpm import DDPM
from mindiffusion.training import progress, signals
from mindiffusion.training.data import denormalize, grid_classes, kept_walk
from mindiffusion.training.devices import cuda_of
from mindiffusion.training.files import write_atomically
from mindiffusion.training.flags import UserError


def sampler_for(ddpm: DDPM, args, normalize, n_sample: int, device):
    """What draws a grid of `ddpm` (the model, or its --ema average) under the flags
    `args`: ddpm itself, or under --grid-sampler ddim a DDIM of --grid-steps; and
    how many images of which classes c: n_sample with no class (None), or under
    --cond a row of 4 for each of the first ten classes."""
    if args.grid_sampler == "ddim":
        # 50 steps by default, as mindiffusion.sample takes; eta 1, the noise of
        # DDPM's posterior, which keeps a young model's samples clean; x_0 kept
        # within the data's range, as sample keeps it
        steps = args.grid_steps or min(50, ddpm.n_T)
        kept = kept_walk(normalize, unit_eps=args.unit_eps)
        ddpm = DDIM.of(ddpm, steps, eta=1.0, **kept)
    if ddpm.n_classes is None:
        return ddpm, n_sample, None
    c = grid_classes(ddpm.n_classes, 4, device)
    return ddpm, len(c), c


def walk(sampler: DDPM, n_sample: int, size, device, c, guide_w: float, stopped: str,
         saved: str | None) -> torch.Tensor:
    """`sampler.sample(...)`, the same samples, with a bar over its steps (a
    1000-step grid takes minutes, on a CPU far more). A stop signal while it walks
    is acknowledged, naming what the save before the grid kept, `saved` (None: a
    stop acknowledged already); a second one stops the run with the sentence
    `stopped`, whose {signal} names it."""
    if signals.received and saved is not None:
        # a signal on the epoch's last step waits for the grid's end
        signals.noted(signals.received, saved)
    with signals.grid_in_progress(stopped, saved):
        with progress.timesteps(sampler, "grid"):
            return sampler.sample(n_sample, size, device, c, guide_w)


def image(xh: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """The grid of samples xh as each script draws it, 4 a row: MNIST's shifted
    back by its Normalize, [-0.5, 0.5] -> [0, 1]; CIFAR-10's and CelebA's above the
    `real` images, rescaled from [-1, 1]."""
    if real is None:
        return make_grid(xh + 0.5, nrow=4)
    xset = torch.cat([xh, real], dim=0)
    return make_grid(xset, normalize=True, value_range=(-1, 1), nrow=4)


def write(path: str, grid: torch.Tensor, checkpoint: str) -> None:
    """Write the grid to path as a PNG, whole or not at all; a failure, such as a
    full disk, is one sentence that says the `checkpoint` is kept."""
    buffer = io.BytesIO()
    save_image(grid, buffer, format="png")
    try:
        write_atomically(path, buffer.getvalue())
    except OSError as err:
        raise UserError(
            f"the grid {path} could not be written ({err.strerror}); the weights are "
            f"saved in {checkpoint}: make room or give another --out, then --resume"
        ) from None
    print(f"wrote {path}")


def of_weights(sampler: DDPM, c, size, normalize, device, guide_w: float, path: str,
               checkpoint: str, saved: str | None, stopped: str) -> None:
    """The grid of the weights as they are, drawn within an epoch or after a stop:
    16 samples, or under --cond the rows of classes c, undone from the data's
    Normalize, written to path."""
    n_sample = 16 if c is None else len(c)
    xh = walk(sampler, n_sample, size, device, c, guide_w, stopped, saved)
    write(path, make_grid(denormalize(xh, normalize), nrow=4), checkpoint)


def step_path(template: str, folder: str, epoch: int, batches: int) -> str:
    """The grid's path after `batches` steps of epoch: the script's own name for
    the epoch's grid at its end (batches 0), else with the step added."""
    path = os.path.join(folder, template.format(epoch))
    if batches == 0:
        return path
    # ddpm_sample_3.png -> ddpm_sample_3_step40.png
    return f"{os.path.splitext(path)[0]}_step{batches}.png"


class ZeroEps(nn.Module):
    """A noise model that predicts zeros, for a walk of the sampler's draws alone."""

    def forward(self, x, t, c=None):
        return torch.zeros_like(x)


def random_state_after(sampler: DDPM, n_sample: int, size, device, c,
                       guide_w: float) -> tuple:
    """The random state that the grid `sampler.sample(n_sample, size, device, c,
    guide_w)` will leave, for the save before it; the state itself is left as it
    was. How many numbers a walk draws only the sampler knows (DDPM's or DDIM's,
    guided or not), so it walks once with a model of zeros: the same draws as the
    grid's, on the same generators, with no network."""
    cuda = cuda_of(torch.device(device))
    with torch.random.fork_rng(devices=cuda), zeros_for(sampler):
        sampler.sample(n_sample, size, device, c, guide_w)
        after_cpu = torch.get_rng_state()
        after_cuda = torch.cuda.get_rng_state(device) if cuda else None
    return after_cpu, after_cuda


@contextlib.contextmanager
def zeros_for(ddpm: DDPM):
    """ddpm with the zero noise model in place of its own, while it lasts."""
    eps_model = ddpm.eps_model
    ddpm.eps_model = ZeroEps()
    try:
        yield
    finally:
        ddpm.eps_model = eps_model
