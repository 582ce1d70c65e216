"""The training scripts' command line: their flags, with each default in --help, and
every mistake ending in one sentence and exit status 2, without a traceback.

The flags of the notes' own settings are the training function's parameters; the
feature flags are those of `mindiffusion.run.Run`.
"""
import argparse
import dataclasses
import inspect
import sys
from collections.abc import Callable

from mindiffusion.distributed import process_rank
from mindiffusion.errors import UserError
from mindiffusion.run import run_training
from mindiffusion.signals import Stopped


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than `minimum`."""

    def integer(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return integer


def bounded_float(test: Callable[[float], bool], wanted: str) -> Callable[[str], float]:
    """An argparse type: a float for which test(value) holds, as `wanted` says."""

    def number(text: str) -> float:
        value = float(text)
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {value}")
        return value

    return number


fraction = bounded_float(lambda v: 0 < v < 1, "between 0 and 1")
guidance_weight = bounded_float(
    lambda v: v >= 0, "at least 0, plain conditional sampling"
)
positive_float = bounded_float(lambda v: v > 0, "positive")


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
    "seed": ("--seed", dict(type=int, metavar="N"),
             "seed for torch's random numbers (default: unseeded)"),
    "num_workers": ("--num-workers", dict(type=at_least(0), metavar="N"),
                    "DataLoader worker processes (default: %(default)s)"),
    "resume": ("--resume", dict(action="store_true"),
               "continue from the checkpoint in --out, up to --epochs"),
    "fake_data": ("--fake-data", dict(type=at_least(1), metavar="N"),
                  "train on N random images of the dataset's shape, with no download; "
                  "they are held in memory, N x C x H x W bytes (default: off)"),
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
    "grid_sampler": ("--grid-sampler", dict(choices=("ddpm", "ddim")),
                     "ddpm draws each grid in the model's n_T steps; ddim in "
                     "--grid-steps, with eta 1 (DDPM's posterior noise), seconds on "
                     "a CPU where ddpm takes minutes (default: %(default)s)"),
    "grid_steps": ("--grid-steps", dict(type=at_least(1), metavar="N"),
                   "with --grid-sampler ddim, its steps, at most --n-T (default: 50, "
                   "or n_T if less)"),
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


def parser_for(defaults: dict, description: str, presets: dict, given_only=False):
    """The parser of a script whose settings and defaults are `defaults`; with
    `given_only`, one that returns only the flags given."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS if given_only else None,
    )
    for key, (flag, options, text) in FLAGS.items():
        if key in defaults:
            parser.add_argument(flag, dest=key, help=text, **options)
    for name, (purpose, settings) in presets.items():
        words = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items())
        parser.add_argument(f"--{name}", action="store_true",
                            help=f"{purpose}: {words}; flags given as well win")
    if not given_only:
        parser.set_defaults(**defaults)
    return parser


def settings_of(train: Callable) -> dict:
    """The training function's own settings and its run's flags, with defaults."""
    params = dict(inspect.signature(train).parameters)
    run = params.pop("run").default
    own = {name: param.default for name, param in params.items()}
    return {**own, **dataclasses.asdict(run)}


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
    presets = presets or {}
    words = sys.argv[1:] if argv is None else argv
    defaults = settings_of(train)
    parser = parser_for(defaults, description, presets)
    parser.parse_args(words)
    # the flags given, as argparse read them, abbreviations included
    given = vars(parser_for(defaults, description, presets, True).parse_args(words))
    settings = dict(defaults)
    for name in presets:
        if given.pop(name, False):
            settings.update(presets[name][1])
    settings.update(given)
    if not settings["cond"] and {"p_uncond", "guide_w"} & set(given):
        parser.error("--p-uncond and --guide-w are --cond's: add --cond, or drop them")
    if "ema_warmup" in given and settings["ema"] is None:
        parser.error("--no-ema-warmup is --ema's: add --ema DECAY, or drop it")
    if settings["grid_sampler"] == "ddpm" and settings["grid_steps"] is not None:
        parser.error("--grid-steps is DDIM's: add --grid-sampler ddim, or drop it")
    if (settings["grid_steps"] or 0) > settings["n_T"]:
        steps, n_T = settings["grid_steps"], settings["n_T"]
        parser.error(f"--grid-steps {steps} is more than --n-T {n_T}")
    if "n_feat" in given and settings.get("eps_model") != "unet":
        parser.error("--n-feat is NaiveUnet's width: add --eps-model unet")
    if settings.get("eps_model") == "unet" and settings["n_feat"] % 8:
        n_feat = settings["n_feat"]
        parser.error(f"--n-feat {n_feat}: NaiveUnet's GroupNorm(8, ...) needs a "
                     f"multiple of 8")
    try:
        run_training(train, **settings)
    except UserError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except Stopped as stop:
        parser.exit(128 + stop.signum, f"{stop}\n" if process_rank() == 0 else None)
    except KeyboardInterrupt:
        out = settings["out"]
        parser.exit(130, f"\ninterrupted: what was saved in {out} is kept\n")

