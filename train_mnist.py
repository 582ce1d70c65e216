"""The notes' DDPM on MNIST with their tiny CNN, DummyEpsModel (section 2), as the
notes write it: 100 epochs on cuda:0, each writing 16 samples, OUT/ddpm_sample_{i}.png,
and OUT/ddpm_mnist.pth. All else is the trainer's: python -m mindiffusion.train -h"""
import argparse
import inspect
import os
import sys

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import MNIST
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from mindiffusion.ddpm import DDPM

# padding 3 keeps a 7x7 convolution at 28x28: no pooling, no skips, no UNet
blk = lambda ic, oc: nn.Sequential(
    nn.Conv2d(ic, oc, 7, padding=3),
    nn.BatchNorm2d(oc),
    nn.LeakyReLU(),
)


class DummyEpsModel(nn.Module):
    """A plain CNN noise predictor: it ignores t, and guesses the noise level."""

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
) -> None:
    ddpm = DDPM(eps_model=DummyEpsModel(1), betas=(1e-4, 0.02), n_T=n_T)
    ddpm.to(device)
    # [0, 1] -> [-0.5, 0.5]: centred, but not scaled to [-1, 1]
    tf = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.5,), (1.0,))]
    )
    dataset = MNIST(data_root, train=True, download=True, transform=tf)
    dataloader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
    optim = torch.optim.Adam(ddpm.parameters(), lr=lr)

    for i in range(n_epoch):
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
            xh = xh + 0.5
            grid = make_grid(xh, nrow=4)
            save_image(grid, f"{out}/ddpm_sample_{i}.png")
            torch.save(ddpm.state_dict(), f"{out}/ddpm_mnist.pth")


def best_device(name: str) -> str:
    """name, or where this machine lacks it, the nearest device it has."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        fallback = "mps" if torch.backends.mps.is_available() else "cpu"
        print(f"CUDA is not available here: using {fallback} instead of {name}")
        return fallback
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        print(f"{name} does not exist here: using cuda:0 instead")
        return "cuda:0"
    return name


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    # the function's own parameters, n_epoch as --epochs, and --seed
    for name, param in inspect.signature(train_mnist).parameters.items():
        flag = "--epochs" if name == "n_epoch" else "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, default=param.default,
                            type=type(param.default), help="default: %(default)s")
    parser.add_argument("--seed", type=int, help="seed for torch's random numbers")
    args = vars(parser.parse_args())
    if (seed := args.pop("seed")) is not None:
        torch.manual_seed(seed)
    try:
        args["device"] = best_device(args["device"])
    except RuntimeError:
        parser.error(f"unknown device {args['device']!r}: use cpu, cuda, cuda:N or mps")
    os.makedirs(args["out"], exist_ok=True)
    try:
        MNIST(args["data_root"], train=True, download=True)
    except (OSError, RuntimeError) as err:
        reason = str(err).splitlines()[0]
        sys.exit(f"MNIST is not in {args['data_root']} and could not be downloaded "
                 f"({reason}): put it there, or pass --data-root DIR")
    train_mnist(**args)
