"""A minimal DDPM: the schedules, loss and sampler (`ddpm`), the notes' UNet (`unet`),
the DDIM sampler (`ddim`), the plumbing shared by the three training scripts (`cli`),
and two commands: `python -m mindiffusion.sample` and `python -m mindiffusion.bench`."""
