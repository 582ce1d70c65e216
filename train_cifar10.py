"""The notes' NaiveUnet DDPM on CIFAR-10 (section 3.2), as the notes write it:
`python train_cifar10.py` trains 100 epochs on cuda:1. Each epoch writes 8 samples
above 8 real images, OUT/ddpm_sample_cifar{epoch}.png, and the weights,
OUT/ddpm_cifar.pth. Every other feature is the trainer's:
python -m mindiffusion.train cifar10 --help.
"""
import argparse
import inspect
import os
import sys

import torch
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import CIFAR10
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from mindiffusion.ddpm import DDPM
from mindiffusion.unet import NaiveUnet


def train_cifar10(
    n_epoch: int = 100,
    device: str = "cuda:1",
    batch_size: int = 512,
    lr: float = 1e-5,
    n_T: int = 1000,
    data_root: str = "./data",
    out: str = "contents",
) -> None:
    ddpm = DDPM(eps_model=NaiveUnet(3, 3, n_feat=128), betas=(1e-4, 0.02), n_T=n_T)
    ddpm.to(device)

    # [0, 1] -> [-1, 1]
    tf = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
    )
    dataset = CIFAR10(data_root, train=True, download=True, transform=tf)
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
            xh = ddpm.sample(8, (3, 32, 32), device)
            xset = torch.cat([xh, x[:8]], dim=0)
            # value_range undoes the Normalize above: [-1, 1] -> [0, 1]
            grid = make_grid(xset, normalize=True, value_range=(-1, 1), nrow=4)
            save_image(grid, f"{out}/ddpm_sample_cifar{i}.png")
            torch.save(ddpm.state_dict(), f"{out}/ddpm_cifar.pth")


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
    for name, param in inspect.signature(train_cifar10).parameters.items():
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
        CIFAR10(args["data_root"], train=True, download=True)
    except (OSError, RuntimeError) as err:
        reason = str(err).splitlines()[0]
        sys.exit(f"CIFAR-10 is not in {args['data_root']} and could not be downloaded "
                 f"({reason}): put it there, or pass --data-root DIR")
    train_cifar10(**args)
