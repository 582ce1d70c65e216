"""A minimal DDPM: the schedules and loss/sampling logic (`ddpm`), the notes' UNet
(`unet`), and the command-line plumbing shared by the three training scripts (`cli`)."""
