"""A minimal DDPM, as its code notes describe it, and the commands that use it.

The DDPM itself is two files, and two beside them add to it:
    ddpm.py    the schedules, the training loss (Algorithm 1) and the sampler
               (Algorithm 2), with classifier-free guidance
    unet.py    the notes' NaiveUnet noise model
    dummy.py   the notes' DummyEpsModel, MNIST's plain CNN, with classes for --cond
    ddim.py    DDIM, a sampler of fewer steps for the same trained model

The commands, each `python -m mindiffusion.<name>`: sample (draw from a checkpoint),
judge (how many MNIST samples read as digits, and which), fid (the Frechet Inception
Distance, with frechet.py), figures (a lesson's figures), export (the weights alone)
and bench (training and sampling speed).

train.py is the trainer, `python -m mindiffusion.train DATASET`: the notes' loop with
every feature of a long run on one page. training/ is the machinery it calls: flags,
checkpoints and --resume, stop signals, torchrun, --ema, --amp and the rest. The
DDPM files import nothing from it.
"""
