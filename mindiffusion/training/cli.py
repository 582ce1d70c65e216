"""Starting a training script's run: its command line, with each default in
--help and every mistake ending in one sentence and exit status 2, without a
traceback; and `run_training`, which sets a run up as the command line does, for a
notebook too.

The flags of the notes' own settings are the training function's parameters; the
feature flags are those of `run.Run`; flags.py lists them all.
"""
import argparse
import dataclasses
import inspect
import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist

from mindiffusion.ddpm import DDPM
from mindiffusion.training import signals
from mindiffusion.training.checkpoints import CHECKPOINTS
from mindiffusion.training.devices import (
    init_processes,
    process_rank,
    resolve_device,
    say,
)
from mindiffusion.training.files import output_folder
from mindiffusion.training.flags import FLAGS, UserError
from mindiffusion.training.run import Run
from mindiffusion.training.signals import Stopped


def parser_for(defaults: dict, description: str, presets: dict, given_only=False):
    """The parser of a script whose settings and defaults are `defaults`; with
    `given_only`, one that returns only the flags given."""
    # a typo such as --lap is an error that names it, never another flag
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
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
    params.pop("run")
    own = {name: param.default for name, param in params.items()}
    return {**own, **dataclasses.asdict(Run())}


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
    # a preset's --grid-steps that a flag given as well no longer fits gives way
    steps_given = "grid_steps" in given
    if settings["grid_sampler"] == "ddpm" and settings["grid_steps"] is not None:
        if steps_given:
            parser.error("--grid-steps is DDIM's: add --grid-sampler ddim, or drop it")
        settings["grid_steps"] = None
    if (settings["grid_steps"] or 0) > settings["n_T"]:
        steps, n_T = settings["grid_steps"], settings["n_T"]
        if steps_given:
            parser.error(f"--grid-steps {steps} is more than --n-T {n_T}")
        settings["grid_steps"] = n_T
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
        # a Ctrl-C while the run trains is a stop signal that saves; this one came
        # before training began, or after it ended, and each save is whole or absent
        out = settings["out"]
        parser.exit(130, f"\ninterrupted: {out} holds what the saves before it wrote, "
                    f"each file whole\n")


def run_training(train: Callable, **settings) -> DDPM:
    """Call `train` with these settings, its run's flags among them, set up as a run
    from the command line is: torchrun, the device and the seed, stop signals; and
    return the DDPM it trained."""
    fields = {field.name for field in dataclasses.fields(Run)}
    run = Run(**{k: v for k, v in settings.items() if k in fields})
    own = {k: v for k, v in settings.items() if k not in fields}
    params = inspect.signature(train).parameters
    device, out = (own.get(k, params[k].default) for k in ("device", "out"))
    try:
        # torchrun's processes, each on its device, seeded, and the folder --out
        own["device"] = init_processes(resolve_device(device))
        if run.seed is not None:
            # each rank its own noise; DDP starts every rank from rank 0's weights
            torch.manual_seed(run.seed + process_rank())
        output_folder(out)
        # a script's own function, not a wrapper such as a functools.partial of it
        name = CHECKPOINTS.get(getattr(train, "__name__", None))
        if run.resume and name:
            # before the dataset, which may be missing too
            checkpoint = f"{out}/{name}"
            if not os.path.exists(checkpoint):
                raise UserError(f"--resume: there is no checkpoint at {checkpoint}")
        with signals.stop_on_signals():
            try:
                train(**own, run=run)
            except signals.Stopped as stop:
                if run.finished():
                    say(f"stopped by {signals.name(stop.signum)} during the last "
                        f"grid: the run is finished, saved in "
                        f"{run.checkpoint.path}, and only that grid is missing")
                    return run.checkpoint.ddpm
                if run.checkpoint is not None:
                    run.grids.after_stop()
                raise
            except OSError as err:
                grid = run.checkpoint and run.grids.being_written()
                if grid is None:
                    raise
                # the script's save_image failed: no part of the grid is kept
                if os.path.exists(grid):
                    os.remove(grid)
                raise UserError(
                    f"the grid {grid} could not be written ({err.strerror}); its "
                    f"epoch is saved in {run.checkpoint.path}: make room or "
                    f"give another --out, then --resume"
                ) from None
        return run.checkpoint and run.checkpoint.ddpm
    finally:
        run.close()
        if dist.is_initialized():
            dist.destroy_process_group()
