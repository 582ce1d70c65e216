"""Checkpoints: what a training run saves, and how `--resume` takes it up again.

A checkpoint is a dictionary of tensors and plain values, so that it loads with
`torch.load(..., weights_only=True)` and can never run code.
"""
import io
import itertools
import os
import pickle
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import Dataset, DistributedSampler

from mindiffusion import cli
from mindiffusion.cli import UserError, say
from mindiffusion.record import Record

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


class Start(NamedTuple):
    """Where a run starts: the epochs done, the batches done in the next one, and
    the seed of the data order."""

    epoch: int
    batches: int
    data_seed: int


class Checkpoint:
    """The checkpoint file of a run, and the objects it saves and restores: the
    model, the optimizer, the --ema average, the float16 loss scaler and the
    record's sums. At the end of an epoch, a save also writes the record's row."""

    def __init__(
        self,
        path: str,
        ddpm: nn.Module,
        optim: torch.optim.Optimizer,
        recipe: dict,
        ema: AveragedModel | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.path, self.ddpm, self.optim, self.recipe, self.ema = (
            path, ddpm, optim, recipe, ema
        )
        # a disabled scaler when --amp is not fp16: its state is empty
        self.scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
        self.data_seed = 0
        # ddpm_cifar.pth -> ddpm_cifar_log.csv
        self.record = Record(os.path.splitext(path)[0] + "_log.csv")

    def save(self, epoch: int, batches: int = 0) -> None:
        """Save all that `--resume` needs, after `batches` batches of epoch `epoch`
        (0 at the end of an epoch), with the recipe and the --ema average.

        The file is written beside the old one, flushed to the disk, and renamed over
        it, so neither a failed save nor a power cut leaves anything but a whole
        checkpoint under its name.
        """
        # every rank's generators, so that each one resumes its own stream; on CUDA,
        # the generator of the GPU this rank trains on
        device = next(self.ddpm.parameters()).device
        on_cuda = device.type == "cuda"
        rng_cpu = cli.gather(torch.get_rng_state())
        rng_cuda = cli.gather(torch.cuda.get_rng_state(device)) if on_cuda else []
        if cli.process_rank() > 0:
            return
        if batches == 0:
            self.record.end_epoch(epoch - 1, self.optim.param_groups[0]["lr"])
        state = {
            "model": self.ddpm.state_dict(),
            "optimizer": self.optim.state_dict(),
            "epoch": epoch,
            "batches": batches,
            "data_seed": self.data_seed,
            "rng_cpu": rng_cpu,
            "rng_cuda": rng_cuda,
            "recipe": self.recipe,
            "ema": None if self.ema is None else self.ema.state_dict(),
            "scaler": self.scaler.state_dict(),
            "record": self.record.state_dict(),
        }
        # serialised in memory first, so that a failing write is an OSError that
        # names its reason (torch's own file writer reports only a position)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        folder = os.path.dirname(self.path) or "."
        tmp_path = self.path + ".tmp"
        try:
            with open(tmp_path, "wb") as file:
                file.write(buffer.getbuffer())
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp_path, self.path)
            # the rename itself reaches the disk only with its folder
            folder_fd = os.open(folder, os.O_RDONLY)
            os.fsync(folder_fd)
            os.close(folder_fd)
        except OSError as err:
            raise UserError(
                f"the checkpoint could not be saved in {folder} ({err.strerror}): the "
                f"previous one there is kept; make room or give another --out, then "
                f"--resume"
            ) from None
        finally:
            if os.path.exists(tmp_path):
                os.remove(tmp_path)

    def resume_or_start(
        self, resume: bool, n_epoch: int, seed: int | None, lr: float
    ) -> Start:
        """Where to start: epoch 0 for a new run, or where the checkpoint ended.

        Resuming restores the model, the optimizer, the averaged weights of --ema, the
        data order and the random number generators, so the run goes on exactly as if
        it had never stopped; `lr` replaces the checkpoint's learning rate. A new run
        refuses to overwrite an existing checkpoint.
        """
        path, ema = self.path, self.ema
        if not resume:
            for taken in (path, self.record.path):
                if os.path.exists(taken):
                    raise UserError(
                        f"{taken} already exists: continue it with --resume, "
                        f"or choose another --out"
                    )
            self.data_seed = cli.shared_seed(seed)
            return Start(epoch=0, batches=0, data_seed=self.data_seed)
        try:
            state = load_checkpoint(path)
        except UserError as err:
            raise UserError(f"--resume: {err}") from None
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
        if cli.process_rank() == 0:
            self.record.resume(state.get("record"), epoch)
        restore_rng(state["rng_cpu"], state["rng_cuda"], self.ddpm)
        say(f"resuming from {path}: {epoch} epoch(s) and {batches} batch(es) done")
        # checkpoints from before the data order was seeded shuffled with seed 0
        self.data_seed = int(state.get("data_seed", 0))
        return Start(epoch=epoch, batches=batches, data_seed=self.data_seed)


def load_checkpoint(path: str) -> dict:
    """The checkpoint at `path`, on the CPU, as tensors and plain values only."""
    if not os.path.exists(path):
        raise UserError(f"there is no checkpoint at {path}")
    unreadable = f"{path} is not a readable checkpoint"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only=True names the first class or function the file would import
        if "GLOBAL" in str(err):
            raise UserError(
                f"{path} refused: it holds Python objects besides tensors "
                f"and plain values, and loading them could run code"
            ) from None
        raise UserError(unreadable) from None
    except (RuntimeError, EOFError, OSError):
        raise UserError(unreadable) from None
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(unreadable)
    return state


def as_lists(value):
    """`value` with every tuple in it made a list, so that (1, 2) equals [1, 2]."""
    if isinstance(value, (list, tuple)):
        return [as_lists(item) for item in value]
    return value


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


def restore_rng(
    rng_cpu: list[torch.Tensor], rng_cuda: list[torch.Tensor], ddpm: nn.Module
) -> None:
    """Give each rank its saved generators, as far as the checkpoint has them: one
    from a run on more processes or GPUs than this one restores what fits, and says
    in one line what it could not restore."""
    rank = cli.process_rank()
    world_size = dist.get_world_size() if dist.is_initialized() else 1
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
    if (len(rng_cpu), len(rng_cuda)) != (world_size, world_size if on_cuda else 0):
        say(
            f"--resume: the checkpoint holds the random states of {len(rng_cpu)} "
            f"process(es) and {len(rng_cuda)} GPU(s), and this run has {world_size} "
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


class ResumableSampler(DistributedSampler):
    """DistributedSampler, whose shuffle depends on its seed and the epoch alone, that
    starts the epoch `start` after the batches `start` had done.

    The batches done are skipped here, as indices: they are never loaded.
    """

    def __init__(
        self,
        dataset: Dataset,
        world_size: int,
        rank: int,
        batch_size: int,
        start: Start,
    ) -> None:
        super().__init__(dataset, world_size, rank, seed=start.data_seed)
        self.batch_size, self.start, self.skip = batch_size, start, 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        done = self.start.batches if epoch == self.start.epoch else 0
        self.skip = done * self.batch_size

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return super().__len__() - self.skip
