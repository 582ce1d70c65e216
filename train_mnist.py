"""Train a DDPM on MNIST with the notes' tiny CNN, DummyEpsModel (notes, section 2).

    python train_mnist.py                                  # the notes' run, on cuda:0
    python train_mnist.py --laptop --epochs 4              # a small UNet, on a CPU
    python train_mnist.py --cond                           # choose the digit to draw
    python train_mnist.py --fake-data 64 --epochs 1 --n-T 10   # a quick smoke run
    torchrun --nproc_per_node=4 train_mnist.py             # the same run on 4 GPUs

Each epoch writes a 4x4 grid of samples, OUT/ddpm_sample_{epoch}.png (with --cond,
a row of 4 for each digit, 0 to 9), and the checkpoint OUT/ddpm_mnist.pth (OUT is
--out, by default contents/).
"""
import os

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import MNIST, FakeData
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from mindiffusion import checkpoints, cli, conditioning, progress
from mindiffusion.ddpm import DDPM
from mindiffusion.duties import StepDuties, ignore_stop_signals
from mindiffusion.unet import NaiveUnet


# padding 3 keeps a 7x7 convolution at 28x28: no pooling, no skips, no UNet
blk = lambda ic, oc: nn.Sequential(
    nn.Conv2d(ic, oc, 7, padding=3),
    nn.BatchNorm2d(oc),
    nn.LeakyReLU(),
)


class DummyEpsModel(nn.Module):
    """A plain CNN noise predictor, just good enough for MNIST.

    It ignores the timestep t: it has to guess the noise level from x_t alone. With
    `n_classes` (classifier-free guidance), each class and the null class (the
    last) has a learned 28x28 map, given to the first block as one more channel.
    """

    def __init__(self, n_channel: int, n_classes: int | None = None) -> None:
        super().__init__()
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
    amp: str | None = None,
    channels_last: bool = False,
    compile: bool = False,
    ema: float | None = None,
    save_every: int | None = 1000,
    grad_clip: float | None = None,
    grid_every: int = 1,
    eps_model: str = "dummy",
    n_feat: int | None = None,
    cond: bool = False,
    p_uncond: float = 0.1,
    guide_w: float = 2.0,
) -> DDPM:
    # under torchrun, one process per device; a plain run is rank 0 of 1
    device, rank, world_size = cli.init_processes(device)
    if seed is not None:
        # each rank its own noise; DDP starts every rank from rank 0's weights
        torch.manual_seed(seed + rank)
    # --amp: the dtype of the training forward pass, or None for float32
    amp_dtype = cli.autocast_dtype(amp, device)
    # float16 needs its loss scaled, so that small gradients do not round to zero
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    # --eps-model unet: the notes' lesson of swapping the architecture, with their
    # NaiveUnet of width --n-feat on digits padded to 32x32, as it needs
    unet = eps_model == "unet"
    if n_feat is not None and not unet:
        raise cli.UserError("--n-feat is NaiveUnet's width: add --eps-model unet")
    n_feat = 128 if n_feat is None else n_feat
    if unet and n_feat % 8:
        raise cli.UserError(
            f"--n-feat {n_feat}: NaiveUnet's GroupNorm(8, ...) needs a multiple of 8"
        )
    side = 32 if unet else 28
    # [0, 1] -> [-0.5, 0.5]: centred, but not scaled to [-1, 1]
    tf = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.5,), (1.0,))]
    )
    if unet:
        # 28x28 -> 32x32, with black borders
        tf.transforms.insert(0, transforms.Pad(2))
    if fake_data:
        dataset = FakeData(fake_data, image_size=(1, 28, 28), transform=tf)
    else:
        with cli.explain_missing_dataset("MNIST", data_root):
            dataset = MNIST(data_root, train=True, download=True, transform=tf)
    # --cond: the digits' labels become classes the model is told, 0 to 9
    classes = conditioning.class_names(dataset) if cond else None
    n_classes = len(classes) if cond else None
    model = NaiveUnet(1, 1, n_feat, n_classes) if unet else DummyEpsModel(1, n_classes)
    ddpm = DDPM(
        eps_model=model,
        betas=(1e-4, 0.02),
        n_T=n_T,
        n_classes=n_classes,
        p_uncond=p_uncond,
    )
    ddpm.to(device, memory_format=memory_format)
    # --ema: a copy whose weights follow an exponential moving average of ddpm's,
    # e <- ema * e + (1 - ema) * w after each step; BatchNorm statistics included
    ema_ddpm = None
    if ema is not None:
        ema_avg = get_ema_multi_avg_fn(ema)
        ema_ddpm = AveragedModel(ddpm, multi_avg_fn=ema_avg, use_buffers=True)
    if compile:
        # compiled in place, so that the state_dict keeps the notes' names
        ddpm.eps_model.compile()
    optim = torch.optim.Adam(ddpm.parameters(), lr=lr)
    # what python -m mindiffusion.sample needs to rebuild this DDPM from a checkpoint,
    # and mindiffusion.fid to read the training set again
    recipe = dict(
        dataset="MNIST",
        eps_model="NaiveUnet" if unet else "DummyEpsModel",
        eps_model_args=(1, 1, n_feat) if unet else (1,),
        betas=(1e-4, 0.02),
        n_T=n_T,
        image_size=(1, side, side),
        normalize=((0.5,), (1.0,)),
        # --cond: the classes, by label, and how often training hides the label
        n_classes=n_classes,
        classes=classes,
        p_uncond=p_uncond if cond else None,
    )

    cli.output_folder(out)
    path = os.path.join(out, "ddpm_mnist.pth")
    checkpoint = checkpoints.Checkpoint(path, ddpm, optim, recipe, ema_ddpm, scaler)
    start = checkpoint.resume_or_start(resume, n_epoch, seed, lr)
    # under torchrun, DistributedDataParallel: it averages the gradients of all ranks
    # in backward; a plain run trains ddpm itself
    parallel_ddpm = cli.distribute(ddpm, device)

    # --batch-size is the global batch, shared out among the ranks
    rank_batch = cli.split_batch(batch_size, world_size)
    # each epoch's shuffle depends on the run's seed and the epoch alone, so --resume
    # sees the order a straight run sees, from the batch it stopped at; under
    # torchrun, each rank reads its part
    sampler = checkpoints.ResumableSampler(dataset, world_size, rank, rank_batch, start)
    on_cuda = device.type == "cuda"
    dataloader = DataLoader(
        dataset,
        batch_size=rank_batch,
        sampler=sampler,
        num_workers=num_workers,
        # the workers' seeds come from a generator of their own, so that starting
        # workers never draws from the one that makes the training noise
        generator=torch.Generator(),
        # the workers leave SIGTERM, SIGINT and SIGUSR1 to this process, which saves
        # before it stops
        worker_init_fn=ignore_stop_signals,
        # page-locked batches copy to the GPU while it computes, and the workers
        # start once rather than at every epoch
        pin_memory=on_cuda,
        persistent_workers=on_cuda and num_workers > 0,
    )
    # the checks and saves around each optimizer step
    duties = StepDuties(checkpoint, start, dataloader, save_every, grad_clip)

    for i in range(start.epoch, n_epoch):
        cli.say(f"Epoch {i} : ")
        # a new shuffle at each epoch, the same one on every rank
        sampler.set_epoch(i)
        ddpm.train()

        pbar = tqdm(dataloader, disable=rank > 0)
        loss_ema = None
        for x, c in pbar:
            optim.zero_grad()
            x = x.to(device, memory_format=memory_format, non_blocking=True)
            # the labels, with --cond; the notes' unconditional DDPM takes none
            c = c.to(device, non_blocking=True) if cond else None
            with torch.autocast(device.type, amp_dtype, enabled=bool(amp_dtype)):
                loss = parallel_ddpm(x, c)
            loss.backward()
            # a running average, only to make the progress bar's loss readable
            if loss_ema is None:
                loss_ema = loss.item()
            else:
                loss_ema = 0.9 * loss_ema + 0.1 * loss.item()
            pbar.set_description(f"loss: {loss_ema:.4f}")
            duties.before_step(i, loss)
            optim.step()
            if ema_ddpm is not None:
                ema_ddpm.update_parameters(ddpm)
            duties.after_step()

        # rank 0 alone draws the grid, after every --grid-every epochs and the last;
        # the other ranks wait for it in the save
        if rank == 0 and ((i + 1) % grid_every == 0 or i + 1 == n_epoch):
            ddpm.eval()
            # with --ema, the grid shows what the averaged weights draw
            sampling_ddpm = ddpm if ema_ddpm is None else ema_ddpm.module.eval()
            # a bar over the timesteps: a 1000-step grid takes minutes, on a CPU hours
            with torch.no_grad(), progress.timesteps(sampling_ddpm, "grid"):
                # --cond: 4 of each class, a row each, guided with weight --guide-w
                c = conditioning.grid_classes(n_classes, 4, device) if cond else None
                n_sample = 16 if c is None else len(c)
                xh = sampling_ddpm.sample(n_sample, (1, side, side), device, c, guide_w)
                # undo the Normalize above: [-0.5, 0.5] -> [0, 1]
                grid = make_grid(xh, normalize=True, value_range=(-0.5, 0.5), nrow=4)
                save_image(grid, os.path.join(out, f"ddpm_sample_{i}.png"))

        checkpoint.save(i + 1)

    return ddpm


# --laptop: a small NaiveUnet that draws digits after about half an hour on two CPU
# cores (README, "Watch it learn on a CPU")
LAPTOP = dict(
    eps_model="unet",
    n_feat=24,
    batch_size=64,
    lr=1e-3,
    ema=0.995,
    amp="auto",
    device="cpu",
    num_workers=0,
)

if __name__ == "__main__":
    laptop = ("a small UNet, for a CPU", LAPTOP)
    cli.main(train_mnist, __doc__, presets={"laptop": laptop})
