"""Train a DDPM on MNIST with the notes' tiny CNN, DummyEpsModel (notes, section 2).

    python train_mnist.py                                  # the notes' run, on cuda:0
    python train_mnist.py --fake-data 64 --epochs 1 --n-T 10   # a quick smoke run

Each epoch writes a 4x4 grid of samples, OUT/ddpm_sample_{epoch}.png, and the
checkpoint OUT/ddpm_mnist.pth (OUT is --out, by default contents/).
"""
import os

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import MNIST, FakeData
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from mindiffusion import cli
from mindiffusion.ddpm import DDPM


# padding 3 keeps a 7x7 convolution at 28x28: no pooling, no skips, no UNet
blk = lambda ic, oc: nn.Sequential(
    nn.Conv2d(ic, oc, 7, padding=3),
    nn.BatchNorm2d(oc),
    nn.LeakyReLU(),
)


class DummyEpsModel(nn.Module):
    """A plain CNN noise predictor, just good enough for MNIST.

    It ignores the timestep t: it has to guess the noise level from x_t alone.
    """

    def __init__(self, n_channel: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            blk(n_channel, 64),
            blk(64, 128),
            blk(128, 256),
            blk(256, 512),
            blk(512, 256),
            blk(256, 128),
            blk(128, 64),
            nn.Conv2d(64, n_channel, 3, padding=1),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def train_mnist(
    n_epoch: int = 100,
    device: str = "cuda:0",
    batch_size: int = 128,
    lr: float = 2e-4,
    n_T: int = 1000,
    data_root: str = "./data",
    out: str = "contents",
    seed: int | None = None,
    num_workers: int = min(20, os.cpu_count() or 1),
    resume: bool = False,
    fake_data: int | None = None,
) -> None:
    if seed is not None:
        torch.manual_seed(seed)
    device = cli.resolve_device(device)

    ddpm = DDPM(eps_model=DummyEpsModel(1), betas=(1e-4, 0.02), n_T=n_T)
    ddpm.to(device)
    optim = torch.optim.Adam(ddpm.parameters(), lr=lr)

    os.makedirs(out, exist_ok=True)
    checkpoint = os.path.join(out, "ddpm_mnist.pth")
    start_epoch = cli.resume_or_start(checkpoint, resume, ddpm, optim, n_epoch)

    # [0, 1] -> [-0.5, 0.5]: centred, but not scaled to [-1, 1]
    tf = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.5,), (1.0,))]
    )
    if fake_data:
        dataset = FakeData(fake_data, image_size=(1, 28, 28), transform=tf)
    else:
        with cli.explain_missing_dataset("MNIST", data_root):
            dataset = MNIST(data_root, train=True, download=True, transform=tf)
    dataloader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers
    )

    for i in range(start_epoch, n_epoch):
        print(f"Epoch {i} : ")
        ddpm.train()

        pbar = tqdm(dataloader)
        loss_ema = None
        for x, _ in pbar:
            optim.zero_grad()
            x = x.to(device)
            loss = ddpm(x)
            loss.backward()
            # a running average, only to make the progress bar's loss readable
            if loss_ema is None:
                loss_ema = loss.item()
            else:
                loss_ema = 0.9 * loss_ema + 0.1 * loss.item()
            pbar.set_description(f"loss: {loss_ema:.4f}")
            optim.step()

        ddpm.eval()
        with torch.no_grad():
            xh = ddpm.sample(16, (1, 28, 28), device)
            # undo the Normalize above: [-0.5, 0.5] -> [0, 1]
            grid = make_grid(xh, normalize=True, value_range=(-0.5, 0.5), nrow=4)
            save_image(grid, os.path.join(out, f"ddpm_sample_{i}.png"))

            cli.save_checkpoint(checkpoint, ddpm, optim, epoch=i + 1)


if __name__ == "__main__":
    cli.main(train_mnist, __doc__)
