"""The trainer's command line, `python -m mindiffusion.train DATASET [flags]`: each
flag with its default in --help, the recipe's settings as the defaults of the
dataset named, the --laptop preset, and every mistake one sentence and exit status
2, without a traceback. flags.py lists the flags.
"""
import argparse

from mindiffusion.training.devices import usable_cpus
from mindiffusion.training.flags import FLAGS, HelpFormatter, as_flags
from mindiffusion.training.recipes import LAPTOP, RECIPES, recipe_settings

# the settings that are not the recipe's: the notes' epochs and steps, and each
# feature flag off but two, which change no number: a save every 1000 steps, and
# worker processes for the loader (docs/layout.md lists each default and why)
DEFAULTS = dict(
    n_epoch=100, n_T=1000, out="contents", seed=None,
    num_workers=min(16, usable_cpus()), resume=False, fake_data=None, per_class=None,
    fast=False, amp=None, channels_last=False, compile=False, ema=None,
    ema_warmup=True, save_every=1000, grad_clip=None, grid_every=1, grid_minutes=None,
    grid_sampler="ddpm", grid_steps=None, unit_eps=False, cond=False, p_uncond=0.1,
    guide_w=2.0,
)


def settings_of(dataset: str, **given) -> dict:
    """Every setting of a run on `dataset`: those given, else the recipe's, else
    the defaults; a name that is no setting, such as a typo, is refused."""
    settings = {**DEFAULTS, **recipe_settings(dataset)}
    if unknown := sorted(set(given) - set(settings)):
        raise TypeError(f"no such setting of a run: {', '.join(unknown)}")
    return {**settings, **given}


def parser_for(
    dataset: str, description: str, given_only: bool = False
) -> argparse.ArgumentParser:
    """The parser whose defaults are those of `dataset`; with `given_only`, one that
    returns only the flags given."""
    # a typo such as --lap is an error that names it, never another flag
    parser = argparse.ArgumentParser(
        prog="python -m mindiffusion.train",
        allow_abbrev=False,
        description=description,
        formatter_class=HelpFormatter,
        argument_default=argparse.SUPPRESS if given_only else None,
    )
    parser.add_argument("dataset", choices=RECIPES,
                        help="whose recipe to train: the notes' script of that name")
    for key, (flag, options, text) in FLAGS.items():
        parser.add_argument(flag, dest=key, help=text, **options)
    parser.add_argument("--laptop", action="store_true",
                        help=f"MNIST's lesson, a small UNet for a laptop's CPU or a "
                        f"Mac's GPU: {as_flags(LAPTOP)}; flags given as well win")
    if not given_only:
        parser.set_defaults(**settings_of(dataset))
    return parser


def parse(argv: list[str], description: str) -> tuple[argparse.ArgumentParser, dict]:
    """The parser and the settings of the command line argv, checked."""
    # the dataset named, whose recipe gives the defaults that --help shows: guessed
    # from the words for --help, then read as argparse reads it, since a word such
    # as --out mnist may come before it
    guess = next((word for word in argv if word in RECIPES), "mnist")
    dataset = parser_for(guess, description).parse_args(argv).dataset
    parser = parser_for(dataset, description)
    given = vars(parser_for(dataset, description, given_only=True).parse_args(argv))
    settings = settings_of(dataset)
    if given.pop("laptop", False):
        if dataset != "mnist":
            parser.error("--laptop is MNIST's lesson: python -m mindiffusion.train "
                         "mnist --laptop")
        settings.update(LAPTOP)
    settings.update(given)
    if not settings["cond"] and {"p_uncond", "guide_w"} & set(given):
        parser.error("--p-uncond and --guide-w are --cond's: add --cond, or drop them")
    if "ema_warmup" in given and settings["ema"] is None:
        parser.error("--no-ema-warmup is --ema's: add --ema DECAY, or drop it")
    # a preset's --grid-steps that a flag given as well no longer fits gives way
    steps_given = "grid_steps" in given
    if settings["grid_sampler"] == "ddpm" and settings["grid_steps"] is not None:
        if steps_given:
            parser.error("--grid-steps is DDIM's: add --grid-sampler ddim, or drop it")
        settings["grid_steps"] = None
    if settings["grid_sampler"] == "ddpm" and settings["unit_eps"]:
        parser.error("--unit-eps is DDIM's: add --grid-sampler ddim, or drop it")
    if (settings["grid_steps"] or 0) > settings["n_T"]:
        steps, n_T = settings["grid_steps"], settings["n_T"]
        if steps_given:
            parser.error(f"--grid-steps {steps} is more than --n-T {n_T}")
        settings["grid_steps"] = n_T
    if settings["eps_model"] == "dummy" and dataset != "mnist":
        parser.error("--eps-model dummy is MNIST's 28x28 CNN: drop it for "
                     f"{dataset}, whose model is NaiveUnet")
    if "n_feat" in given and settings["eps_model"] != "unet":
        parser.error("--n-feat is NaiveUnet's width: add --eps-model unet")
    if settings["eps_model"] == "unet" and settings["n_feat"] % 8:
        parser.error(f"--n-feat {settings['n_feat']}: NaiveUnet's GroupNorm(8, ...) "
                     f"needs a multiple of 8")
    return parser, settings
