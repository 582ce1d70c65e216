"""Checkpoints: what a training run saves, how `--resume` takes it up again, and
what a resume refuses (an export, a recipe that differs from this run's) or says
(the flags that this run changes).

A checkpoint is a dictionary of tensors and plain values, so that it loads with
`torch.load(..., weights_only=True)` and can never run code.
"""
import errno
import glob
import io
import os
import re
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel

from mindiffusion.training.devices import gather, process_rank, say, world_size
from mindiffusion.training.data import EpochOrder
from mindiffusion.training.files import (
    Record,
    load_checkpoint,
    weights_alone,
    write_atomically,
)
from mindiffusion.training.flags import UserError


class Start(NamedTuple):
    """Where a run starts: the epochs done, and the batches done in the next one."""

    epoch: int
    batches: int


class Checkpoint:
    """The checkpoint file of a run, and the objects it saves and restores: the
    model, the optimizer, the --ema average, the float16 loss scaler, the epoch's
    data order and the record's sums. At the end of an epoch, a save also writes
    the record's row. `grids` names the run's epoch grids, which a new run must
    not overwrite."""

    def __init__(
        self,
        path: str,
        ddpm: nn.Module,
        optim: torch.optim.Optimizer,
        recipe: dict,
        ema: AveragedModel | None = None,
        scaler: torch.amp.GradScaler | None = None,
        settings: dict | None = None,
        order: EpochOrder | None = None,
        grids: str | None = None,
    ) -> None:
        self.path, self.ddpm, self.optim, self.recipe, self.ema = (
            path, ddpm, optim, recipe, ema
        )
        self.order, self.grids = order, grids
        # what a resume may change, each said when it does: --batch-size, the
        # dataset's size (both only at an epoch's end), --ema, --no-ema-warmup,
        # --amp, --seed
        self.settings = settings or {}
        # a disabled scaler when --amp is not fp16: its state is empty
        self.scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
        # where the last save stands, (epochs, batches), for the grid a stop draws
        self.saved_at = None
        # ddpm_cifar.pth -> ddpm_cifar_log.csv
        self.record = Record(os.path.splitext(path)[0] + "_log.csv")

    def save(self, epoch: int, batches: int = 0, rng: tuple | None = None) -> None:
        """Save all that `--resume` needs, after `batches` batches of epoch `epoch`
        (0 at the end of an epoch), with the recipe and the --ema average; `rng`,
        the CPU's and the GPU's random state to save in place of the present one.

        The file is written whole or not at all (`write_atomically`).
        """
        self.saved_at = (epoch, batches)
        # every rank's generators, so that each one resumes its own stream; on CUDA,
        # the generator of the GPU this rank trains on
        device = next(self.ddpm.parameters()).device
        on_cuda = device.type == "cuda"
        cpu_state, cuda_state = rng or (torch.get_rng_state(), None)
        if on_cuda and cuda_state is None:
            cuda_state = torch.cuda.get_rng_state(device)
        rng_cpu = gather(cpu_state)
        rng_cuda = gather(cuda_state) if on_cuda else []
        if process_rank() > 0:
            return
        if batches == 0:
            self.record.end_epoch(epoch - 1, self.optim.param_groups[0]["lr"])
        state = {
            "model": self.ddpm.state_dict(),
            "optimizer": self.optim.state_dict(),
            "epoch": epoch,
            "batches": batches,
            "data_seed": self.order and self.order.seed,
            "rng_cpu": rng_cpu,
            "rng_cuda": rng_cuda,
            "recipe": self.recipe,
            "ema": None if self.ema is None else self.ema.state_dict(),
            "scaler": self.scaler.state_dict(),
            "record": self.record.state_dict(),
            "settings": self.settings,
        }
        # serialised in memory first, so that a failing write is an OSError that
        # names its reason (torch's own file writer reports only a position)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        try:
            write_atomically(self.path, buffer.getbuffer())
        except OSError as err:
            full = err.errno in (errno.ENOSPC, errno.EDQUOT)
            advice = "make room" if full else "check the folder"
            folder = os.path.dirname(self.path) or "."
            raise UserError(
                f"the checkpoint could not be saved in {folder} ({err.strerror}): the "
                f"previous one there is kept; {advice} or give another --out, then "
                f"--resume"
            ) from None

    def resume_or_start(self, resume: bool, n_epoch: int) -> Start:
        """Where to start: epoch 0 for a new run, or where the checkpoint ended.

        Resuming restores the model, the optimizer, the averaged weights of --ema, the
        data order and the random number generators, so the run goes on exactly as if
        it had never stopped; this run's learning rate replaces the checkpoint's. A
        new run refuses to overwrite an existing checkpoint, record or grid.
        """
        path, ema = self.path, self.ema
        if not resume:
            self.refuse_to_overwrite()
            return Start(epoch=0, batches=0)
        # this run's learning rate, before the checkpoint's replaces it
        lr = self.optim.param_groups[0]["lr"]
        try:
            state = load_checkpoint(path)
        except UserError as err:
            raise UserError(f"--resume: {err}") from None
        refuse_an_export(path, state)
        check_recipe(path, state.get("recipe") or {}, self.recipe)
        if ema is None and state.get("ema") is not None:
            raise UserError(
                f"--resume: {path} keeps an --ema average that this run would drop: "
                f"resume with --ema DECAY to carry it on"
            )
        try:
            self.ddpm.load_state_dict(state["model"])
            self.optim.load_state_dict(state["optimizer"])
            epoch, batches = int(state["epoch"]), int(state.get("batches", 0))
            if ema is not None and state.get("ema") is not None:
                ema.load_state_dict(state["ema"])
            if self.scaler.is_enabled() and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise UserError(
                f"--resume: {path} does not fit this script's model and settings "
                f"({str(err).splitlines()[0]})"
            ) from None
        if ema is not None and state.get("ema") is None:
            say("--ema: the checkpoint has no average yet: it starts from these "
                "weights")
        if epoch >= n_epoch:
            raise UserError(
                f"--resume: {path} has already trained {epoch} epochs; "
                f"ask for more with --epochs"
            )
        set_lr(self.optim, lr)
        say_changed_settings(path, state.get("settings") or {}, self.settings, batches)
        if process_rank() == 0:
            self.record.resume(state.get("record"), epoch)
        restore_rng(state["rng_cpu"], state["rng_cuda"], self.ddpm)
        say(f"resuming from {path}: {epoch} epoch(s) and {batches} batch(es) done")
        # the order of the epoch under way; checkpoints from before the data order
        # was seeded shuffled with seed 0
        data_seed = state.get("data_seed")
        if self.order and (batches or self.order.shared):
            self.order.resume(int(data_seed or 0), batches)
        return Start(epoch=epoch, batches=batches)

    def refuse_to_overwrite(self) -> None:
        """A new run writes nothing over what an earlier run left in its folder."""
        folder, name = os.path.split(self.path)
        if os.path.exists(self.path):
            raise UserError(
                f"{self.path} already exists: continue it with --resume, or choose "
                f"another --out"
            )
        if os.path.exists(self.record.path):
            raise UserError(
                f"{self.record.path} is left from a run whose checkpoint is gone, so "
                f"it cannot be resumed: move it away, or choose another --out"
            )
        # ddpm_sample_{}.png -> ddpm_sample_[0-9]*.png
        pattern = re.sub(r"\{.*\}", "[0-9]*", self.grids or "")
        grids = glob.glob(os.path.join(folder or ".", pattern)) if pattern else []
        if grids:
            raise UserError(
                f"{min(grids)} and the other grids in {folder or '.'} are from another "
                f"run, and a new run would overwrite them: move them away, or choose "
                f"another --out"
            )


def restore_rng(
    rng_cpu: list[torch.Tensor], rng_cuda: list[torch.Tensor], ddpm: nn.Module
) -> None:
    """Give each rank its saved generators, as far as the checkpoint has them: one
    from a run on more processes or GPUs than this one restores what fits, and says
    in one line what it could not restore."""
    rank, n_processes = process_rank(), world_size()
    # a checkpoint from before the ranks' generators were kept holds rank 0's alone
    rng_cpu = [rng_cpu] if torch.is_tensor(rng_cpu) else rng_cpu
    if rank < len(rng_cpu):
        torch.set_rng_state(rng_cpu[rank])
    else:
        # a rank the checkpoint has no generator for forks one from rank 0's, so
        # that no two ranks draw the same noise
        torch.set_rng_state(rng_cpu[0])
        torch.manual_seed(int(torch.randint(2**62, (rank,))[-1]))
    device = next(ddpm.parameters()).device
    on_cuda = device.type == "cuda"
    if on_cuda and rank < len(rng_cuda):
        torch.cuda.set_rng_state(rng_cuda[rank], device)
    if (len(rng_cpu), len(rng_cuda)) != (n_processes, n_processes if on_cuda else 0):
        say(
            f"--resume: the checkpoint holds the random states of {len(rng_cpu)} "
            f"process(es) and {len(rng_cuda)} GPU(s), and this run has {n_processes} "
            f"on {device.type}: what does not fit is not restored, so the run does "
            f"not go on exactly as it would have"
        )


def set_lr(optim: torch.optim.Optimizer, lr: float) -> None:
    """Give the optimizer the learning rate of this run, and say so if it changed:
    loading the optimizer's state brought back the checkpoint's."""
    old = optim.param_groups[0]["lr"]
    if old != lr:
        for group in optim.param_groups:
            group["lr"] = lr
        say(f"--lr: the checkpoint trained at {old}; this run goes on at {lr}")


# the recipe's entries that a flag sets, for the sentence that refuses a resume
RECIPE_FLAGS = {
    "n_T": "--n-T",
    "betas": "the betas",
    "eps_model": "the model",
    "eps_model_args": "the model's arguments",
    "n_classes": "--cond's class count",
    "classes": "the classes",
    "p_uncond": "--p-uncond",
}


def refuse_an_export(path: str, state: dict) -> None:
    """An export, or a notes' script's save, holds the weights alone: no optimizer,
    no random state to resume."""
    if weights_alone(state):
        raise UserError(
            f"--resume: {path} holds the weights alone, as a notes' script saves "
            f"them, and cannot be resumed: train with the trainer, whose checkpoint "
            f"can"
        )
    if "optimizer" not in state:
        raise UserError(
            f"--resume: {path} is an export (mindiffusion.export), which holds "
            f"the weights alone and cannot be resumed: resume the checkpoint it "
            f"was exported from"
        )


def check_recipe(path: str, saved: dict, recipe: dict) -> None:
    """Refuse, in one sentence that names them, settings that differ from the run
    the checkpoint at `path` comes from: they cannot change halfway."""
    # a model with classes and one without differ in their very weights
    with_cond = saved.get("n_classes") is not None
    if with_cond != (recipe.get("n_classes") is not None):
        trained = "with --cond" if with_cond else "without --cond"
        raise UserError(
            f"--resume: {path} was trained {trained}: resume {trained}, or choose "
            f"another --out"
        )
    differences = [
        f"{RECIPE_FLAGS.get(key, key)} {saved[key]} (this run: {recipe[key]})"
        for key in recipe
        if key in saved and as_lists(saved[key]) != as_lists(recipe[key])
    ]
    if differences:
        raise UserError(
            f"--resume: {path} was trained with {', '.join(differences)}: resume "
            f"with the checkpoint's settings, or choose another --out"
        )


def as_lists(value):
    """`value` with every tuple in it made a list, so that (1, 2) equals [1, 2]."""
    if isinstance(value, (list, tuple)):
        return [as_lists(item) for item in value]
    return value


def say_changed_settings(path: str, saved: dict, now: dict, batches: int) -> None:
    """Refuse a --batch-size or a dataset's size that would change the middle of
    an epoch, and say in one line each which other flags this run, whose settings
    are `now`, changes or overrides from those `saved` in the checkpoint at `path`."""
    for key in ("batch_size", "dataset_size", "ema", "ema_warmup", "amp", "seed"):
        if key not in saved or saved[key] == now.get(key):
            continue
        flag = "--" + key.replace("_", "-")
        if key == "batch_size" and batches:
            raise UserError(
                f"--resume: {path} stopped in the middle of an epoch at "
                f"{flag} {saved[key]} (this run: {now[key]}): resume with "
                f"{flag} {saved[key]}, or change it at an epoch's end"
            )
        if key == "dataset_size" and batches:
            raise UserError(
                f"--resume: {path} stopped in the middle of an epoch of "
                f"{saved[key]} images, and the dataset now holds {now[key]}: "
                f"resume on the same images, or from a save at an epoch's end"
            )
        if key == "dataset_size":
            say(f"the dataset: the checkpoint trained on {saved[key]} images; "
                f"this run trains on {now[key]}")
        elif key == "seed":
            if now.get(key) is not None:
                seed = saved[key]
                seeded = "unseeded" if seed is None else f"--seed {seed}"
                say(f"--seed: a resume goes on from the checkpoint's random "
                    f"state ({seeded}); this run's {now[key]} is not used")
        elif key == "ema" and None not in (saved[key], now.get(key)):
            say(f"--ema: the checkpoint averaged with decay {saved[key]}; this "
                f"run goes on with {now[key]}")
        elif key == "ema_warmup" and now.get("ema") is not None:
            were, are = ("with" if saved[key] else "without",
                         "with" if now[key] else "without")
            say(f"--ema: the checkpoint averaged {were} the warm-up; this run goes "
                f"on {are} it")
        elif key not in ("ema", "ema_warmup"):
            before, after = (
                f"{flag} {value}" if value is not None else f"no {flag}"
                for value in (saved[key], now[key])
            )
            say(f"{flag}: the checkpoint trained with {before}; this run goes "
                f"on with {after}")
