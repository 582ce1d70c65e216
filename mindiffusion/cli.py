"""Plumbing shared by the three training scripts: flags, device choice, torchrun,
the output folder and missing data. The training loop itself stays in each script;
checkpoints and --resume are in `checkpoints`.

A mistake in the command line or the data raises `UserError`; `main` prints it as one
sentence and exits with status 2, without a traceback.
"""
import argparse
import contextlib
import inspect
import io
import os
import sys
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

DEVICES = "use cpu, cuda, cuda:N or mps"

# under torchrun, a gloo group in which the ranks wait for rank 0 without a time limit
patient_group = None


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
    global patient_group
    # a year: longer than any grid takes to draw, and torchrun ends the group anyway
    # when a process dies
    patient_group = dist.new_group(backend="gloo", timeout=timedelta(days=365))
    return device, rank, world_size


def gather(value) -> list:
    """`value` from every rank, in rank order; a plain run's is a list of one.

    The ranks meet in the patient group: while rank 0 draws a grid, which can take
    longer than the process group's 30 minutes (a 1000-step MNIST grid takes 48 on a
    CPU), the other ranks wait here without a time limit.
    """
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value, group=patient_group)
    return values


def shared_seed(seed: int | None) -> int:
    """`seed`, or if there is none a random one; under torchrun, rank 0's on all."""
    if seed is not None:
        return seed
    drawn = torch.randint(2**62, ())
    if dist.is_initialized():
        dist.broadcast(drawn, src=0, group=patient_group)
    return int(drawn)


def output_folder(out: str) -> None:
    """Make the folder --out names, or say in one sentence why it cannot be made."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a folder: choose another --out")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {out} cannot be made ({err.strerror})") from None


def distribute(ddpm: nn.Module, device: torch.device) -> nn.Module:
    """Under torchrun, ddpm inside DistributedDataParallel; otherwise ddpm itself.

    DDP starts every rank from rank 0's weights and averages the gradients of all
    ranks during backward, so every rank takes the same optimizer step. On GPUs,
    BatchNorm becomes SyncBatchNorm, which normalises over the global batch as one
    GPU would; torch's SyncBatchNorm runs on GPUs only, so CPU ranks keep BatchNorm
    and normalise their own share of the batch.
    """
    if not dist.is_initialized():
        return ddpm
    if device.type == "cuda":
        # in place, on the same parameters and buffers: the optimizer keeps them
        ddpm = nn.SyncBatchNorm.convert_sync_batchnorm(ddpm)
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


def autocast_dtype(amp: str | None, device: torch.device) -> torch.dtype | None:
    """The dtype that --amp autocasts the training forward pass to; None: float32.

    auto takes bfloat16 where the device computes it natively, and float16 (with a
    GradScaler, in the script) on CUDA GPUs of compute capability 7.x, such as the
    T4 and the V100, which have float16 tensor cores but no bfloat16; elsewhere it
    stays in float32 and says so. bf16 and fp16 force their dtype anywhere.
    """
    if amp in (None, "bf16", "fp16"):
        return {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 7:
        return torch.float16
    return torch.bfloat16 if has_native_bf16(device) else None


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


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than `minimum`."""

    def integer(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return integer


def fraction(text: str) -> float:
    """An argparse type: a float strictly between 0 and 1."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def guidance_weight(text: str) -> float:
    """An argparse type: a guidance weight w, from 0 (no guidance) up."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(
            f"must be at least 0, plain conditional sampling, got {value}"
        )
    return value


def positive_float(text: str) -> float:
    """An argparse type: a float above zero."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def main(
    train: Callable,
    description: str,
    argv: list[str] | None = None,
    presets: dict[str, tuple[str, dict]] | None = None,
) -> None:
    """Run `train` with the command line's flags; their defaults are train's own.

    Each preset, NAME: (what it is for, settings), is a flag --NAME that sets those
    settings as the defaults, so that flags given as well win over it.
    """
    defaults = {
        name: param.default
        for name, param in inspect.signature(train).parameters.items()
    }
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
    add("--amp", nargs="?", const="auto", choices=("auto", "bf16", "fp16"),
        help="autocast the training forward pass: auto (a bare --amp) takes bfloat16 "
        "where it is native, float16 with loss scaling on CUDA GPUs of compute "
        "capability 7.x (T4, V100), float32 elsewhere; bf16 or fp16 force one "
        "(default: off)")
    add("--channels-last", action="store_true",
        help="model and batches in channels_last memory format (default: off)")
    add("--ema", type=fraction, metavar="DECAY",
        help="also keep an exponential moving average of the weights, such as "
        "0.999, in the checkpoint, and draw the grids from it (default: off)")
    add("--compile", action="store_true",
        help="torch.compile the noise model; the first steps wait for the compiler "
        "(default: off)")
    add("--save-every", type=at_least(1), metavar="N",
        help="also save the checkpoint every N optimizer steps, besides each epoch's "
        "end: a CelebA epoch is 6,332 steps, while MNIST's 469 and CIFAR-10's 98 "
        "never reach the default, so they save only at epoch ends "
        "(default: %(default)s)")
    add("--grad-clip", type=positive_float, metavar="MAX_NORM",
        help="clip the gradients' total norm to MAX_NORM, as the DDPM paper did at "
        "1.0 (default: off, as in the notes)")
    add("--grid-every", type=at_least(1), metavar="N",
        help="draw the grid after epochs N, 2N, ... and after the last one; the "
        "checkpoint is still saved every epoch (default: %(default)s)")
    add("--cond", action="store_true",
        help="train class-conditionally, with classifier-free guidance: on the "
        "dataset's labels (an image folder's subfolders) (default: off)")
    add("--p-uncond", type=fraction, metavar="P",
        help="with --cond, how often a label is replaced by the null class "
        f"(default: {defaults['p_uncond']})")
    add("--guide-w", type=guidance_weight, metavar="W",
        help="with --cond, the guidance weight of the grids: (1 + W) eps(x, c) - W "
        f"eps(x, null); 0 is plain conditional sampling (default: "
        f"{defaults['guide_w']})")
    if "eps_model" in defaults:
        add("--eps-model", choices=("dummy", "unet"),
            help="dummy: the notes' DummyEpsModel; unet: their NaiveUnet, on images "
            "padded to 32x32 (default: %(default)s)")
        add("--n-feat", type=at_least(8), metavar="N",
            help="NaiveUnet's width, a multiple of 8 (default: 128)")
    parser.set_defaults(**defaults)
    words = sys.argv[1:] if argv is None else argv
    for name, (purpose, settings) in (presets or {}).items():
        flags = " ".join(
            f"--{key.replace('_', '-')} {value}" for key, value in settings.items()
        )
        add(f"--{name}", action="store_true",
            help=f"{purpose}: {flags}; flags given as well win over these")
        if f"--{name}" in words:
            parser.set_defaults(**settings)
    # None until given, so that --p-uncond or --guide-w without --cond is caught
    parser.set_defaults(p_uncond=None, guide_w=None)
    args = parser.parse_args(argv)
    for name in presets or {}:
        delattr(args, name)
    if not args.cond and (args.p_uncond, args.guide_w) != (None, None):
        parser.error("--p-uncond and --guide-w are --cond's: add --cond, or drop them")
    for name in ("p_uncond", "guide_w"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    # imported here: duties itself builds on this module
    from mindiffusion.duties import Stopped, stop_on_signals

    try:
        with stop_on_signals():
            train(**vars(args))
    except UserError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except Stopped as stop:
        parser.exit(128 + stop.signum, f"{stop}\n" if process_rank() == 0 else None)
    except KeyboardInterrupt:
        parser.exit(130, f"\ninterrupted: what was saved in {args.out} is kept\n")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
