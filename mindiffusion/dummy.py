"""The notes' `DummyEpsModel` (section 2.2): the MNIST script's plain CNN noise model,
with an optional class input for the trainer's --cond.

train_mnist.py keeps the notes' own copy, as the notes do; this one is what the
trainer, `sample` and `bench` build. Without classes its submodules are the notes'
own, so a state_dict of either loads in the other.
"""
import torch
import torch.nn as nn


def blk(ic: int, oc: int) -> nn.Sequential:
    # padding 3 keeps a 7x7 convolution at 28x28: no pooling, no skips, no UNet
    return nn.Sequential(
        nn.Conv2d(ic, oc, 7, padding=3),
        nn.BatchNorm2d(oc),
        nn.LeakyReLU(),
    )


class DummyEpsModel(nn.Module):
    """A plain CNN noise predictor, just good enough for MNIST. It ignores the
    timestep t: it has to guess the noise level from x_t alone. With `n_classes`,
    each class and the null class (the last) has a learned 28x28 map, given to the
    first block as one more channel."""

    def __init__(self, n_channel: int, n_classes: int | None = None) -> None:
        super().__init__()
        self.n_channel = n_channel
        if n_classes is not None:
            self.classmap = nn.Embedding(n_classes + 1, 28 * 28)
        extra = 0 if n_classes is None else 1
        self.conv = nn.Sequential(
            blk(n_channel + extra, 64),
            blk(64, 128),
            blk(128, 256),
            blk(256, 512),
            blk(512, 256),
            blk(256, 128),
            blk(128, 64),
            nn.Conv2d(64, n_channel, 3, padding=1),
        )

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None = None
    ) -> torch.Tensor:
        if c is not None:
            # (B,) -> (B, 1, 28, 28): the class's map beside each image
            x = torch.cat([x, self.classmap(c).view(-1, 1, 28, 28)], 1)
        return self.conv(x)
