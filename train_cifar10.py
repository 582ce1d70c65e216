"""Train the notes' NaiveUnet DDPM on CIFAR-10 (notes, section 3.2).

    python train_cifar10.py                                  # the notes' run, on cuda:1
    python train_cifar10.py --fake-data 64 --epochs 1 --n-T 10   # a quick smoke run

Each epoch writes OUT/ddpm_sample_cifar{epoch}.png, 8 samples above 8 real images,
and the checkpoint OUT/ddpm_cifar.pth (OUT is --out, by default contents/).
"""
import os

import torch
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import CIFAR10, FakeData
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from mindiffusion import cli
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
    seed: int | None = None,
    num_workers: int = min(16, os.cpu_count() or 1),
    resume: bool = False,
    fake_data: int | None = None,
) -> None:
    if seed is not None:
        torch.manual_seed(seed)
    device = cli.resolve_device(device)

    ddpm = DDPM(eps_model=NaiveUnet(3, 3, n_feat=128), betas=(1e-4, 0.02), n_T=n_T)
    ddpm.to(device)
    optim = torch.optim.Adam(ddpm.parameters(), lr=lr)

    os.makedirs(out, exist_ok=True)
    checkpoint = os.path.join(out, "ddpm_cifar.pth")
    start_epoch = cli.resume_or_start(checkpoint, resume, ddpm, optim, n_epoch)

    # [0, 1] -> [-1, 1]
    tf = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
    )
    if fake_data:
        dataset = FakeData(fake_data, image_size=(3, 32, 32), transform=tf)
    else:
        with cli.explain_missing_dataset("CIFAR-10", data_root):
            dataset = CIFAR10(data_root, train=True, download=True, transform=tf)
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
            xh = ddpm.sample(8, (3, 32, 32), device)
            xset = torch.cat([xh, cli.real_images(x, dataset, 8)], dim=0)
            # value_range undoes the Normalize above: [-1, 1] -> [0, 1]
            grid = make_grid(xset, normalize=True, value_range=(-1, 1), nrow=4)
            save_image(grid, os.path.join(out, f"ddpm_sample_cifar{i}.png"))

            cli.save_checkpoint(checkpoint, ddpm, optim, epoch=i + 1)


if __name__ == "__main__":
    cli.main(train_cifar10, __doc__)
