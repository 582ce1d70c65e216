"""The figures of a lesson on DDPM, as PNGs to drop into slides.

    python -m mindiffusion.figures                     # from the shipped MNIST model
    python -m mindiffusion.figures --data-root ./data  # noise real digits instead
    python -m mindiffusion.figures contents/ddpm_cifar.pth --data-root ./data

It writes into --out:
  forward_noising.png  x_t = sqrtab[t] x_0 + sqrtmab[t] eps at t = 0, 50, ..., 1000
  schedules.png        beta_t, alphabar_t, sqrtab and sqrtmab against t
  reverse_walk.png     a few samples of the checkpoint, x_t at chosen t, x_T to x_0
  reverse_walk.gif     a grid of 16 samples walking from x_T to x_0, t on each frame
  loss_per_t.png       the loss at each t beside the signal-to-noise ratio
  loss_curve.png       each epoch's mean loss, from the run's record (CSV)
The images noised are the dataset's first ones with --data-root, else samples of
the checkpoint. The same --seed on the same device gives the same figures, and an
existing file is never replaced: a new name gets _2, _3, ...
"""
import argparse
import csv
import math
import os

import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

# matplotlib's Figure draws to a file without pyplot, so without a screen
from matplotlib.figure import Figure

from mindiffusion.ddim import DDIM
from mindiffusion.ddpm import DDPM, ddpm_schedules
from mindiffusion.fid import reference_dataset
from mindiffusion.sample import GUIDE_W, free_path, load_ddpm
from mindiffusion.training import flags, progress
from mindiffusion.training.data import denormalize
from mindiffusion.training.devices import resolve_device
from mindiffusion.training.flags import UserError

# the timesteps of the two walks, as fractions of n_T: 0, 50, 100, ... at n_T 1000
WALK = (0, 0.05, 0.1, 0.25, 0.5, 0.75, 1)
# the images in each walk, and each figure's resolution
N_IMAGES, DPI = 6, 100
# the figures' sizes in inches: (width, height) = (1.4, 1.4) per image
CELL = 1.4
# the GIF: its images, a frame every n_T / GIF_FRAMES steps, each shown FRAME_MS
# milliseconds but the last, x_0, held HOLD_MS; LABEL pixels above the grid for t
GIF_IMAGES, GIF_FRAMES, FRAME_MS, HOLD_MS, LABEL = 16, 40, 80, 2000, 14
# the loss per timestep: at LOSS_TS timesteps, with DRAWS noises for each image
LOSS_TS, DRAWS = 40, 16


def timesteps(n_T: int) -> list[int]:
    """The walks' timesteps at this n_T: 0, 50, 100, 250, 500, 750, 1000 at 1000."""
    return sorted({round(f * n_T) for f in WALK})


def walk_steps(n_T: int, n: int, first: int = 0) -> list[int]:
    """n + 1 timesteps evenly spaced from `first` to n_T, fewer where n_T < n."""
    return sorted({max(first, round(n_T * k / n)) for k in range(n + 1)})


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


def gif_frame(x: torch.Tensor, t: int) -> Image.Image:
    """One frame of the GIF: the images x (N, C, H, W) in [0, 1] as a grid, with
    "t = ..." written above it."""
    grid = make_grid(x, nrow=math.ceil(math.sqrt(len(x))))
    # (C, H, W) in [0, 1] -> 8-bit (H, W, C), or (H, W) for one channel
    pixels = grid.mul(255).add(0.5).clamp(0, 255).byte().permute(1, 2, 0)
    image = Image.fromarray(pixels[..., 0].numpy() if x.shape[1] == 1 else
                            pixels.numpy())
    frame = Image.new(image.mode, (image.width, image.height + LABEL))
    frame.paste(image, (0, LABEL))
    ImageDraw.Draw(frame).text((2, 1), f"t = {t}", fill="white")
    return frame


def write_gif(states: torch.Tensor, ts: list[int], path: str) -> None:
    """The walk's states (T, N, C, H, W) in [0, 1], at the timesteps ts from x_T
    down to x_0, as a GIF that holds its last frame and loops."""
    frames = [gif_frame(x, t) for x, t in zip(states, ts)]
    durations = [FRAME_MS] * (len(frames) - 1) + [HOLD_MS]
    frames[0].save(path, save_all=True, append_images=frames[1:], loop=0,
                   duration=durations)


def loss_per_timestep(
    ddpm: DDPM, x0: torch.Tensor, c: torch.Tensor | None, ts: list[int], seed: int
) -> torch.Tensor:
    """The training loss ||eps - eps_theta(x_t, t)||^2 at each t in ts, (len(ts),):
    the mean over the images x0 (of classes c, with none hidden), DRAWS seeded
    noises each, and their pixels, as the criterion of Algorithm 1 takes it."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    # (N, ...) -> (DRAWS * N, ...): each image with DRAWS noises
    x0 = x0.repeat(DRAWS, *[1] * (x0.dim() - 1))
    c = None if c is None else c.repeat(DRAWS)
    losses = []
    for t in ts:
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
        x_t = ddpm.sqrtab[t] * x0 + ddpm.sqrtmab[t] * eps
        t_scaled = torch.full((len(x0),), t / ddpm.n_T, device=x0.device)
        losses.append(ddpm.criterion(eps, ddpm.guided_eps(x_t, t_scaled, c, 0.0)))
    return torch.stack(losses)


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


def plot_walk(
    images: torch.Tensor, ts: list[int], title: str, path: str,
    rows: list[str] | None = None,
) -> None:
    """A figure of images (T, N, C, H, W) in [0, 1]: a column for each of the T
    timesteps, a row for each of the N images, labelled `rows` where given."""
    n_t, n = images.shape[:2]
    fig = Figure(figsize=(CELL * n_t, CELL * n + 0.6), dpi=DPI, layout="constrained")
    axes = fig.subplots(n, n_t, squeeze=False)
    for j, t in enumerate(ts):
        axes[0][j].set_title(f"t = {t}")
        for k in range(n):
            # (C, H, W) -> (H, W, C), or (H, W) for one channel
            pixels = images[j, k].permute(1, 2, 0).squeeze(-1).cpu().numpy()
            axes[k][j].imshow(pixels, cmap="gray", vmin=0, vmax=1)
            # no ticks or frame, but room for the row's label
            axes[k][j].set_xticks([])
            axes[k][j].set_yticks([])
            axes[k][j].set_frame_on(False)
    for k, label in enumerate(rows or []):
        axes[k][0].set_ylabel(label, rotation=0, ha="right", va="center")
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


def plot_loss_per_t(
    ts: list[int], losses: torch.Tensor, alphabar: torch.Tensor, title: str, path: str
) -> None:
    """The loss at each t beside the signal-to-noise ratio of x_t, both log scale."""
    fig = Figure(figsize=(10, 4), dpi=DPI, layout="constrained")
    left, right = fig.subplots(1, 2)
    left.plot(ts, losses.cpu(), marker=".")
    left.set_ylabel(r"$\| \epsilon - \epsilon_\theta(x_t, t) \|^2$ (log scale)")
    left.set_title(title)
    # SNR(t) = \bar\alpha_t / (1 - \bar\alpha_t), from t = 1: infinite at t = 0
    t = torch.arange(1, len(alphabar))
    right.plot(t, alphabar[1:] / (1 - alphabar[1:]))
    right.set_ylabel("signal-to-noise ratio (log scale)")
    right.set_title(r"SNR of $x_t$: $\bar\alpha_t / (1 - \bar\alpha_t)$")
    for ax in (left, right):
        ax.set_yscale("log")
        ax.set_xlabel("t")
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
    # the rows' labels: MNIST's "3 - three" as 3
    names = [str(name).split(" - ")[0] for name in recipe.get("classes") or []]

    def labels(n: int) -> torch.Tensor | None:
        """Under --cond, n labels, the first classes in turn: (n,)."""
        return None if n_classes is None else torch.arange(n, device=device) % n_classes

    c = labels(N_IMAGES)
    guided = "" if n_classes is None else f", guided with w = {GUIDE_W}"
    written = []

    def write(plot, *data, name: str, **options) -> None:
        path = free_path(os.path.join(args.out, name))
        plot(*data, path, **options)
        written.append(path)

    if dataset is not None:
        # pixels in [0, 1] -> the model's inputs, as the script's Normalize made them
        pixels = torch.stack([dataset[k][0] for k in range(N_IMAGES)]).to(device)
        mean, std = (torch.tensor(v, device=device).view(-1, 1, 1) for v in normalize)
        x0, source = (pixels - mean) / std, "images of the dataset"
        if n_classes is not None:
            # the images' own labels, for their rows and their loss
            c = torch.tensor([dataset[k][1] for k in range(N_IMAGES)], device=device)
    else:
        print("no --data-root: noising samples of the checkpoint, drawn with DDIM")
        # eta 1, DDPM's posterior noise: a young model's deterministic (eta 0)
        # samples can stay static, and static would show no forward process
        ddim = DDIM.of(ddpm, min(50, ddpm.n_T), eta=1.0)
        with progress.timesteps(ddim, "samples to noise"):
            x0 = ddim.sample(N_IMAGES, size, device, c, GUIDE_W)
        source = f"samples of the model (DDIM, {ddim.n_steps} steps, eta 1{guided})"
    rows = None if c is None else [names[k] for k in c.tolist()]
    x_t, _ = forward_noising(x0, ddpm, ts, args.seed)
    write(plot_walk, denormalize(x_t, normalize), ts,
          f"forward process: {source}, noised to x_t", name="forward_noising.png",
          rows=rows)
    write(plot_schedules, schedule_curves(ddpm.betas, ddpm.n_T), name="schedules.png")
    # which noise levels are hard to predict: t = 1, n_T / LOSS_TS, ..., n_T
    loss_ts = walk_steps(ddpm.n_T, LOSS_TS, first=1)
    with torch.no_grad():
        per_t = loss_per_timestep(ddpm, x0, c, loss_ts, args.seed)
    write(plot_loss_per_t, loss_ts, per_t, ddpm.alphabar_t.cpu(),
          f"the loss at each t, on the {N_IMAGES} {source.split(' (')[0]}",
          name="loss_per_t.png")

    # one walk for both: the GIF's frames, and the figure's timesteps and images
    gif_ts = walk_steps(ddpm.n_T, GIF_FRAMES)[::-1]
    walk_ts = sorted(set(ts) | set(gif_ts), reverse=True)
    with torch.no_grad(), progress.timesteps(ddpm, "reverse walk"):
        walk = reverse_walk(ddpm, GIF_IMAGES, size, device, walk_ts, labels(GIF_IMAGES))
    walk = denormalize(walk, normalize)
    picked = [walk_ts.index(t) for t in sorted(ts, reverse=True)]
    walk_rows = None if c is None else [names[k] for k in labels(N_IMAGES).tolist()]
    write(plot_walk, walk[picked, :N_IMAGES], sorted(ts, reverse=True),
          f"reverse process: Algorithm 2 from x_T to x_0 in {ddpm.n_T} steps{guided}",
          name="reverse_walk.png", rows=walk_rows)
    write(write_gif, walk[[walk_ts.index(t) for t in gif_ts]], gif_ts,
          name="reverse_walk.gif")
    if losses is None:
        print(f"no loss curve: there is no record at {record} (give --record)")
    else:
        write(plot_loss, *losses, name="loss_curve.png")
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
