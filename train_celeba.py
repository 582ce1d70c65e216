"""Train the notes' NaiveUnet DDPM on CelebA faces at 128x128 (notes, section 3.1).

    python train_celeba.py --data-root DIR    # the notes' run, on cuda:1
    CELEBA_PATH=DIR python train_celeba.py    # the same, folder from the environment
    python train_celeba.py --fake-data 8 --epochs 1 --n-T 10   # a quick smoke run
    torchrun --nproc_per_node=4 train_celeba.py --data-root DIR   # on 4 GPUs

DIR is read by torchvision's ImageFolder, so the images sit one folder down:
DIR/<subfolder>/*.jpg (for CelebA, DIR/img_align_celeba/*.jpg).
Each epoch writes OUT/ddpm_sample_celeba{epoch:03d}.png, 8 samples above 8 real
faces (with --cond, a row of 4 samples for each of the first ten subfolders, in
sorted order, above them), and the checkpoint OUT/ddpm_celeba.pth (OUT is --out, by
default contents/). With --cond, each subfolder of DIR is a class.
"""
import os

import torch
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from mindiffusion.ddpm import DDPM
from mindiffusion.training import cli
from mindiffusion.training.data import (
    FakeImages,
    explain_image_folder,
    folder_classes,
    real_images,
)
from mindiffusion.training.run import Run
from mindiffusion.unet import NaiveUnet

# the image folder when --data-root is not given
CELEBA_PATH = os.environ.get("CELEBA_PATH")


def train_celeba(
    n_epoch: int = 100,
    device: str = "cuda:1",
    batch_size: int = 32,
    lr: float = 2e-5,
    n_T: int = 1000,
    data_root: str | None = CELEBA_PATH,
    out: str = "contents",
    run: Run | None = None,
) -> None:
    # the run's feature flags (mindiffusion/training/run.py), each off by default
    run = run or Run()
    # the notes' name for the image folder: --data-root, or else $CELEBA_PATH
    CELEBA_PATH = data_root
    if run.cond:
        # --cond: a class for each subfolder, and the null class
        n_classes = folder_classes(CELEBA_PATH, run.fake_data)
        eps_model = NaiveUnet(3, 3, n_feat=128, n_classes=n_classes)
        ddpm = DDPM(
            eps_model, (1e-4, 0.02), n_T, n_classes=n_classes, p_uncond=run.p_uncond
        )
    else:
        ddpm = DDPM(eps_model=NaiveUnet(3, 3, n_feat=128), betas=(1e-4, 0.02), n_T=n_T)
    ddpm.to(device)

    # NaiveUnet needs sides that are multiples of 32; [0, 1] -> [-1, 1]
    tf = transforms.Compose(
        [
            transforms.Resize((128, 128)),
            transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ]
    )
    if run.fake_data:
        # CelebA's aligned faces are 178 wide and 218 high
        dataset = FakeImages(run.fake_data, image_size=(3, 218, 178), transform=tf)
    else:
        with explain_image_folder(CELEBA_PATH):
            dataset = ImageFolder(root=CELEBA_PATH, transform=tf)
    dataloader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
    optim = torch.optim.Adam(ddpm.parameters(), lr=lr)
    # ready for the run's flags, as Accelerate's prepare: the device, torchrun, the
    # precision, the data order and --resume change how the calls compute, not what
    ddpm, optim, dataloader = run.prepare(
        ddpm, optim, dataloader, n_epoch, f"{out}/ddpm_celeba.pth"
    )

    for i in range(n_epoch):
        # the epochs a resumed checkpoint has done
        if i < run.start_epoch:
            continue
        ddpm.train()

        pbar = tqdm(dataloader)
        loss_ema = None
        # c: the subfolders, which only a --cond model reads
        for x, c in pbar:
            optim.zero_grad()
            x = x.to(device)
            loss = ddpm(x, c)
            loss.backward()
            # a running average, only to make the progress bar's loss readable
            if loss_ema is None:
                loss_ema = loss.item()
            else:
                loss_ema = 0.9 * loss_ema + 0.1 * loss.item()
            pbar.set_description(f"loss: {loss_ema:.4f}")
            # stop if the loss or a gradient is not finite; --grad-clip clips them
            run.check_gradients()
            optim.step()
            # --ema averages; --save-every saves; a stop signal saves and stops;
            # --grid-minutes draws a grid
            run.after_step()

        # the notes' torch.save(ddpm.state_dict(), ...), with all that --resume
        # needs, before the grid: a stop while it is drawn loses no training
        run.save(i + 1)
        # after every --grid-every epochs and the last; rank 0 alone under torchrun
        if run.grid_due(i):
            ddpm.eval()
            # the sampler: ddpm, or the --ema average, as DDIM under --grid-sampler
            # ddim; 8 samples, or under --cond a row of 4 of each subfolder
            sampler, n_sample, c = run.sampler_for_grid(ddpm, 8)
            with torch.no_grad():
                xh = sampler.sample(n_sample, (3, 128, 128), device, c, run.guide_w)
                # the last batch, topped up from the dataset where it is short of 8
                x = real_images(x, dataset, 8)
                xset = torch.cat([xh, x[:8]], dim=0)
                # value_range undoes the Normalize above: [-1, 1] -> [0, 1]
                grid = make_grid(xset, normalize=True, value_range=(-1, 1), nrow=4)
                save_image(grid, f"{out}/ddpm_sample_celeba{i:03d}.png")
        # under torchrun, the ranks wait for the grid; a stop signal stops the run
        run.end_epoch(i)


if __name__ == "__main__":
    cli.main(train_celeba, __doc__)
