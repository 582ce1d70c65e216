"""The trainer's machinery: what the loop's page, mindiffusion/train.py, calls.

None of it is in the code notes. Each module is one whole idea, called from that
page and returning to it; none changes what a notes' call does:

    cli.py, flags.py  the trainer's command line; each flag with its help
    recipes.py      each notes' script's settings, in one table, and what they build
    data.py         the datasets, the epoch's order that a resume takes up, --cond's
                    classes
    steps.py        the guard before the optimizer's step, the --ema average
    grids.py        what draws the grids, their walk, their image, written whole
    checkpoints.py  the checkpoint, --resume, and what a resume refuses or says
    files.py        files written whole, the checkpoint's lock, the CSV record
    devices.py      the device, torchrun, --amp's precision, what --fast takes
    signals.py      stopping on a signal, saved
    progress.py     progress bars over a sampler's steps, and its walk's states

The DDPM (ddpm.py, unet.py, dummy.py, ddim.py, one folder up) imports nothing from
here, and nothing here imports a command.
"""
