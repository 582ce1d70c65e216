"""The figures of a lesson on DDPM, as PNGs to drop into slides.

    python -m mindiffusion.figures                     # from the shipped MNIST model
    python -m mindiffusion.figures --data-root ./data  # noise real digits instead
    python -m mindiffusion.figures contents/ddpm_cifar.pth --data-root ./data

It writes into --out:
  forward_noising.png  x_t = sqrtab[t] x_0 + sqrtmab[t] eps at t = 0, 50, ..., 1000
  schedules.png        beta_t, alphabar_t, sqrtab and sqrtmab against t
  reverse_walk.png     a few samples of the checkpoint, x_t at chosen t, x_T to x_0
  loss_curve.png       each epoch's mean loss, from the run's record (CSV)
The images noised are the dataset's first ones with --data-root, else samples of
the checkpoint. The same --seed on the same device gives the same figures, and an
existing file is never replaced: a new name gets _2, _3, ...
"""
import argparse
import csv
import os

import torch

# matplotlib's Figure draws to a file without pyplot, so without a screen
from matplotlib.figure import Figure

from mindiffusion.ddim import DDIM
from mindiffusion.ddpm import DDPM, ddpm_schedules
from mindiffusion.fid import reference_dataset
from mindiffusion.sample import GUIDE_W, free_path, load_ddpm
from mindiffusion.training import flags, progress
from mindiffusion.training.data import denormalize
from mindiffusion.training.devices import resolve_device
from mindiffusion.training.errors import UserError

# the timesteps of the two walks, as fractions of n_T: 0, 50, 100, ... at n_T 1000
WALK = (0, 0.05, 0.1, 0.25, 0.5, 0.75, 1)
# the images in each walk, and each figure's resolution
N_IMAGES, DPI = 6, 100
# the figures' sizes in inches: (width, height) = (1.4, 1.4) per image
CELL = 1.4


def timesteps(n_T: int) -> list[int]:
    """The walks' timesteps at this n_T: 0, 50, 100, 250, 500, 750, 1000 at 1000."""
    return sorted({round(f * n_T) for f in WALK})


def forward_noising(
    x0: torch.Tensor, ddpm: DDPM, ts: list[int], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t for each t in ts, from the images x0 and one seeded noise eps per image:
    (N, C, H, W) -> (len(ts), N, C, H, W); and that eps."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    # x_t = \sqrt{\bar{\alpha}_t} x_0 + \sqrt{1 - \bar{\alpha}_t} eps, the DDPM loss's
    x_t = [ddpm.sqrtab[t] * x0 + ddpm.sqrtmab[t] * eps for t in ts]
    return torch.stack(x_t), eps


def schedule_curves(betas: tuple[float, float], n_T: int) -> dict[str, torch.Tensor]:
    """The four curves of the schedules figure, each indexed by t = 0..n_T."""
    schedules = ddpm_schedules(betas[0], betas[1], n_T)
    return {
        # \beta_t = 1 - \alpha_t
        "beta_t": 1 - schedules["alpha_t"],
        "alphabar_t": schedules["alphabar_t"],
        "sqrtab": schedules["sqrtab"],
        "sqrtmab": schedules["sqrtmab"],
    }


def reverse_walk(
    ddpm: DDPM, n: int, size, device, ts: list[int], c: torch.Tensor | None
) -> torch.Tensor:
    """Algorithm 2's states x_t at each t in ts, from x_T to x_0, for n samples:
    (len(ts), n, C, H, W), the largest t first."""
    # the model's input at call k is x_i for i = n_T - k; x_0 is the walk's result
    calls = [ddpm.n_T - t for t in ts if t > 0]
    with progress.model_inputs(ddpm, calls, n) as inputs_at:
        x_0 = ddpm.sample(n, size, device, c, GUIDE_W)
    states = {ddpm.n_T - k: x_t for k, x_t in inputs_at.items()}
    states[0] = x_0
    return torch.stack([states[t] for t in sorted(ts, reverse=True)])


def loss_curve(path: str) -> tuple[list[int], list[float]]:
    """The epochs and their mean losses from a run's record."""
    try:
        with open(path, newline="") as file:
            rows = list(csv.DictReader(file))
        if not rows:
            raise ValueError("no rows")
        return [int(r["epoch"]) for r in rows], [float(r["loss"]) for r in rows]
    except (OSError, KeyError, ValueError, TypeError, csv.Error):
        raise UserError(
            f"--record {path} is not a run's record: give the _log.csv that a "
            f"training script wrote beside its checkpoint"
        ) from None


def plot_walk(images: torch.Tensor, ts: list[int], title: str, path: str) -> None:
    """A figure of images (T, N, C, H, W) in [0, 1]: a column for each of the T
    timesteps, a row for each of the N images."""
    n_t, n = images.shape[:2]
    fig = Figure(figsize=(CELL * n_t, CELL * n + 0.6), dpi=DPI)
    axes = fig.subplots(n, n_t, squeeze=False)
    for j, t in enumerate(ts):
        axes[0][j].set_title(f"t = {t}")
        for k in range(n):
            # (C, H, W) -> (H, W, C), or (H, W) for one channel
            pixels = images[j, k].permute(1, 2, 0).squeeze(-1).cpu().numpy()
            axes[k][j].imshow(pixels, cmap="gray", vmin=0, vmax=1)
            axes[k][j].axis("off")
    fig.suptitle(title)
    fig.savefig(path)


def plot_schedules(curves: dict[str, torch.Tensor], path: str) -> None:
    fig = Figure(figsize=(10, 4), dpi=DPI, layout="constrained")
    left, right = fig.subplots(1, 2)
    t = torch.arange(len(curves["beta_t"]))
    left.plot(t, curves["beta_t"], label=r"$\beta_t$")
    left.set_title(r"the noise added at each step, $\beta_t$")
    for name, label in (("alphabar_t", r"$\bar\alpha_t$"),
                        ("sqrtab", r"sqrtab $= \sqrt{\bar\alpha_t}$"),
                        ("sqrtmab", r"sqrtmab $= \sqrt{1-\bar\alpha_t}$")):
        right.plot(t, curves[name], label=label)
    right.set_title(r"$x_t = $ sqrtab $x_0$ + sqrtmab $\epsilon$")
    for ax in (left, right):
        ax.set_xlabel("t")
        ax.legend()
    fig.savefig(path)


def plot_loss(epochs: list[int], losses: list[float], path: str) -> None:
    fig = Figure(figsize=(6, 4), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.plot(epochs, losses, marker=".")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean training loss (log scale)")
    ax.set_title(r"$\| \epsilon - \epsilon_\theta(x_t, t) \|^2$ over training")
    fig.savefig(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="python -m mindiffusion.figures",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("checkpoint", nargs="?", default="contents/mnist_laptop_cond.pth",
        help="a checkpoint of a training script, or an export (default: "
        "%(default)s)")
    add("--data-root", metavar="DIR",
        help="the checkpoint's dataset folder, for real images to noise (default: "
        "the checkpoint's own samples)")
    add("--record", metavar="CSV",
        help="the run's record for the loss curve (default: CHECKPOINT_log.csv "
        "beside the checkpoint, where there is one)")
    add("--out", default="contents/figures", metavar="DIR",
        help="folder for the PNGs (default: %(default)s)")
    add("--seed", type=flags.seed, default=0, metavar="N",
        help="seed of the noise and the samples (default: %(default)s)")
    add("--device", default="cuda", metavar="NAME",
        help="cpu, cuda, cuda:N or mps; falls back as the training scripts do "
        "(default: %(default)s)")
    args = parser.parse_args(argv)
    record = args.record or os.path.splitext(args.checkpoint)[0] + "_log.csv"
    try:
        device = resolve_device(args.device)
        ddpm, recipe = load_ddpm(args.checkpoint, "ddpm", None, 0.0, True)
        if args.record and not os.path.exists(record):
            raise UserError(f"--record {record} does not exist")
        losses = loss_curve(record) if os.path.exists(record) else None
        dataset = None
        if args.data_root:
            dataset, _ = reference_dataset(
                recipe, args.data_root, None,
                instead="leave --data-root out to noise the model's own samples",
            )
        os.makedirs(args.out, exist_ok=True)
        # before the sampling, which takes minutes on a CPU
        if not os.access(args.out, os.W_OK):
            raise UserError(f"--out {args.out} is not writable: choose another --out")
    except UserError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except OSError as err:
        parser.exit(2, f"{parser.prog}: error: --out {args.out} ({err.strerror})\n")

    ddpm.to(device).eval()
    torch.manual_seed(args.seed)
    size, normalize = recipe["image_size"], recipe["normalize"]
    ts = timesteps(ddpm.n_T)
    n_classes = recipe.get("n_classes")
    # under --cond, one image of each of the first classes
    c = None if n_classes is None else torch.arange(N_IMAGES, device=device) % n_classes
    written = []

    def write(plot, *data, name: str) -> None:
        path = free_path(os.path.join(args.out, name))
        plot(*data, path)
        written.append(path)

    if dataset is not None:
        # pixels in [0, 1] -> the model's inputs, as the script's Normalize made them
        pixels = torch.stack([dataset[k][0] for k in range(N_IMAGES)]).to(device)
        mean, std = (torch.tensor(v, device=device).view(-1, 1, 1) for v in normalize)
        x0, source = (pixels - mean) / std, "images of the dataset"
    else:
        print("no --data-root: noising samples of the checkpoint, drawn with DDIM")
        # eta 1, DDPM's posterior noise: a young model's deterministic (eta 0)
        # samples can stay static, and static would show no forward process
        ddim = DDIM.of(ddpm, min(50, ddpm.n_T), eta=1.0)
        with progress.timesteps(ddim, "samples to noise"):
            x0 = ddim.sample(N_IMAGES, size, device, c, GUIDE_W)
        source = "samples of the model"
    x_t, _ = forward_noising(x0, ddpm, ts, args.seed)
    write(plot_walk, denormalize(x_t, normalize), ts,
          f"forward process: {source}, noised to x_t", name="forward_noising.png")
    write(plot_schedules, schedule_curves(ddpm.betas, ddpm.n_T),
          name="schedules.png")
    with torch.no_grad(), progress.timesteps(ddpm, "reverse walk"):
        walk = reverse_walk(ddpm, N_IMAGES, size, device, ts, c)
    write(plot_walk, denormalize(walk, normalize), sorted(ts, reverse=True),
          "reverse process: Algorithm 2 from x_T to x_0", name="reverse_walk.png")
    if losses is None:
        print(f"no loss curve: there is no record at {record} (give --record)")
    else:
        write(plot_loss, *losses, name="loss_curve.png")
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
