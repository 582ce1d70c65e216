"""Train the notes' NaiveUnet DDPM on CIFAR-10 (notes, section 3.2).

    python train_cifar10.py                                  # the notes' run, on cuda:1
    python train_cifar10.py --fake-data 64 --epochs 1 --n-T 10   # a quick smoke run
    python train_cifar10.py --cond --guide-w 3               # choose the class
    torchrun --nproc_per_node=4 train_cifar10.py             # the same run on 4 GPUs

Each epoch writes OUT/ddpm_sample_cifar{epoch}.png, 8 samples above 8 real images
(with --cond, a row of 4 samples for each class, airplane to truck, above them),
and the checkpoint OUT/ddpm_cifar.pth (OUT is --out, by default contents/).
"""
import os

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import CIFAR10, FakeData
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from mindiffusion import checkpoints, cli, conditioning, progress
from mindiffusion.ddpm import DDPM
from mindiffusion.duties import StepDuties, ignore_stop_signals
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
    amp: str | None = None,
    channels_last: bool = False,
    compile: bool = False,
    ema: float | None = None,
    save_every: int | None = 1000,
    grad_clip: float | None = None,
    grid_every: int = 1,
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

    # [0, 1] -> [-1, 1]
    tf = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
    )
    if fake_data:
        dataset = FakeData(fake_data, image_size=(3, 32, 32), transform=tf)
    else:
        with cli.explain_missing_dataset("CIFAR-10", data_root):
            dataset = CIFAR10(data_root, train=True, download=True, transform=tf)
    # --cond: the ten classes' labels, airplane to truck
    classes = conditioning.class_names(dataset) if cond else None
    n_classes = len(classes) if cond else None
    ddpm = DDPM(
        eps_model=NaiveUnet(3, 3, n_feat=128, n_classes=n_classes),
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
        dataset="CIFAR10",
        eps_model="NaiveUnet",
        eps_model_args=(3, 3, 128),
        betas=(1e-4, 0.02),
        n_T=n_T,
        image_size=(3, 32, 32),
        normalize=((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        # --cond: the classes, by label, and how often training hides the label
        n_classes=n_classes,
        classes=classes,
        p_uncond=p_uncond if cond else None,
    )

    cli.output_folder(out)
    path = os.path.join(out, "ddpm_cifar.pth")
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
                n_sample = 8 if c is None else len(c)
                xh = sampling_ddpm.sample(n_sample, (3, 32, 32), device, c, guide_w)
                xset = torch.cat([xh, cli.real_images(x, dataset, 8)], dim=0)
                # value_range undoes the Normalize above: [-1, 1] -> [0, 1]
                grid = make_grid(xset, normalize=True, value_range=(-1, 1), nrow=4)
                save_image(grid, os.path.join(out, f"ddpm_sample_cifar{i}.png"))

        checkpoint.save(i + 1)

    return ddpm


if __name__ == "__main__":
    cli.main(train_cifar10, __doc__)
