"""Train the notes' NaiveUnet DDPM on CIFAR-10 (notes, section 3.2).

    python train_cifar10.py                                  # the notes' run, on cuda:1
    python train_cifar10.py --fake-data 64 --epochs 1 --n-T 10   # a quick smoke run
    python train_cifar10.py --cond --guide-w 3               # choose the class
    torchrun --nproc_per_node=4 train_cifar10.py             # the same run on 4 GPUs

Each epoch writes OUT/ddpm_sample_cifar{epoch}.png, 8 samples above 8 real images
(with --cond, a row of 4 samples for each class, airplane to truck, above them),
and the checkpoint OUT/ddpm_cifar.pth (OUT is --out, by default contents/).
"""
import torch
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import CIFAR10
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from mindiffusion.ddpm import DDPM
from mindiffusion.training import cli
from mindiffusion.training.data import FakeImages, explain_missing_dataset, real_images
from mindiffusion.training.run import Run
from mindiffusion.unet import NaiveUnet


def train_cifar10(
    n_epoch: int = 100,
    device: str = "cuda:1",
    batch_size: int = 512,
    lr: float = 1e-5,
    n_T: int = 1000,
    data_root: str = "./data",
    out: str = "contents",
    run: Run | None = None,
) -> None:
    # the run's feature flags (mindiffusion/training/run.py), each off by default
    run = run or Run()
    if run.cond:
        # --cond: the ten classes, airplane to truck, and the null class
        eps_model = NaiveUnet(3, 3, n_feat=128, n_classes=10)
        ddpm = DDPM(eps_model, (1e-4, 0.02), n_T, n_classes=10, p_uncond=run.p_uncond)
    else:
        ddpm = DDPM(eps_model=NaiveUnet(3, 3, n_feat=128), betas=(1e-4, 0.02), n_T=n_T)
    ddpm.to(device)

    # [0, 1] -> [-1, 1]
    tf = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
    )
    if run.fake_data:
        dataset = FakeImages(run.fake_data, image_size=(3, 32, 32), transform=tf)
    else:
        with explain_missing_dataset("CIFAR-10", data_root):
            dataset = CIFAR10(data_root, train=True, download=True, transform=tf)
    dataloader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
    optim = torch.optim.Adam(ddpm.parameters(), lr=lr)
    # ready for the run's flags, as Accelerate's prepare: the device, torchrun, the
    # precision, the data order and --resume change how the calls compute, not what
    ddpm, optim, dataloader = run.prepare(
        ddpm, optim, dataloader, n_epoch, f"{out}/ddpm_cifar.pth"
    )

    for i in range(n_epoch):
        # the epochs a resumed checkpoint has done
        if i < run.start_epoch:
            continue
        ddpm.train()

        pbar = tqdm(dataloader)
        loss_ema = None
        # c: the classes, which only a --cond model reads
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
            # ddim; 8 samples, or under --cond a row of 4 of each class
            sampler, n_sample, c = run.sampler_for_grid(ddpm, 8)
            with torch.no_grad():
                xh = sampler.sample(n_sample, (3, 32, 32), device, c, run.guide_w)
                # the last batch, topped up from the dataset where it is short of 8
                x = real_images(x, dataset, 8)
                xset = torch.cat([xh, x[:8]], dim=0)
                # value_range undoes the Normalize above: [-1, 1] -> [0, 1]
                grid = make_grid(xset, normalize=True, value_range=(-1, 1), nrow=4)
                save_image(grid, f"{out}/ddpm_sample_cifar{i}.png")
        # under torchrun, the ranks wait for the grid; a stop signal stops the run
        run.end_epoch(i)


if __name__ == "__main__":
    cli.main(train_cifar10, __doc__)
