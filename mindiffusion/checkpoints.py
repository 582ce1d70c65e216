"""Checkpoints: what a training run saves, and how `--resume` takes it up again.

A checkpoint is a dictionary of tensors and plain values, so that it loads with
`torch.load(..., weights_only=True)` and can never run code.
"""
import os
import pickle
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel

from mindiffusion.cli import UserError, process_rank, say, shared_seed

# the recipe's entries that a flag sets, for the sentence that refuses a resume
RECIPE_FLAGS = {
    "n_T": "--n-T",
    "betas": "the betas",
    "eps_model": "the model",
    "eps_model_args": "the model's arguments",
}


class Start(NamedTuple):
    """Where a run starts: the epochs already done, and the seed of the data order."""

    epoch: int
    data_seed: int


def save_checkpoint(
    path: str,
    ddpm: nn.Module,
    optim: torch.optim.Optimizer,
    recipe: dict,
    epoch: int,
    data_seed: int,
    ema: AveragedModel | None = None,
) -> None:
    """Save all that `--resume` needs after `epoch` epochs, with the recipe that
    rebuilds the model and, under --ema, the averaged weights.

    The file is written beside the old one and renamed over it, so an interrupted save
    never destroys the last good checkpoint.
    """
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    state = {
        "model": ddpm.state_dict(),
        "optimizer": optim.state_dict(),
        "epoch": epoch,
        "data_seed": data_seed,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": cuda_rng,
        "recipe": recipe,
        "ema": None if ema is None else ema.state_dict(),
    }
    tmp_path = path + ".tmp"
    torch.save(state, tmp_path)
    os.replace(tmp_path, path)


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


def restore_cuda_rng(states: list[torch.Tensor]) -> None:
    """Give each GPU its saved random state, as far as this machine has the GPUs."""
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index, state in enumerate(states[:n_gpus]):
        torch.cuda.set_rng_state(state, index)
    if len(states) > n_gpus:
        say(
            f"--resume: the checkpoint holds the random state of {len(states)} GPU(s) "
            f"and this machine has {n_gpus}: the other {len(states) - n_gpus} are "
            f"not restored, so the run goes on exactly only as far as it can"
        )


def resume_or_start(
    path: str,
    resume: bool,
    ddpm: nn.Module,
    optim: torch.optim.Optimizer,
    n_epoch: int,
    recipe: dict,
    seed: int | None,
    ema: AveragedModel | None = None,
) -> Start:
    """Where to start: epoch 0 for a new run, or where the checkpoint at `path` ended.

    Resuming restores the model, the optimizer, the averaged weights of --ema, the
    data order and the random number generators, so the run goes on exactly as if it
    had never stopped. A new run refuses to overwrite an existing checkpoint.
    """
    if not resume:
        if os.path.exists(path):
            raise UserError(
                f"{path} already exists: continue it with --resume, "
                f"or choose another --out"
            )
        return Start(epoch=0, data_seed=shared_seed(seed))
    try:
        state = load_checkpoint(path)
    except UserError as err:
        raise UserError(f"--resume: {err}") from None
    check_recipe(path, state.get("recipe") or {}, recipe)
    if ema is None and state.get("ema") is not None:
        raise UserError(
            f"--resume: {path} keeps an --ema average that this run would drop: "
            f"resume with --ema DECAY to carry it on"
        )
    try:
        ddpm.load_state_dict(state["model"])
        optim.load_state_dict(state["optimizer"])
        epoch = int(state["epoch"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise UserError(
            f"--resume: {path} does not fit this script's model and settings "
            f"({str(err).splitlines()[0]})"
        ) from None
    if ema is not None and state.get("ema") is None:
        say("--ema: the checkpoint has no average yet: it starts from these weights")
    if epoch >= n_epoch:
        raise UserError(
            f"--resume: {path} has already trained {epoch} epochs; "
            f"ask for more with --epochs"
        )
    torch.set_rng_state(state["rng_cpu"])
    restore_cuda_rng(state["rng_cuda"])
    rank = process_rank()
    if rank > 0:
        # the checkpoint holds rank 0's generator: the other ranks seed their own
        # from it, so that no two ranks draw the same noise
        torch.manual_seed(int(torch.randint(2**62, (rank,))[-1]))
    say(f"resuming from {path}: {epoch} epoch(s) done")
    # checkpoints from before the data order was seeded shuffled with seed 0
    return Start(epoch=epoch, data_seed=int(state.get("data_seed", 0)))
