"""Plumbing shared by the three training scripts: flags, device choice, torchrun,
missing data and checkpoints. The training loop itself stays in each script.

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
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

DEVICES = "use cpu, cuda, cuda:N or mps"


class UserError(Exception):
    """A mistake in the command line or the data, explained in one sentence."""


def process_rank() -> int:
    """This process's rank: torchrun sets RANK; a plain run is rank 0."""
    return int(os.environ.get("RANK", 0))


def say(message: str) -> None:
    """Print a line once: under torchrun only rank 0 speaks."""
    if process_rank() == 0:
        print(message)


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
            say(f"CUDA is not available here: using {fallback} instead of {name}")
            return torch.device(fallback)
        n_gpus = torch.cuda.device_count()
        if device.index is not None and device.index >= n_gpus:
            say(f"{name} does not exist ({n_gpus} GPU(s) here): using cuda:0 instead")
            return torch.device("cuda:0")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            say(f"MPS is not available here: using cpu instead of {name}")
            return torch.device("cpu")
    elif device.type != "cpu":
        raise UserError(f"unsupported device {name!r}: {DEVICES}")
    return device


def init_processes(name: str) -> tuple[torch.device, int, int]:
    """The device, this process's rank and the number of processes.

    A plain run is rank 0 of 1 on the device `resolve_device` picks. Under torchrun,
    which sets RANK, LOCAL_RANK and WORLD_SIZE, each process joins the process group
    and takes the GPU of its local rank (nccl), or stays on the CPU (gloo).
    """
    if "LOCAL_RANK" not in os.environ:
        return resolve_device(name), 0, 1
    rank, world_size = process_rank(), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    device = resolve_device(name)
    if device.type == "cuda":
        n_gpus = torch.cuda.device_count()
        if local_rank >= n_gpus:
            raise UserError(
                f"torchrun started more processes on this machine than its {n_gpus} "
                f"GPU(s): use --nproc_per_node={n_gpus}"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"torchrun runs on CUDA GPUs or on the CPU, not on {device}")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, rank, world_size


def distribute(ddpm: nn.Module, device: torch.device) -> nn.Module:
    """Under torchrun, ddpm inside DistributedDataParallel; otherwise ddpm itself.

    DDP starts every rank from rank 0's weights and averages the gradients of all
    ranks during backward, so every rank takes the same optimizer step.
    """
    if not dist.is_initialized():
        return ddpm
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(ddpm, device_ids=device_ids)


def split_batch(batch_size: int, world_size: int) -> int:
    """Each rank's share of the global batch, so N ranks take the steps of one."""
    if batch_size % world_size:
        raise UserError(
            f"--batch-size {batch_size} does not split evenly across "
            f"{world_size} processes: give a multiple of {world_size}"
        )
    return batch_size // world_size


def has_native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bfloat16 natively; if not, say so in one line.

    Elsewhere autocast still runs, but emulated: on this repository's AVX2 test CPU,
    NaiveUnet trained 10 times slower in bfloat16 than in float32 (README).
    """
    if device.type == "cuda":
        # bfloat16 tensor cores came with Ampere, compute capability 8.0
        native = torch.cuda.get_device_capability(device)[0] >= 8
        where = f"this GPU ({torch.cuda.get_device_name(device)})"
    elif device.type == "cpu":
        # oneDNN runs bfloat16 convolutions only on CPUs with AVX-512 or AMX
        native = (
            torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
        where = "this CPU"
    else:
        say(f"--amp: bfloat16 autocast is for CUDA and CPUs; {device} stays in float32")
        return False
    if not native:
        say(f"--amp: {where} has no native bfloat16, so training stays in float32")
    return native


@contextlib.contextmanager
def explain_missing_dataset(name: str, root: str):
    """Turn a failed torchvision download into one sentence that says what to do.

    torchvision prints each mirror it tries; that chatter is held back, and shown
    only if the dataset loads after all. Under torchrun, the first process on each
    machine downloads while the others wait, then they read what it wrote.
    """
    first_on_machine = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if dist.is_initialized() and not first_on_machine:
        dist.barrier()
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
    if dist.is_initialized() and first_on_machine:
        dist.barrier()
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
    path: str,
    ddpm: nn.Module,
    optim: torch.optim.Optimizer,
    epoch: int,
    recipe: dict,
    ema: AveragedModel | None = None,
) -> None:
    """Save all that `--resume` needs after `epoch` epochs, as tensors and plain values,
    with the recipe that rebuilds the model and, under --ema, the averaged weights.

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


def resume_or_start(
    path: str,
    resume: bool,
    ddpm: nn.Module,
    optim: torch.optim.Optimizer,
    n_epoch: int,
    ema: AveragedModel | None = None,
) -> int:
    """The epoch to start at: 0 for a new run, or where the checkpoint at `path` ended.

    Resuming restores the model, the optimizer, the averaged weights of --ema and the
    random number generators, so the run goes on exactly as if it had never stopped.
    A new run refuses to overwrite an existing checkpoint.
    """
    if not resume:
        if os.path.exists(path):
            raise UserError(
                f"{path} already exists: continue it with --resume, "
                f"or choose another --out"
            )
        return 0
    try:
        state = load_checkpoint(path)
    except UserError as err:
        raise UserError(f"--resume: {err}") from None
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
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    rank = process_rank()
    if rank > 0:
        # the checkpoint holds rank 0's generator: the other ranks seed their own
        # from it, so that no two ranks draw the same noise
        torch.manual_seed(int(torch.randint(2**62, (rank,))[-1]))
    say(f"resuming from {path}: {epoch} epoch(s) done")
    return epoch


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than `minimum`."""

    def integer(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return integer


def decay(text: str) -> float:
    """An argparse type: a float strictly between 0 and 1."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


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
        "nearest device it has; under torchrun each process takes the GPU of its "
        "local rank (default: %(default)s)")
    add("--batch-size", type=at_least(1), metavar="N",
        help="images per optimizer step; under torchrun, split across the processes "
        "(default: %(default)s)")
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
    add("--amp", action="store_true",
        help="bfloat16 autocast around the training forward pass, where the device "
        "has native bfloat16; float32 elsewhere (default: off)")
    add("--channels-last", action="store_true",
        help="model and batches in channels_last memory format (default: off)")
    add("--ema", type=decay, metavar="DECAY",
        help="also keep an exponential moving average of the weights, such as "
        "0.999, in the checkpoint, and draw the grids from it (default: off)")
    add("--compile", action="store_true",
        help="torch.compile the noise model; the first steps wait for the compiler "
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
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
