"""One run of a training script: its feature flags, and the lines its loop calls
besides the notes' own.

`Run.prepare` readies the notes' ddpm, optim and dataloader as Accelerate's
`prepare` does: they change how they compute (the device, torchrun, the precision,
the data order), never what they do. What a flag adds is a call of its own in the
loop, each a plain call when its flags are off:

    run.check_gradients()           the guard, and --grad-clip, before optim.step()
    run.after_step()                --ema, --save-every, a stop signal, --grid-minutes
    run.save(i + 1)                 the checkpoint, before the grid
    run.sampler_for_grid(ddpm, n)   --ema, --grid-sampler, --cond's rows of classes
    run.end_epoch(i)                a stop signal; after the last epoch, the end

Every flag is off by default, and a run with all of them off trains number for
number as the notes' code does.
"""
import dataclasses
import inspect
import os

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from mindiffusion.ddpm import DDPM
from mindiffusion.training import signals
from mindiffusion.training.checkpoints import Checkpoint
from mindiffusion.training.data import PreparedLoader, class_names, first_of_each_class
from mindiffusion.training.devices import (
    autocast_dtype,
    distribute,
    fast_settings,
    gather,
    largest,
    process_rank,
    say,
    usable_cpus,
    world_size,
)
from mindiffusion.training.files import (
    hold_lock,
    output_folder,
    release,
    remove_temporaries,
)
from mindiffusion.training.grids import Grids
from mindiffusion.training.steps import (
    Guard,
    PreparedDDPM,
    PreparedOptimizer,
    StepReadings,
    averaged_copy,
)

# under torchrun, the steps between the ranks' checks for a stop signal: a stop comes
# at most SIGNAL_EVERY - 1 steps later (a quarter of a second at 512 images a step
# and 20,000 images/s), and the gloo collective is paid once in so many steps
SIGNAL_EVERY = 10


@dataclasses.dataclass
class Run:
    """The feature flags of a training script, each documented in its --help.

    seed: torch's seed (each torchrun rank adds its rank); num_workers: DataLoader
    worker processes; resume: go on from the checkpoint; fake_data: train on N
    random images of the dataset's shape; per_class: train on the first N images
    of each class; fast: turn on the speed flags that pay on the device
    (devices.FAST_PATHS); amp: autocast the forward pass (auto, bf16 or fp16);
    channels_last: the weights, and so the activations, in channels_last; compile:
    torch.compile the noise model; ema: the decay of an averaged copy of the
    weights, which draws the grids; ema_warmup: a young average decays less
    (steps.py); save_every: also save every N steps; grad_clip: clip the gradients'
    norm; grid_every: draw the grid every N epochs and after the last;
    grid_minutes: and within an epoch, every M minutes; grid_sampler, grid_steps:
    draw it with DDPM's n_T steps, or with DDIM's grid_steps; cond: train on the
    labels, with classifier-free guidance; p_uncond: how often a label is hidden;
    guide_w: the grids' guidance.
    """

    seed: int | None = None
    num_workers: int = dataclasses.field(default_factory=lambda: min(16, usable_cpus()))
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
        # what `prepare` makes: the checkpoint, its lock, the loader, the average
        self.checkpoint = self.lock = self.loader = self.ema_model = None

    def prepare(
        self,
        ddpm: DDPM,
        optim: torch.optim.Optimizer,
        dataloader: DataLoader,
        n_epoch: int,
        path: str,
    ):
        """The notes' ddpm, optim and dataloader, ready for this run's flags, with
        the checkpoint at `path` and --resume taken up: see `PreparedDDPM`,
        `PreparedOptimizer` and `PreparedLoader` for how each computes."""
        # a Run prepared again starts afresh
        self.close()
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
        if self.ema is not None:
            self.ema_model = averaged_copy(ddpm, self.ema, self.ema_warmup)
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
        if process_rank() == 0:
            # the folder, as run_training makes it, for a script called directly
            output_folder(os.path.dirname(path) or ".")
            # while this run lasts, no other run can take the same checkpoint
            self.lock = hold_lock(path)
            for stale in remove_temporaries(path):
                say(f"removed {stale}, the temporary file of a save that a kill "
                    f"interrupted")
        recipe = recipe_of(ddpm, dataset)
        self.checkpoint = Checkpoint(
            path, ddpm, optim, recipe, self.ema_model, scaler, settings
        )
        start = self.checkpoint.resume_or_start(self.resume, n_epoch, self.seed)
        # the record times each epoch from its first batch, after the last one's grid
        self.loader = PreparedLoader(
            dataloader, device, self.num_workers, start.data_seed, *start[:2],
            self.checkpoint.record.start_epoch,
        )
        parallel = distribute(ddpm, device)
        readings = StepReadings(parallel)
        self.guard = Guard(optim, scaler, readings, self.grad_clip)
        self.n_epoch, self.start_epoch = n_epoch, start.epoch
        # where the run stands: the epoch and its batches done, and the steps this
        # run has taken
        self.epoch, self.batches, self.steps = (*start[:2], 0)
        self.global_batch = self.loader.batch_size * world_size()
        self.model = PreparedDDPM(ddpm, parallel, dtype, scaler, readings)
        self.grids = Grids(self)
        return self.model, PreparedOptimizer(optim, scaler), self.loader

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

    def check_gradients(self) -> None:
        """Before optim.step(): stop if the step's loss or a gradient is not
        finite, so that divergence never reaches the weights or the disk, and clip
        the gradients under --grad-clip (steps.Guard); the record counts the loss."""
        if self.loader.epoch != self.epoch:
            self.epoch, self.batches = self.loader.epoch, 0
        loss = self.guard.check(self.epoch, self.batches + 1)
        self.checkpoint.record.add(loss, self.global_batch)

    def after_step(self) -> None:
        """After optim.step(): the --ema average follows the new weights; every
        --save-every steps, a save; after a stop signal, a save and the stop; under
        --grid-minutes, a grid once the minutes have passed. The step that ends an
        epoch leaves its save and its grid to the epoch's end."""
        if self.ema_model is not None:
            self.ema_model.update_parameters(self.checkpoint.ddpm)
        self.batches += 1
        self.steps += 1
        if self.batches == self.loader.batches_per_epoch:
            return
        if self.save_every and self.steps % self.save_every == 0:
            self.checkpoint.save(self.epoch, self.batches)
        # under torchrun, the ranks meet only every SIGNAL_EVERY steps
        if world_size() == 1 or self.steps % SIGNAL_EVERY == 0:
            self.stop_if_signalled()
            if self.grids.within_epoch(self.epoch, self.batches):
                # a signal while that grid was drawn stops the run: the step is saved
                self.stop_if_signalled(saved=True)

    def stop_if_signalled(self, saved: bool = False) -> None:
        """Save, unless this step is `saved` already, and stop if a stop signal
        came; under torchrun, every rank stops after the same step."""
        signum = largest(signals.received)
        if signum:
            if not saved:
                self.checkpoint.save(self.epoch, self.batches)
            raise signals.Stopped(
                signum,
                f"stopped by {signals.name(signum)} after epoch {self.epoch}, step "
                f"{self.batches}: saved in {self.checkpoint.path}; run the same "
                f"command with --resume to go on",
            )

    def save(self, epoch: int) -> None:
        """The notes' torch.save(ddpm.state_dict(), ...) after `epoch` epochs, with
        all that --resume needs; where a grid follows, with the random state that
        the grid will leave (grids.Grids.save_before)."""
        if self.grid_due(epoch - 1):
            self.grids.save_before(epoch)
        else:
            self.checkpoint.save(epoch)

    def grid_due(self, i: int) -> bool:
        """Whether epoch i draws its grid: rank 0 does, after every --grid-every
        epochs and the last, unless a second stop signal came, which skips it."""
        due = (i + 1) % self.grid_every == 0 or i + 1 == self.n_epoch
        return process_rank() == 0 and due and signals.count < 2

    def sampler_for_grid(self, ddpm: PreparedDDPM, n_sample: int):
        """What draws the grid, how many samples and of which classes c: ddpm, or
        the --ema average; as DDIM of --grid-steps under --grid-sampler ddim;
        n_sample images with no class (c is None), or under --cond a row of 4 for
        each of the first ten classes. Its `sample` is the sampler's own, with a bar
        over the steps; a second stop signal while it walks stops the run at once."""
        epoch = self.checkpoint.saved_at[0]

        def stopped(signum: int) -> str:
            return (
                f"stopped by {signals.name(signum)} during the grid of epoch "
                f"{epoch - 1}: the epoch is saved in {self.checkpoint.path}; run the "
                f"same command with --resume to go on"
            )

        return self.grids.sampler(ddpm.ddpm, n_sample, stopped)

    def end_epoch(self, i: int) -> None:
        """After epoch i's save and grid: under torchrun, the other ranks wait here
        for rank 0's grid; a stop signal stops the run, saved, unless this was the
        last epoch: then the run is finished, and lets go of its checkpoint's lock
        and its loader's workers."""
        gather(None)
        signum = largest(signals.received)
        if i + 1 == self.n_epoch:
            if signum:
                say(f"{signals.name(signum)} came as the last epoch ended: the run "
                    f"is finished, saved in {self.checkpoint.path}")
            self.close()
        elif signum:
            raise signals.Stopped(
                signum,
                f"stopped by {signals.name(signum)} after epoch {i}: saved in "
                f"{self.checkpoint.path}; run the same command with --resume to go "
                f"on",
            )

    def close(self) -> None:
        """Let go of the checkpoint's lock, and end the loader's workers."""
        if self.loader is not None:
            self.loader.close()
        if self.lock is not None:
            release(self.lock)
            self.lock = None

    def finished(self) -> bool:
        """Whether the checkpoint holds the last epoch whole: the run is done, even
        if a stop signal came on its last step or during its last grid."""
        saved = self.checkpoint and self.checkpoint.saved_at
        return saved == (self.n_epoch, 0)


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
        classes=class_names(dataset) if cond else None,
        p_uncond=ddpm.p_uncond if cond else None,
    )
