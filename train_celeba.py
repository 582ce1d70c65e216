"""The notes' NaiveUnet DDPM on CelebA at 128x128 (section 3.1), as the notes write
it: `python train_celeba.py --data-root DIR` (or CELEBA_PATH set in the environment),
the images in DIR/<subfolder>/*.jpg, trains 100 epochs on cuda:1. Each epoch writes
8 samples above 8 real faces, OUT/ddpm_sample_celeba{epoch:03d}.png, and
OUT/ddpm_celeba.pth. The rest is the trainer's: python -m mindiffusion.train -h"""
import argparse
import inspect
import os
import sys

import torch
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from mindiffusion.ddpm import DDPM
from mindiffusion.unet import NaiveUnet

CELEBA_PATH = os.environ.get("CELEBA_PATH")


def train_celeba(
    n_epoch: int = 100,
    device: str = "cuda:1",
    batch_size: int = 32,
    lr: float = 2e-5,
    n_T: int = 1000,
    data_root: str | None = CELEBA_PATH,
    out: str = "contents",
) -> None:
    # the notes' name for the image folder, --data-root
    CELEBA_PATH = data_root
    ddpm = DDPM(eps_model=NaiveUnet(3, 3, n_feat=128), betas=(1e-4, 0.02), n_T=n_T)
    ddpm.to(device)
    # NaiveUnet needs sides that are multiples of 32; [0, 1] -> [-1, 1]
    tf = transforms.Compose(
        [transforms.Resize((128, 128)), transforms.ToTensor(),
         transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
    )
    dataset = ImageFolder(root=CELEBA_PATH, transform=tf)
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
            xh = ddpm.sample(8, (3, 128, 128), device)
            xset = torch.cat([xh, x[:8]], dim=0)
            # value_range undoes the Normalize above: [-1, 1] -> [0, 1]
            grid = make_grid(xset, normalize=True, value_range=(-1, 1), nrow=4)
            save_image(grid, f"{out}/ddpm_sample_celeba{i:03d}.png")
            torch.save(ddpm.state_dict(), f"{out}/ddpm_celeba.pth")


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
    for name, param in inspect.signature(train_celeba).parameters.items():
        flag = "--epochs" if name == "n_epoch" else "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, default=param.default,
                            type=str if name == "data_root" else type(param.default),
                            help="default: %(default)s")
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
        ImageFolder(args["data_root"] or "")
    except (FileNotFoundError, NotADirectoryError):
        root = args["data_root"] or "no folder (no --data-root, no CELEBA_PATH)"
        sys.exit(f"no images in {root}: pass --data-root DIR, DIR/<subfolder>/*.jpg")
    train_celeba(**args)
