"""One prepared run: the training scripts' feature flags, and `Run.prepare`, which
readies the notes' ddpm, optim and dataloader for them in the manner of
Accelerate's `prepare`, so that the notes' loop runs on them line for line.

Every flag is off by default, and a run with all of them off trains number for
number as the notes' code does.
"""
import dataclasses
import inspect
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from mindiffusion.ddpm import DDPM
from mindiffusion.training import conditioning, signals
from mindiffusion.training.checkpoints import CHECKPOINTS, Checkpoint
from mindiffusion.training.data import PreparedLoader, first_of_each_class
from mindiffusion.training.devices import autocast_dtype, resolve_device
from mindiffusion.training.distributed import (
    distribute,
    gather,
    init_processes,
    largest,
    process_rank,
    say,
)
from mindiffusion.training.duties import StepDuties
from mindiffusion.training.ema import averaged_copy
from mindiffusion.training.errors import UserError
from mindiffusion.training.fastpath import fast_settings
from mindiffusion.training.files import remove_temporaries
from mindiffusion.training.locks import hold_lock, release
from mindiffusion.training.prepared import PreparedDDPM
from mindiffusion.training.readings import StepReadings


@dataclasses.dataclass
class Run:
    """The feature flags of a training script, each documented in its --help.

    seed: torch's seed (each torchrun rank adds its rank); num_workers: DataLoader
    worker processes; resume: go on from the checkpoint; fake_data: train on N
    random images of the dataset's shape; per_class: train on the first N images
    of each class; fast: turn on the speed flags that pay
    on the device (fastpath.py); amp: autocast the forward pass (auto,
    bf16 or fp16); channels_last: the weights, and so the activations, in
    channels_last; compile: torch.compile the noise model; ema: the decay of an
    averaged copy of the weights, which draws the grids; ema_warmup: a young average
    decays less (ema.py); save_every: also save every N steps;
    grad_clip: clip the gradients' norm; grid_every: draw the grid every N epochs and
    after the last; grid_minutes: and within an epoch, every M minutes;
    grid_sampler, grid_steps: draw it with DDPM's n_T steps, or with
    DDIM's grid_steps; cond: train on the labels, with classifier-free
    guidance; p_uncond: how often a label is hidden; guide_w: the grids' guidance.
    """

    seed: int | None = None
    num_workers: int = 0
    resume: bool = False
    fake_data: int | None = None
    per_class: int | None = None
    fast: bool = False
    amp: str | None = None
    channels_last: bool = False
    compile: bool = False
    ema: float | None = None
    ema_warmup: bool = True
    save_every: int | None = 1000
    grad_clip: float | None = None
    grid_every: int = 1
    grid_minutes: float | None = None
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
        # the recipe names the whole dataset, of which --per-class takes a part
        dataset = dataloader.dataset
        if self.per_class is not None:
            part = first_of_each_class(dataset, self.per_class)
            dataloader = DataLoader(part, batch_size=dataloader.batch_size)
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
            amp=self.amp, seed=self.seed, dataset_size=len(dataloader.dataset),
        )
        if self.lock is not None:
            # a Run prepared again, such as a script's default one, starts afresh
            release(self.lock)
            self.lock = None
        if process_rank() == 0:
            # while this run lasts, no other run can take the same checkpoint
            self.lock = hold_lock(path)
            for stale in remove_temporaries(path):
                say(f"removed {stale}, the temporary file of a save that a kill "
                    f"interrupted")
        recipe = recipe_of(ddpm, dataset)
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
            self.grad_clip, ema, model.grid_within_epoch,
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
        then, under torchrun, wait for rank 0's grid, and stop if a signal came,
        unless this was the last epoch: then the run has finished."""
        model = self.model
        if model.saved != epoch:
            model.checkpoint.save(epoch)
            model.saved = epoch
        # the other ranks wait here while rank 0 draws
        gather(None)
        signum = largest(signals.received)
        if signum and self.finished():
            say(f"{signals.name(signum)} came as the last epoch ended: the run is "
                f"finished, saved in {model.checkpoint.path}")
        elif signum:
            raise signals.Stopped(
                signum,
                f"stopped by {signals.name(signum)} after epoch {epoch - 1}: saved in "
                f"{model.checkpoint.path}; run the same command with --resume to go "
                f"on",
            )

    def finished(self) -> bool:
        """Whether the checkpoint holds the last epoch whole: the run is done, even
        if a stop signal came on its last step or during its last grid."""
        saved = self.model and self.model.checkpoint.saved_at
        return saved == (self.n_epoch, 0)


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
        # a script's own function, not a wrapper such as a functools.partial of it
        name = CHECKPOINTS.get(getattr(train, "__name__", None))
        if run.resume and name:
            # before the dataset, which may be missing too
            checkpoint = f"{out}/{name}"
            if not os.path.exists(checkpoint):
                raise UserError(f"--resume: there is no checkpoint at {checkpoint}")
        with signals.stop_on_signals():
            try:
                train(**own, run=run)
            except signals.Stopped as stop:
                if run.finished():
                    say(f"stopped by {signals.name(stop.signum)} during the last "
                        f"grid: the run is finished, saved in "
                        f"{run.model.checkpoint.path}, and only that grid is missing")
                    return run.model.ddpm
                if run.model is not None:
                    run.model.final_grid()
                raise
            except OSError as err:
                grid = run.model and run.model.grid_being_written()
                if grid is None:
                    raise
                # the script's save_image failed: no part of the grid is kept
                if os.path.exists(grid):
                    os.remove(grid)
                raise UserError(
                    f"the grid {grid} could not be written ({err.strerror}); its "
                    f"epoch is saved in {run.model.checkpoint.path}: make room or "
                    f"give another --out, then --resume"
                ) from None
        return run.model and run.model.ddpm
    finally:
        if run.model is not None:
            run.model.loader.close()
        if run.lock is not None:
            release(run.lock)
        if dist.is_initialized():
            dist.destroy_process_group()


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


def output_folder(out: str) -> None:
    """Make the folder --out names, or say in one sentence why it cannot be made."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a folder: choose another --out")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {out} cannot be made ({err.strerror})") from None
