"""The run's machinery: what the three training scripts share besides the DDPM.

None of it is in the code notes. Each script keeps the notes' loop and hands its
ddpm, optim and dataloader to `Run.prepare` (run.py), which readies them as
Accelerate's `prepare` does: they change how they compute, never what they do.
Whatever a flag adds is a call of its own in the loop, a method of the Run. A module
per idea:

    run.py          the flags, `Run.prepare`, and the loop's own calls
    cli.py, flags.py  the command line and run_training; each flag with its help
    steps.py        the prepared model and optimizer, the guard, the --ema average
    grids.py        what draws the grids, where they go, the grids the run draws
    checkpoints.py  the checkpoint, --resume, and what a resume refuses or says
    files.py        files written whole, the checkpoint's lock, the CSV record
    data.py         the datasets, the prepared loader, --cond's classes
    devices.py      the device, torchrun, --amp's precision, what --fast takes
    signals.py      stopping on a signal, saved
    progress.py     progress bars over a sampler's steps, and its walk's states

The DDPM (ddpm.py, unet.py, ddim.py, one folder up) imports nothing from here, and
nothing here imports a command.
"""
