"""Plumbing shared by the three training scripts: flags, device choice, missing data,
and checkpoints. The training loop itself stays in each script.

A mistake in the command line or the data raises `UserError`; `main` prints it as one
sentence and exits with status 2, without a traceback.
"""
import argparse
import contextlib
import inspect
import io
import os
import pickle
import sys
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

DEVICES = "use cpu, cuda, cuda:N or mps"


class UserError(Exception):
    """A mistake in the command line or the data, explained in one sentence."""


def resolve_device(name: str) -> torch.device:
    """The device to train on: `name`, or the nearest one this machine has.

    A CUDA device falls back to MPS or the CPU when there is no CUDA, and a CUDA index
    this machine lacks falls back to cuda:0, each with one printed line.
    """
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: {DEVICES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            fallback = "mps" if torch.backends.mps.is_available() else "cpu"
            print(f"CUDA is not available here: using {fallback} instead of {name}")
            return torch.device(fallback)
        n_gpus = torch.cuda.device_count()
        if device.index is not None and device.index >= n_gpus:
            print(f"{name} does not exist ({n_gpus} GPU(s) here): using cuda:0 instead")
            return torch.device("cuda:0")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            print(f"MPS is not available here: using cpu instead of {name}")
            return torch.device("cpu")
    elif device.type != "cpu":
        raise UserError(f"unsupported device {name!r}: {DEVICES}")
    return device


@contextlib.contextmanager
def explain_missing_dataset(name: str, root: str):
    """Turn a failed torchvision download into one sentence that says what to do.

    torchvision prints each mirror it tries; that chatter is held back, and shown
    only if the dataset loads after all.
    """
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):
            yield
    except (OSError, RuntimeError) as err:
        reason = str(err).splitlines()[0].rstrip(":")
        raise UserError(
            f"{name} is not in {root} and could not be downloaded ({reason}): put its "
            f"files there or point --data-root at them, or run with --fake-data N"
        ) from None
    sys.stdout.write(chatter.getvalue())


@contextlib.contextmanager
def explain_image_folder(root: str | None):
    """Check a folder for `ImageFolder`, and turn its errors into one sentence."""
    layout = "ImageFolder wants the images one folder down, in ROOT/<subfolder>/*.jpg"
    if root is None:
        raise UserError(
            "no image folder given: pass --data-root DIR or set CELEBA_PATH "
            "(or run with --fake-data N)"
        )
    if not os.path.isdir(root):
        raise UserError(f"{root} is not a folder: give the image folder to --data-root")
    try:
        yield
    except FileNotFoundError:
        loose = [f for f in os.listdir(root) if f.lower().endswith(IMG_EXTENSIONS)]
        if loose:
            raise UserError(
                f"{root} holds {len(loose)} images directly, but {layout}: move them "
                f"into a subfolder such as {os.path.join(root, 'all')}"
            ) from None
        raise UserError(f"no images found under {root}: {layout}") from None


def real_images(x: torch.Tensor, dataset: Dataset, n: int = 8) -> torch.Tensor:
    """The first n images of batch x; a shorter batch is topped up from the dataset."""
    if len(x) >= n:
        return x[:n]
    top_up = [dataset[j % len(dataset)][0] for j in range(n - len(x))]
    return torch.cat([x, torch.stack(top_up).to(x.device)])


def save_checkpoint(
    path: str, ddpm: nn.Module, optim: torch.optim.Optimizer, epoch: int
) -> None:
    """Save all that `--resume` needs after `epoch` epochs, as tensors and plain values.

    The file is written beside the old one and renamed over it, so an interrupted save
    never destroys the last good checkpoint.
    """
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    state = {
        "model": ddpm.state_dict(),
        "optimizer": optim.state_dict(),
        "epoch": epoch,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": cuda_rng,
    }
    tmp_path = path + ".tmp"
    torch.save(state, tmp_path)
    os.replace(tmp_path, path)


def resume_or_start(
    path: str, resume: bool, ddpm: nn.Module, optim: torch.optim.Optimizer, n_epoch: int
) -> int:
    """The epoch to start at: 0 for a new run, or where the checkpoint at `path` ended.

    Resuming restores the model, the optimizer and the random number generators, so
    the run goes on exactly as if it had never stopped. A new run refuses to overwrite
    an existing checkpoint.
    """
    if not resume:
        if os.path.exists(path):
            raise UserError(
                f"{path} already exists: continue it with --resume, "
                f"or choose another --out"
            )
        return 0
    if not os.path.exists(path):
        raise UserError(f"--resume: there is no checkpoint at {path}")
    unreadable = f"--resume: {path} is not a readable checkpoint"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only=True names the first class or function the file would import
        if "GLOBAL" in str(err):
            raise UserError(
                f"--resume: {path} refused: it holds Python objects besides tensors "
                f"and plain values, and loading them could run code"
            ) from None
        raise UserError(unreadable) from None
    except (RuntimeError, EOFError, OSError):
        raise UserError(unreadable) from None
    try:
        ddpm.load_state_dict(state["model"])
        optim.load_state_dict(state["optimizer"])
        epoch = int(state["epoch"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise UserError(
            f"--resume: {path} does not fit this script's model and settings "
            f"({str(err).splitlines()[0]})"
        ) from None
    if epoch >= n_epoch:
        raise UserError(
            f"--resume: {path} has already trained {epoch} epochs; "
            f"ask for more with --epochs"
        )
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    print(f"resuming from {path}: {epoch} epoch(s) done")
    return epoch


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than `minimum`."""

    def integer(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return integer


def positive_float(text: str) -> float:
    """An argparse type: a float above zero."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def main(train: Callable, description: str, argv: list[str] | None = None) -> None:
    """Run `train` with the command line's flags; their defaults are train's own."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--epochs", dest="n_epoch", type=at_least(1), metavar="N",
        help="total epochs to train, also when resuming (default: %(default)s)")
    add("--device", metavar="NAME",
        help="cpu, cuda, cuda:N or mps; a GPU this machine lacks falls back to the "
        "nearest device it has (default: %(default)s)")
    add("--batch-size", type=at_least(1), metavar="N",
        help="images per optimizer step (default: %(default)s)")
    add("--lr", type=positive_float,
        help="Adam learning rate (default: %(default)s)")
    add("--n-T", dest="n_T", type=at_least(1), metavar="T",
        help="diffusion steps T (default: %(default)s)")
    add("--data-root", metavar="DIR",
        help="dataset folder (default: %(default)s)")
    add("--out", metavar="DIR",
        help="folder for the sample grids and the checkpoint (default: %(default)s)")
    add("--seed", type=int, metavar="N",
        help="seed for torch's random numbers (default: unseeded)")
    add("--num-workers", type=at_least(0), metavar="N",
        help="DataLoader worker processes (default: %(default)s)")
    add("--resume", action="store_true",
        help="continue from the checkpoint in --out, up to --epochs")
    add("--fake-data", type=at_least(1), metavar="N",
        help="train on N random images of the dataset's shape, with no download "
        "(default: off)")
    parser.set_defaults(**{
        name: param.default
        for name, param in inspect.signature(train).parameters.items()
    })
    args = parser.parse_args(argv)
    try:
        train(**vars(args))
    except UserError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"\ninterrupted: what was saved in {args.out} is kept\n")
