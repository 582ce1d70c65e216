"""A minimal DDPM: the schedules, loss and sampler (`ddpm`), the notes' UNet (`unet`),
the DDIM sampler (`ddim`), the plumbing shared by the three training scripts (`cli`),
their checkpoints (`checkpoints`) and the duties around each optimizer step
(`duties`), and two commands: `python -m mindiffusion.sample` and
`python -m mindiffusion.bench`."""
