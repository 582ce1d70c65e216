"""The prepared DDPM that the notes' loop calls: `ddpm(x)` for the loss and
`ddpm.sample(...)` for the epoch's grid, each doing what the run's flags add to the
notes' plain calls.
"""
import contextlib
import os
import time

import torch
import torch.nn as nn
from torchvision.utils import make_grid, save_image

from mindiffusion.ddim import DDIM
from mindiffusion.ddpm import DDPM
from mindiffusion.training import conditioning, progress, signals
from mindiffusion.training.checkpoints import GRIDS, Checkpoint
from mindiffusion.training.data import PreparedLoader, denormalize
from mindiffusion.training.distributed import largest, process_rank
from mindiffusion.training.readings import StepReadings


class PreparedDDPM(nn.Module):
    """The DDPM the notes' loop calls: `ddpm(x)` returns the loss, autocast under
    --amp, with the batch's labels under --cond and through DistributedDataParallel
    under torchrun; `ddpm.sample(...)` draws the epoch's grid, from the --ema average
    where there is one, with a row of each class under --cond, and saves the epoch
    first, so that a stop during a long grid loses nothing. It follows the flags of
    `run`, the Run (run.py) that prepares it."""

    def __init__(
        self,
        run,
        checkpoint: Checkpoint,
        parallel: nn.Module,
        loader: PreparedLoader,
        dtype: torch.dtype | None,
        readings: StepReadings,
    ) -> None:
        super().__init__()
        self.ddpm, self.parallel, self.ema = checkpoint.ddpm, parallel, checkpoint.ema
        self.run, self.checkpoint, self.loader = run, checkpoint, loader
        self.dtype, self.scaler, self.readings = dtype, checkpoint.scaler, readings
        # the epochs saved
        self.saved = None
        # the training steps this run has taken, and how many its last grid came after
        self.steps, self.grid_at = 0, None
        # when the last grid was drawn, or the run began, for --grid-minutes
        self.grid_clock = time.monotonic()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the labels, with --cond; the notes' unconditional DDPM takes none
        c = self.loader.labels.to(x.device) if self.run.cond else None
        with torch.autocast(x.device.type, self.dtype, enabled=bool(self.dtype)):
            loss = self.parallel(x, c)
        # for the guard's checks of this step
        self.readings.take_loss(loss)
        self.steps += 1
        if self.scaler.is_enabled():
            # backward starts from the loss times the scale, while the loss itself,
            # and the progress bar's, stay as they are
            loss.register_hook(self.scaler.scale)
        return loss

    def sample(self, n_sample: int, size, device) -> torch.Tensor:
        """The epoch's grid (see `grid_walk`), drawn after the epoch is saved."""
        ddpm, sample_args = self.grid_walk(n_sample, size, device)
        epoch = self.loader.epoch
        self.save_before_grid(ddpm, epoch, sample_args)
        if signals.received:
            signals.noted(signals.received)

        def stopped(signum: int) -> str:
            return (
                f"stopped by {signals.name(signum)} during the grid of epoch "
                f"{epoch - 1}: the epoch is saved in {self.checkpoint.path}; run the "
                f"same command with --resume to go on"
            )

        return self.draw(ddpm, sample_args, stopped)

    def grid_being_written(self) -> str | None:
        """The path of the epoch's grid while the script writes it: drawn from the
        weights saved at the epoch's end, with no step since."""
        epoch, batches = self.checkpoint.saved_at or (0, 0)
        if self.grid_at != self.steps or batches or epoch == 0:
            return None
        return grid_path(self.checkpoint.path, epoch - 1)

    def grid_walk(self, n_sample: int, size, device) -> tuple[DDPM, tuple]:
        """The grids' sampler and its arguments: n_sample images of shape `size`,
        or under --cond a row of 4 for each of the first ten classes, guided with
        weight --guide-w."""
        ddpm = self.grid_sampler()
        n_classes = ddpm.n_classes
        c = conditioning.grid_classes(n_classes, 4, device) if n_classes else None
        n_sample = n_sample if c is None else len(c)
        return ddpm, (n_sample, size, device, c, self.run.guide_w)

    def draw(self, ddpm: DDPM, sample_args: tuple, stopped) -> torch.Tensor:
        """ddpm.sample(*sample_args), where a second stop signal raises Stopped with
        the message stopped(signum)."""
        # a bar over the timesteps: a 1000-step grid takes minutes, on a CPU hours
        with signals.grid_in_progress(stopped), progress.timesteps(ddpm, "grid"):
            with torch.no_grad():
                xh = ddpm.sample(*sample_args)
        self.grid_at, self.grid_clock = self.steps, time.monotonic()
        return xh

    def grid_sampler(self) -> DDPM:
        """What draws the grids: the --ema average where there is one, else the
        model; with --grid-sampler ddim, as a DDIM of --grid-steps steps."""
        ddpm = self.ddpm if self.ema is None else self.ema.module.eval()
        if self.run.grid_sampler == "ddpm":
            return ddpm
        # 50 steps by default, as mindiffusion.sample takes; eta 1, the noise of
        # DDPM's posterior, which keeps a young model's samples clean (README)
        return DDIM.of(ddpm, self.run.grid_steps or min(50, ddpm.n_T), eta=1.0)

    def final_grid(self) -> None:
        """After a stop signal and its save, the grid of the weights just saved:
        training may have stopped long before the next grid was due. A second
        signal skips it, as does a grid already drawn from these weights."""
        if signals.count > 1 or self.grid_at == self.steps or process_rank() > 0:
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
        self.write_grid(path, stopped)

    def grid_within_epoch(self, epoch: int, batches: int) -> None:
        """--grid-minutes: once the minutes have passed since the last grid, save
        and draw the grid of this step's weights, leaving training's random numbers
        as they were, so that the run trains the same whenever its grids come.
        Under torchrun every rank calls it after the same steps and takes part in
        the save; rank 0, which draws every grid, keeps the clock."""
        minutes = self.run.grid_minutes
        path = step_grid_path(self.checkpoint.path, epoch, batches)
        if minutes is None or path is None:
            return
        due = process_rank() == 0 and time.monotonic() - self.grid_clock >= 60 * minutes
        if not largest(int(due)):
            return
        self.checkpoint.save(epoch, batches)
        if process_rank() > 0:
            return

        def stopped(signum: int) -> str:
            return (
                f"stopped by {signals.name(signum)} during the grid of epoch {epoch}, "
                f"step {batches}: saved in {self.checkpoint.path}; run the same "
                f"command with --resume to go on"
            )

        device = next(self.ddpm.parameters()).device
        cuda = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            self.write_grid(path, stopped)
        self.train()

    def write_grid(self, path: str, stopped) -> None:
        """Draw the grid of the weights as they are, in eval mode, and write it to
        path; a second signal raises Stopped with the message stopped(signum)."""
        device = next(self.ddpm.parameters()).device
        # the loop was training: BatchNorm draws with its running statistics
        self.eval()
        recipe = self.checkpoint.recipe
        ddpm, sample_args = self.grid_walk(16, recipe["image_size"], device)
        xh = self.draw(ddpm, sample_args, stopped)
        save_image(make_grid(denormalize(xh, recipe["normalize"]), nrow=4), path)
        print(f"wrote {path}")

    def save_before_grid(self, ddpm: DDPM, epoch: int, sample_args: tuple) -> None:
        """Save the epoch with the random state the grid will leave, so that a run
        resumed from this save draws what a straight run draws after the grid.

        The sampler walks once with a noise model that predicts zeros: the same
        draws as the grid's, without the network, on the same generators.
        """
        device = sample_args[2]
        on_cuda = torch.device(device).type == "cuda"
        cpu_state = torch.get_rng_state()
        cuda_state = torch.cuda.get_rng_state(device) if on_cuda else None
        with zeros_for(ddpm):
            ddpm.sample(*sample_args)
        self.checkpoint.save(epoch)
        self.saved = epoch
        torch.set_rng_state(cpu_state)
        if on_cuda:
            torch.cuda.set_rng_state(cuda_state, device)


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
