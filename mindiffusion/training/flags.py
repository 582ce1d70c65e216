"""The command line's words: the trainer's flags, each with its argparse
type and its help, which shows the default; the argparse types that the commands'
flags share, each refusing a bad value with one sentence; and UserError, the one
exception a user meets.
"""
import argparse
import math
import sys
import textwrap
from collections.abc import Callable


class UserError(Exception):
    """A mistake in the command line or the data, explained in one sentence: every
    command of the project prints it and exits with status 2, without a traceback."""


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than `minimum`."""

    def integer(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return integer


def bounded_float(test: Callable[[float], bool], wanted: str) -> Callable[[str], float]:
    """An argparse type: a finite float for which test(value) holds, as `wanted`
    says; inf and nan are no number a flag can use."""

    def number(text: str) -> float:
        value = float(text)
        if not math.isfinite(value) or not test(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {value}")
        return value

    return number


def seed(text: str) -> int:
    """An argparse type: a seed that torch.manual_seed takes, with room for the
    torchrun ranks that each add theirs."""
    value = int(text)
    if not 0 <= value < 2**63 - 1024:
        raise argparse.ArgumentTypeError(f"must be from 0 to 2**63 - 1025, got {value}")
    return value


def step_counts(text: str) -> list[int]:
    """An argparse type: one step count, or several separated by commas."""
    try:
        counts = [int(word) for word in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of step counts: {text}")
    if min(counts) < 1:
        raise argparse.ArgumentTypeError(f"step counts must be at least 1: {text}")
    return counts


fraction = bounded_float(lambda v: 0 < v < 1, "between 0 and 1")
# DDIM's noise: 0, the deterministic walk, to 1, DDPM's posterior variance
eta = bounded_float(lambda v: 0 <= v <= 1, "from 0 to 1")
guidance_weight = bounded_float(
    lambda v: v >= 0, "at least 0, plain conditional sampling"
)
positive_float = bounded_float(lambda v: v > 0, "positive")


def run_command(main: Callable[[], None], prog: str) -> None:
    """Run a command's main: a Ctrl-C ends it in one line with status 130, as it
    ends the trainer, not in a traceback."""
    try:
        main()
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted by Ctrl-C", file=sys.stderr)
        sys.exit(130)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with the description as written, and each flag's help wrapped at
    spaces only: a flag in it, such as --grid-sampler, is never split at a hyphen,
    so that a line copied from the terminal parses."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def command_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The parser of a `python -m mindiffusion...` command, its docstring shown as
    written; a typo such as --raw is an error that names it, never another flag."""
    return argparse.ArgumentParser(
        allow_abbrev=False,
        prog=prog,
        description=description,
        formatter_class=HelpFormatter,
    )


# the help of the flags that the sampling commands share
RAW_WALK_HELP = (
    "DDIM as the model alone walks it: x_0 not kept within the data's range "
    "(default: kept, as the papers' released samplers keep it)"
)
UNIT_EPS_HELP = (
    "this repository's own rule, not a paper's: also scale each sample's eps to "
    "the deviation 1 of a noise draw at every DDIM step, which keeps NaiveUnet "
    "on the walk at eta 0 (default: off)"
)
DEVICE_HELP = (
    "cpu, cuda, cuda:N or mps; falls back as the trainer does "
    "(default: %(default)s)"
)


# each flag: its name, what argparse needs, and its help; %(default)s shows the default
FLAGS = {
    "n_epoch": ("--epochs", dict(type=at_least(1), metavar="N"),
                "total epochs to train, also when resuming (default: %(default)s)"),
    "device": ("--device", dict(metavar="NAME"),
               "cpu, cuda, cuda:N or mps; a GPU this machine lacks falls back to the "
               "nearest device it has; under torchrun each process takes the GPU of "
               "its local rank (default: %(default)s)"),
    "batch_size": ("--batch-size", dict(type=at_least(1), metavar="N"),
                   "images per optimizer step; under torchrun, split across the "
                   "processes (default: %(default)s)"),
    "lr": ("--lr", dict(type=positive_float),
           "Adam learning rate (default: %(default)s)"),
    "n_T": ("--n-T", dict(type=at_least(1), metavar="T"),
            "diffusion steps T (default: %(default)s)"),
    "data_root": ("--data-root", dict(metavar="DIR"),
                  "dataset folder (default: %(default)s)"),
    "out": ("--out", dict(metavar="DIR"),
            "folder for the sample grids and the checkpoint (default: %(default)s)"),
    "eps_model": ("--eps-model", dict(choices=("dummy", "unet")),
                  "dummy: the notes' DummyEpsModel; unet: their NaiveUnet, on images "
                  "padded to 32x32 (default: %(default)s)"),
    "n_feat": ("--n-feat", dict(type=at_least(8), metavar="N"),
               "NaiveUnet's width, a multiple of 8 (default: %(default)s)"),
    "seed": ("--seed", dict(type=seed, metavar="N"),
             "seed for torch's random numbers (default: unseeded)"),
    "num_workers": ("--num-workers", dict(type=at_least(0), metavar="N"),
                    "DataLoader worker processes (default: %(default)s)"),
    "resume": ("--resume", dict(action="store_true"),
               "continue from the checkpoint in --out, up to --epochs"),
    "fake_data": ("--fake-data", dict(type=at_least(1), metavar="N"),
                  "train on N random images of the dataset's shape, with no download; "
                  "they are held in memory, N x C x H x W bytes (default: off)"),
    "per_class": ("--per-class", dict(type=at_least(1), metavar="N"),
                  "train on the first N images of each class only (of each digit, "
                  "for MNIST; of all, for an unlabelled folder), such as the part "
                  "of MNIST a figure of the README was measured on (default: all)"),
    "fast": ("--fast", dict(action="store_true"),
             "turn on the speed flags that pay on the device: --amp auto and "
             "--compile on CUDA and on a CPU (where --amp auto takes bfloat16 only "
             "if the CPU has it natively), none yet on MPS. Left out: "
             "--channels-last, whose GroupNorm is slow on CUDA; flags given as well "
             "keep their value (default: off)"),
    "amp": ("--amp", dict(nargs="?", const="auto", choices=("auto", "bf16", "fp16")),
            "autocast the training forward pass: auto (a bare --amp) takes bfloat16 "
            "where it is native, float16 with loss scaling on CUDA GPUs of compute "
            "capability 7.x (T4, V100), float32 elsewhere; bf16 or fp16 force one "
            "(default: off)"),
    "channels_last": ("--channels-last", dict(action="store_true"),
                      "model and activations in channels_last memory format "
                      "(default: off)"),
    "compile": ("--compile", dict(action="store_true"),
                "torch.compile the noise model; the first steps wait for the "
                "compiler (default: off)"),
    "ema": ("--ema", dict(type=fraction, metavar="DECAY"),
            "also keep an exponential moving average of the weights, such as 0.999, "
            "in the checkpoint, and draw the grids from it (default: off)"),
    "ema_warmup": ("--no-ema-warmup", dict(action="store_false"),
                   "with --ema, a fixed decay from the first step; by default a "
                   "young average decays by min(DECAY, (1 + n) / (10 + n)) after n "
                   "updates, so that it follows the weights rather than keeping the "
                   "initial ones (default: warm-up on)"),
    "save_every": ("--save-every", dict(type=at_least(1), metavar="N"),
                   "also save the checkpoint every N optimizer steps, besides each "
                   "epoch's end: a CelebA epoch is 6,332 steps, while MNIST's 469 and "
                   "CIFAR-10's 98 never reach the default, so they save only at "
                   "epoch ends (default: %(default)s)"),
    "grad_clip": ("--grad-clip", dict(type=positive_float, metavar="MAX_NORM"),
                  "clip the gradients' total norm to MAX_NORM, as the DDPM paper did "
                  "at 1.0 (default: off, as in the notes)"),
    "grid_every": ("--grid-every", dict(type=at_least(1), metavar="N"),
                   "draw the grid after epochs N, 2N, ... and after the last one; "
                   "the checkpoint is still saved every epoch (default: %(default)s)"),
    "grid_minutes": ("--grid-minutes", dict(type=positive_float, metavar="M"),
                     "also draw a grid within an epoch once M minutes have passed "
                     "since the last one, as OUT/ddpm_sample_{epoch}_step{n}.png, "
                     "for epochs that last longer (default: off)"),
    "grid_sampler": ("--grid-sampler", dict(choices=("ddpm", "ddim")),
                     "ddpm draws each grid in the model's n_T steps; ddim in "
                     "--grid-steps, with eta 1 (DDPM's posterior noise), seconds on "
                     "a CPU where ddpm takes minutes (default: %(default)s)"),
    "grid_steps": ("--grid-steps", dict(type=at_least(1), metavar="N"),
                   "with --grid-sampler ddim, its steps, at most --n-T (default: 50, "
                   "or n_T if less)"),
    "unit_eps": ("--unit-eps", dict(action="store_true"),
                 "with --grid-sampler ddim, " + UNIT_EPS_HELP),
    "cond": ("--cond", dict(action="store_true"),
             "train class-conditionally, with classifier-free guidance: on the "
             "dataset's labels (an image folder's subfolders) (default: off)"),
    "p_uncond": ("--p-uncond", dict(type=fraction, metavar="P"),
                 "with --cond, how often a label is replaced by the null class "
                 "(default: %(default)s)"),
    "guide_w": ("--guide-w", dict(type=guidance_weight, metavar="W"),
                "with --cond, the guidance weight of the grids: (1 + W) eps(x, c) - W "
                "eps(x, null); 0 is plain conditional sampling (default: "
                "%(default)s)"),
}


def as_flags(settings: dict) -> str:
    """Settings as the trainer's command line writes them, so that they parse: a
    switch alone, another flag with its value, such as --channels-last --amp auto."""
    return " ".join(
        FLAGS[key][0] + ("" if value is True else f" {value}")
        for key, value in settings.items()
    )
