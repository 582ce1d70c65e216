"""The grids of a training run: what draws them (the model or its --ema average,
DDPM's walk or DDIM's, --cond's rows of classes), where each goes, the random state
the save before an epoch's grid keeps, and the grids the run draws itself: within
an epoch under --grid-minutes, and after a stop signal.
"""
import contextlib
import os
import time
from collections.abc import Callable

import torch
import torch.nn as nn
from torchvision.utils import make_grid, save_image

from mindiffusion.ddim import DDIM
from mindiffusion.ddpm import DDPM
from mindiffusion.training import progress, signals
from mindiffusion.training.data import denormalize, grid_classes, kept_walk
from mindiffusion.training.devices import largest, process_rank

# the names of the grids each script writes beside its checkpoint, by epoch, which
# a new run must not overwrite
GRIDS = {
    "ddpm_mnist.pth": "ddpm_sample_{}.png",
    "ddpm_cifar.pth": "ddpm_sample_cifar{}.png",
    "ddpm_celeba.pth": "ddpm_sample_celeba{:03d}.png",
}
# the samples of each script's grid, whose random draws the save before it keeps
GRID_SAMPLES = {"ddpm_mnist.pth": 16, "ddpm_cifar.pth": 8, "ddpm_celeba.pth": 8}


class Grids:
    """The grids of `run`, a prepared Run (run.py), whose flags, checkpoint, --ema
    average and steps they follow."""

    def __init__(self, run) -> None:
        self.run = run
        self.checkpoint = run.checkpoint
        self.device = next(self.checkpoint.ddpm.parameters()).device
        # the training steps after which the last grid came, and when it came (or
        # the run began), for --grid-minutes
        self.drawn_at, self.clock = None, time.monotonic()

    def walk(self, ddpm: DDPM, n_sample: int) -> tuple[DDPM, int, torch.Tensor | None]:
        """What draws a grid of ddpm, how many and of which classes: ddpm, or the
        --ema average; as DDIM of --grid-steps under --grid-sampler ddim; n_sample
        images with no class (None), or under --cond a row of 4 for each of the
        first ten classes."""
        run = self.run
        if run.ema_model is not None:
            ddpm = run.ema_model.module.eval()
        if run.grid_sampler == "ddim":
            # 50 steps by default, as mindiffusion.sample takes; eta 1, the noise
            # of DDPM's posterior, which keeps a young model's samples clean; x_0
            # kept within the data's range and eps at its scale, as sample keeps
            steps = run.grid_steps or min(50, ddpm.n_T)
            kept = kept_walk(self.checkpoint.recipe["normalize"])
            ddpm = DDIM.of(ddpm, steps, eta=1.0, **kept)
        if ddpm.n_classes is None:
            return ddpm, n_sample, None
        c = grid_classes(ddpm.n_classes, 4, self.device)
        return ddpm, len(c), c

    def sampler(
        self,
        ddpm: DDPM,
        n_sample: int,
        stopped: Callable[[int], str],
        saved: str = "its epoch",
    ):
        """`walk(ddpm, n_sample)`, its sampler a GridSampler that a second signal
        stops with the message stopped(signum), and whose first signal names what
        the save before it kept, `saved`."""
        sampler, n_sample, c = self.walk(ddpm, n_sample)
        return GridSampler(sampler, stopped, self.drawn, saved), n_sample, c

    def drawn(self) -> None:
        """Note that a grid of the weights as they are has just been drawn."""
        self.drawn_at, self.clock = self.run.steps, time.monotonic()

    def save_before(self, epoch: int) -> None:
        """Save `epoch` with the random state that its grid will leave, so that a run
        resumed from this save draws what a straight run draws after the grid.

        The sampler walks once with a noise model that predicts zeros: the same
        draws as the grid's, without the network, on the same generators.
        """
        file = os.path.basename(self.checkpoint.path)
        sampler, n_sample, c = self.walk(self.checkpoint.ddpm, GRID_SAMPLES[file])
        size = self.checkpoint.recipe["image_size"]
        on_cuda = self.device.type == "cuda"
        cpu_state = torch.get_rng_state()
        cuda_state = torch.cuda.get_rng_state(self.device) if on_cuda else None
        with zeros_for(sampler):
            sampler.sample(n_sample, size, self.device, c, self.run.guide_w)
        self.checkpoint.save(epoch)
        torch.set_rng_state(cpu_state)
        if on_cuda:
            torch.cuda.set_rng_state(cuda_state, self.device)

    def being_written(self) -> str | None:
        """The path of the epoch's grid while the script writes it: drawn from the
        weights saved at the epoch's end, with no step since."""
        epoch, batches = self.checkpoint.saved_at or (0, 0)
        if self.drawn_at != self.run.steps or batches or epoch == 0:
            return None
        return grid_path(self.checkpoint.path, epoch - 1)

    def after_stop(self) -> None:
        """After a stop signal and its save, the grid of the weights just saved:
        training may have stopped long before the next grid was due. A second
        signal skips it, as does a grid already drawn from these weights."""
        if signals.count > 1 or self.drawn_at == self.run.steps or process_rank() > 0:
            return
        epoch, batches = self.checkpoint.saved_at
        # the script's name for the grid of the epoch saved, or of the step
        path = step_grid_path(
            self.checkpoint.path, epoch - 1 if batches == 0 else epoch, batches
        )
        if path is None or os.path.exists(path):
            return

        def stopped(signum: int) -> str:
            return (
                f"stopped by {signals.name(signum)} during the final grid: the run is "
                f"saved in {self.checkpoint.path}; run the same command with --resume "
                f"to go on"
            )

        print("drawing the grid of the weights saved (a second signal skips it)")
        # the signal that stopped the run was acknowledged: no "noted" again
        self.write(path, stopped, None)

    def within_epoch(self, epoch: int, batches: int) -> bool:
        """--grid-minutes: once the minutes have passed since the last grid, save
        and draw the grid of this step's weights, leaving training's random numbers
        as they were, so that the run trains the same whenever its grids come; and
        return whether it did. Under torchrun every rank calls it after the same
        steps and takes part in the save; rank 0, which draws every grid, keeps the
        clock."""
        minutes = self.run.grid_minutes
        path = step_grid_path(self.checkpoint.path, epoch, batches)
        if minutes is None or path is None:
            return False
        due = process_rank() == 0 and time.monotonic() - self.clock >= 60 * minutes
        if not largest(int(due)):
            return False
        self.checkpoint.save(epoch, batches)
        if process_rank() > 0:
            return True

        def stopped(signum: int) -> str:
            return (
                f"stopped by {signals.name(signum)} during the grid of epoch {epoch}, "
                f"step {batches}: saved in {self.checkpoint.path}; run the same "
                f"command with --resume to go on"
            )

        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            self.write(path, stopped, "its step")
        self.run.model.train()
        return True

    def write(
        self, path: str, stopped: Callable[[int], str], saved: str | None
    ) -> None:
        """Draw a grid of 16 samples of the weights as they are, in eval mode, and
        write it to path; a first signal is acknowledged naming what was `saved`,
        and a second raises Stopped with stopped(signum)."""
        # the loop was training: BatchNorm draws with its running statistics
        self.run.model.eval()
        sampler, n_sample, c = self.sampler(self.checkpoint.ddpm, 16, stopped, saved)
        recipe = self.checkpoint.recipe
        xh = sampler.sample(n_sample, recipe["image_size"], self.device, c,
                            self.run.guide_w)
        save_image(make_grid(denormalize(xh, recipe["normalize"]), nrow=4), path)
        print(f"wrote {path}")


class GridSampler:
    """A grid's sampler: `sample` is `sampler.sample`, the same samples, with a bar
    over its steps (a 1000-step grid takes minutes, on a CPU hours); a stop signal
    while it walks is acknowledged, naming what the save before the grid kept,
    `saved` (None: the stop was acknowledged already), and a second one raises
    Stopped with the message stopped(signum). drawn() is called once the samples
    are there."""

    def __init__(
        self, sampler: DDPM, stopped: Callable, drawn: Callable, saved: str
    ) -> None:
        self.sampler, self.stopped, self.drawn = sampler, stopped, drawn
        self.saved = saved

    def sample(self, *args, **kwargs) -> torch.Tensor:
        # a signal before the grid, on the epoch's last step, waits for its end
        if signals.received and self.saved is not None:
            signals.noted(signals.received, self.saved)
        with signals.grid_in_progress(self.stopped, self.saved):
            with progress.timesteps(self.sampler, "grid"):
                xh = self.sampler.sample(*args, **kwargs)
        self.drawn()
        return xh


class ZeroEps(nn.Module):
    """A noise model that predicts zeros, for a walk of the sampler's draws alone."""

    def forward(self, x, t, c=None):
        return torch.zeros_like(x)


@contextlib.contextmanager
def zeros_for(ddpm: DDPM):
    """ddpm with the zero noise model in place of its own, while it lasts."""
    eps_model = ddpm.eps_model
    ddpm.eps_model = ZeroEps()
    try:
        yield
    finally:
        ddpm.eps_model = eps_model


def step_grid_path(checkpoint_path: str, epoch: int, batches: int) -> str | None:
    """The grid's path after `batches` steps of epoch: the script's own name for
    the epoch's grid at its end (batches 0), else with the step added."""
    path = grid_path(checkpoint_path, epoch)
    if path is None or batches == 0:
        return path
    # ddpm_sample_3.png -> ddpm_sample_3_step40.png
    return f"{os.path.splitext(path)[0]}_step{batches}.png"


def grid_path(checkpoint_path: str, epoch: int) -> str | None:
    """Where the script of the checkpoint at checkpoint_path writes epoch's grid."""
    folder, file = os.path.split(checkpoint_path)
    template = GRIDS.get(file)
    return template and os.path.join(folder, template.format(epoch))
