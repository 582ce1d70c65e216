"""A minimal DDPM: the schedules, loss and sampler (`ddpm`), the notes' UNet (`unet`),
the DDIM sampler (`ddim`), and the prepared run that the three training scripts
share (`run`, with `duties`, `data`, `checkpoints`, `distributed`, `devices`,
`signals`, `locks` and `cli` under it), and three commands:
`python -m mindiffusion.sample`, `python -m mindiffusion.fid` and
`python -m mindiffusion.bench`."""
