"""One prepared run: the training scripts' feature flags, and `Run.prepare`, which
readies the notes' ddpm, optim and dataloader for them in the manner of
Accelerate's `prepare`, so that the notes' loop runs on them line for line.

Every flag is off by default, and a run with all of them off trains number for
number as the notes' code does.
"""
import contextlib
import dataclasses
import inspect
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.utils import make_grid, save_image

from mindiffusion import conditioning, progress, signals
from mindiffusion.checkpoints import GRIDS, Checkpoint
from mindiffusion.data import PreparedLoader, denormalize
from mindiffusion.ddim import DDIM
from mindiffusion.ddpm import DDPM
from mindiffusion.devices import autocast_dtype, resolve_device
from mindiffusion.distributed import (
    distribute,
    gather,
    init_processes,
    largest,
    process_rank,
    say,
)
from mindiffusion.duties import StepDuties
from mindiffusion.ema import averaged_copy
from mindiffusion.errors import UserError
from mindiffusion.fastpath import fast_settings
from mindiffusion.locks import hold_lock, release
from mindiffusion.readings import StepReadings


@dataclasses.dataclass
class Run:
    """The feature flags of a training script, each documented in its --help.

    seed: torch's seed (each torchrun rank adds its rank); num_workers: DataLoader
    worker processes; resume: go on from the checkpoint; fake_data: train on N
    random images of the dataset's shape; fast: turn on the speed flags that pay
    on the device (mindiffusion/fastpath.py); amp: autocast the forward pass (auto,
    bf16 or fp16); channels_last: the weights, and so the activations, in
    channels_last; compile: torch.compile the noise model; ema: the decay of an
    averaged copy of the weights, which draws the grids; ema_warmup: a young average
    decays less (mindiffusion/ema.py); save_every: also save every N steps;
    grad_clip: clip the gradients' norm; grid_every: draw the grid every N epochs and
    after the last; grid_sampler, grid_steps: draw it with DDPM's n_T steps, or with
    DDIM's grid_steps; cond: train on the labels, with classifier-free
    guidance; p_uncond: how often a label is hidden; guide_w: the grids' guidance.
    """

    seed: int | None = None
    num_workers: int = 0
    resume: bool = False
    fake_data: int | None = None
    fast: bool = False
    amp: str | None = None
    channels_last: bool = False
    compile: bool = False
    ema: float | None = None
    ema_warmup: bool = True
    save_every: int | None = 1000
    grad_clip: float | None = None
    grid_every: int = 1
    grid_sampler: str = "ddpm"
    grid_steps: int | None = None
    cond: bool = False
    p_uncond: float = 0.1
    guide_w: float = 2.0

    def __post_init__(self) -> None:
        # what `prepare` makes: the prepared model, and the lock on its checkpoint
        self.model = self.lock = None

    def setup(self, device: str, out: str) -> torch.device:
        """The device to train on, joined to torchrun's processes, with torch
        seeded and the folder --out made: all that comes before the model."""
        device = init_processes(resolve_device(device))
        if self.seed is not None:
            # each rank its own noise; DDP starts every rank from rank 0's weights
            torch.manual_seed(self.seed + process_rank())
        output_folder(out)
        return device

    def prepare(
        self,
        ddpm: DDPM,
        optim: torch.optim.Optimizer,
        dataloader: DataLoader,
        n_epoch: int,
        path: str,
    ):
        """The notes' ddpm, optim and dataloader, ready for this run's flags, with
        the checkpoint at `path` and --resume taken up; see `PreparedDDPM`,
        `StepDuties` and `PreparedLoader` for what each one does besides."""
        device = next(ddpm.parameters()).device
        if self.fast:
            self.take_fast_path(device)
        if self.channels_last:
            # a convolution with channels_last weights returns channels_last, so
            # the notes' x.to(device) is all the batches need
            ddpm.to(memory_format=torch.channels_last)
        # --ema: a copy whose weights follow a moving average of ddpm's
        ema = None
        if self.ema is not None:
            ema = averaged_copy(ddpm, self.ema, self.ema_warmup)
        if self.compile:
            # compiled in place, so that the state_dict keeps the notes' names
            ddpm.eps_model.compile()
            say(
                "--compile: the noise model compiles in the first training step and "
                "again in the first grid, each a minute or more on a small CPU"
            )
        dtype = autocast_dtype(self.amp, device)
        # float16 needs its loss scaled, so that small gradients do not round to zero
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        settings = dict(
            batch_size=dataloader.batch_size, ema=self.ema, ema_warmup=self.ema_warmup,
            amp=self.amp, seed=self.seed,
        )
        if self.lock is not None:
            # a Run prepared again, such as a script's default one, starts afresh
            release(self.lock)
            self.lock = None
        if process_rank() == 0:
            # while this run lasts, no other run can take the same checkpoint
            self.lock = hold_lock(path + ".lock", os.path.dirname(path) or ".")
        recipe = recipe_of(ddpm, dataloader.dataset)
        checkpoint = Checkpoint(path, ddpm, optim, recipe, ema, scaler, settings)
        start = checkpoint.resume_or_start(self.resume, n_epoch, self.seed)
        # the record times each epoch from its first batch, after the last one's grid
        loader = PreparedLoader(
            dataloader, device, self.num_workers, start.data_seed, *start[:2],
            checkpoint.record.start_epoch,
        )
        parallel = distribute(ddpm, device)
        readings = StepReadings(parallel)
        model = PreparedDDPM(self, checkpoint, parallel, loader, dtype, readings)
        StepDuties(
            checkpoint, loader, readings, start.batches, self.save_every,
            self.grad_clip, ema,
        )
        self.n_epoch, self.start_epoch, self.model = n_epoch, start.epoch, model
        return model, optim, loader

    def take_fast_path(self, device: torch.device) -> None:
        """Turn on what --fast takes on this device, leaving a flag given as well
        as it is, and say what that is."""
        defaults = Run()
        for name, value in fast_settings(device).items():
            if getattr(self, name) == getattr(defaults, name):
                setattr(self, name, value)
        # the speed flags now on, as the command line writes them: --amp auto
        words = [
            f"--{name.replace('_', '-')}" + ("" if value is True else f" {value}")
            for name in ("amp", "channels_last", "compile")
            if (value := getattr(self, name)) != getattr(defaults, name)
        ]
        taken = " ".join(words) or "nothing, for nothing measured pays there yet"
        say(f"--fast on {device.type}: {taken}")

    def grid_due(self, i: int) -> bool:
        """Whether epoch i draws its grid: rank 0 does, after every --grid-every
        epochs and the last."""
        return process_rank() == 0 and (
            (i + 1) % self.grid_every == 0 or i + 1 == self.n_epoch
        )

    def save(self, epoch: int) -> None:
        """Save the checkpoint after `epoch` epochs, unless its grid did already;
        then, under torchrun, wait for rank 0's grid, and stop if a signal came."""
        model = self.model
        if model.saved != epoch:
            model.checkpoint.save(epoch)
            model.saved = epoch
        # the other ranks wait here while rank 0 draws
        gather(None)
        signum = largest(signals.received)
        if signum:
            raise signals.Stopped(
                signum,
                f"stopped by {signals.name(signum)} after epoch {epoch - 1}: saved in "
                f"{model.checkpoint.path}; run the same command with --resume to go "
                f"on",
            )


def run_training(train: Callable, **settings) -> DDPM:
    """Call `train` with these settings, its run's flags among them, set up as a run
    from the command line is: torchrun, the device and the seed, stop signals; and
    return the DDPM it trained."""
    fields = {field.name for field in dataclasses.fields(Run)}
    run = Run(**{k: v for k, v in settings.items() if k in fields})
    own = {k: v for k, v in settings.items() if k not in fields}
    params = inspect.signature(train).parameters
    device, out = (own.get(k, params[k].default) for k in ("device", "out"))
    try:
        own["device"] = run.setup(device, out)
        with signals.stop_on_signals():
            try:
                train(**own, run=run)
            except signals.Stopped:
                if run.model is not None:
                    run.model.final_grid()
                raise
        return run.model and run.model.ddpm
    finally:
        if run.model is not None:
            run.model.loader.close()
        if run.lock is not None:
            release(run.lock)
        if dist.is_initialized():
            dist.destroy_process_group()


class PreparedDDPM(nn.Module):
    """The DDPM the notes' loop calls: `ddpm(x)` returns the loss, autocast under
    --amp, with the batch's labels under --cond and through DistributedDataParallel
    under torchrun; `ddpm.sample(...)` draws the epoch's grid, from the --ema average
    where there is one, with a row of each class under --cond, and saves the epoch
    first, so that a stop during a long grid loses nothing."""

    def __init__(
        self,
        run: Run,
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
        self.grid_at = self.steps
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
        path = grid_path(self.checkpoint.path, epoch - 1 if batches == 0 else epoch)
        if path is not None and batches:
            # ddpm_sample_3.png -> ddpm_sample_3_step40.png
            path = f"{os.path.splitext(path)[0]}_step{batches}.png"
        if path is None or os.path.exists(path):
            return
        device = next(self.ddpm.parameters()).device
        # the loop was training: BatchNorm draws with its running statistics
        self.eval()
        recipe = self.checkpoint.recipe
        ddpm, sample_args = self.grid_walk(16, recipe["image_size"], device)

        def stopped(signum: int) -> str:
            return (
                f"stopped by {signals.name(signum)} during the final grid: the run is "
                f"saved in {self.checkpoint.path}; run the same command with --resume "
                f"to go on"
            )

        print("drawing the grid of the weights saved (a second signal skips it)")
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


def recipe_of(ddpm: DDPM, dataset: Dataset) -> dict:
    """What python -m mindiffusion.sample needs to rebuild this DDPM from a
    checkpoint, and mindiffusion.fid to read the training set again, read off the
    objects themselves: the noise model's class and arguments, the dataset's class,
    image shape and Normalize."""
    eps_model = ddpm.eps_model
    names = [
        name
        for name in inspect.signature(type(eps_model).__init__).parameters
        if name not in ("self", "n_classes")
    ]
    normalize = next(
        t for t in getattr(dataset.transform, "transforms", [])
        if isinstance(t, transforms.Normalize)
    )
    cond = ddpm.n_classes is not None
    return dict(
        dataset=type(dataset).__name__,
        eps_model=type(eps_model).__name__,
        eps_model_args=tuple(getattr(eps_model, name) for name in names),
        betas=tuple(ddpm.betas),
        n_T=ddpm.n_T,
        image_size=tuple(dataset[0][0].shape),
        normalize=(tuple(normalize.mean), tuple(normalize.std)),
        # --cond: the classes, by label, and how often training hides the label
        n_classes=ddpm.n_classes,
        classes=conditioning.class_names(dataset) if cond else None,
        p_uncond=ddpm.p_uncond if cond else None,
    )


def grid_path(checkpoint_path: str, epoch: int) -> str | None:
    """Where the script of the checkpoint at checkpoint_path writes epoch's grid."""
    folder, file = os.path.split(checkpoint_path)
    template = GRIDS.get(file)
    return template and os.path.join(folder, template.format(epoch))


def output_folder(out: str) -> None:
    """Make the folder --out names, or say in one sentence why it cannot be made."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a folder: choose another --out")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {out} cannot be made ({err.strerror})") from None
