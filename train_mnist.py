"""Train a DDPM on MNIST with the notes' tiny CNN, DummyEpsModel (notes, section 2).

    python train_mnist.py                                  # the notes' run, on cuda:0
    python train_mnist.py --laptop                         # digits in minutes, on a CPU
    python train_mnist.py --cond                           # choose the digit to draw
    python train_mnist.py --fake-data 64 --epochs 1 --n-T 10   # a quick smoke run
    torchrun --nproc_per_node=4 train_mnist.py             # the same run on 4 GPUs

Each epoch writes a 4x4 grid of samples, OUT/ddpm_sample_{epoch}.png (with --cond,
a row of 4 for each digit, 0 to 9), and the checkpoint OUT/ddpm_mnist.pth (OUT is
--out, by default contents/).
"""
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import MNIST
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from mindiffusion.ddpm import DDPM
from mindiffusion.training import cli
from mindiffusion.training.data import FakeImages, explain_missing_dataset, mnist_root
from mindiffusion.training.run import Run
from mindiffusion.unet import NaiveUnet

# padding 3 keeps a 7x7 convolution at 28x28: no pooling, no skips, no UNet
blk = lambda ic, oc: nn.Sequential(
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


def other_ddpm(eps_model: str, n_feat: int, n_T: int, run: Run) -> DDPM:
    """--eps-model unet, the notes' NaiveUnet on digits padded to 32x32, or --cond,
    a noise model told the digit: the notes' lesson of swapping eps_model."""
    # --cond: the ten digits, 0 to 9, and the null class
    n_classes = 10 if run.cond else None
    unet = eps_model == "unet"
    model = NaiveUnet(1, 1, n_feat, n_classes) if unet else DummyEpsModel(1, n_classes)
    return DDPM(model, (1e-4, 0.02), n_T, n_classes=n_classes, p_uncond=run.p_uncond)


def train_mnist(
    n_epoch: int = 100,
    device: str = "cuda:0",
    batch_size: int = 128,
    lr: float = 2e-4,
    n_T: int = 1000,
    data_root: str = "./data",
    out: str = "contents",
    eps_model: str = "dummy",
    n_feat: int = 128,
    run: Run | None = None,
) -> None:
    # the run's feature flags (mindiffusion/training/run.py), each off by default
    run = run or Run()
    if eps_model == "dummy" and not run.cond:
        ddpm = DDPM(eps_model=DummyEpsModel(1), betas=(1e-4, 0.02), n_T=n_T)
    else:
        ddpm = other_ddpm(eps_model, n_feat, n_T, run)
    ddpm.to(device)

    # [0, 1] -> [-0.5, 0.5]: centred, but not scaled to [-1, 1]
    tf = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.5,), (1.0,))]
    )
    if eps_model == "unet":
        # 28x28 -> 32x32, with black borders, for NaiveUnet's three halvings
        tf.transforms.insert(0, transforms.Pad(2))
    if run.fake_data:
        dataset = FakeImages(run.fake_data, image_size=(1, 28, 28), transform=tf)
    else:
        with explain_missing_dataset("MNIST", data_root):
            dataset = MNIST(data_root, train=True, download=True, transform=tf)
    dataloader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
    optim = torch.optim.Adam(ddpm.parameters(), lr=lr)
    # ready for the run's flags, as Accelerate's prepare: the device, torchrun, the
    # precision, the data order and --resume change how the calls compute, not what
    ddpm, optim, dataloader = run.prepare(
        ddpm, optim, dataloader, n_epoch, f"{out}/ddpm_mnist.pth"
    )

    for i in range(n_epoch):
        # the epochs a resumed checkpoint has done
        if i < run.start_epoch:
            continue
        ddpm.train()

        pbar = tqdm(dataloader)
        loss_ema = None
        # c: the digits, which only a --cond model reads
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
            # ddim; 16 samples, or under --cond a row of 4 of each digit
            sampler, n_sample, c = run.sampler_for_grid(ddpm, 16)
            size = (1, 32, 32) if eps_model == "unet" else (1, 28, 28)
            with torch.no_grad():
                xh = sampler.sample(n_sample, size, device, c, run.guide_w)
                # undo the Normalize above: [-0.5, 0.5] -> [0, 1]
                xh = xh + 0.5
                grid = make_grid(xh, nrow=4)
                save_image(grid, f"{out}/ddpm_sample_{i}.png")
        # under torchrun, the ranks wait for the grid; a stop signal stops the run
        run.end_epoch(i)


# --laptop: a small NaiveUnet that draws digits in minutes on two CPU cores, or on
# a Mac's GPU: many small steps at a high learning rate, grids of 20 DDIM steps,
# and within epochs of the full MNIST a grid every 2 minutes (docs/performance.md
# says what each setting was measured to give); without MNIST in ./data, the
# 5,000 digits that ship in contents/mnist-subset
LAPTOP = dict(eps_model="unet", n_feat=16, batch_size=16, lr=3e-3, ema=0.995,
              amp="auto", channels_last=True, grid_sampler="ddim", grid_steps=20,
              grid_minutes=2.0, num_workers=0, data_root=mnist_root("./data"),
              device="mps" if torch.backends.mps.is_available() else "cpu")

if __name__ == "__main__":
    laptop = ("a small UNet, for a laptop's CPU or a Mac's GPU", LAPTOP)
    cli.main(train_mnist, __doc__, presets={"laptop": laptop})
