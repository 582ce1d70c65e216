"""The run's machinery: what the three training scripts share besides the DDPM.

None of it is in the code notes. Each script keeps the notes' loop as written and
hands its ddpm, optim and dataloader to `Run.prepare` (run.py), which returns
objects that do the flags' work under the notes' calls: prepared.py (the ddpm whose
call and sample the loop uses), duties.py (checks and saves as optimizer step hooks)
and data.py (the loader). The rest, a module per idea:

    cli.py, flags.py        the command line: its parser, and each flag with help
    checkpoints.py          the checkpoint and --resume; files.py writes it whole
    resume_checks.py        what a --resume refuses, and the changes it names
    record.py, readings.py  the CSV record; the step's loss and gradient norm
    signals.py, locks.py    stopping on a signal; the lock on a checkpoint
    distributed.py          torchrun and DDP
    devices.py, fastpath.py the device and --amp's precision; what --fast takes
    ema.py                  the --ema moving average
    conditioning.py         --cond's classes and grid rows
    progress.py             the sampler's progress bars, and its walk's states
    errors.py               UserError: a mistake told in one sentence

The DDPM (ddpm.py, unet.py, ddim.py, one folder up) imports nothing from here, and
nothing here imports a command.
"""
