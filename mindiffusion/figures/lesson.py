"""The lesson's figures of DDPM: the forward process, the schedules, Algorithm 2's
reverse walk as a figure and a GIF, the loss at each t and the loss over training;
each as arrays first, then drawn.
"""
import csv
import math

import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

# matplotlib's Figure draws to a file without pyplot, so without a screen
from matplotlib.figure import Figure

from mindiffusion.ddpm import DDPM, ddpm_schedules
from mindiffusion.sample import GUIDE_W
from mindiffusion.training import progress
from mindiffusion.training.flags import UserError

# the timesteps of the two walks, as fractions of n_T: 0, 50, 100, ... at n_T 1000
WALK = (0, 0.05, 0.1, 0.25, 0.5, 0.75, 1)
# the images in each walk, and each figure's resolution
N_IMAGES, DPI = 6, 100
# the figures' sizes in inches: (width, height) = (1.4, 1.4) per image
CELL = 1.4
# every plot and the GIF at least WIDTH pixels wide, for a projector
WIDTH = 512
# the GIF: its images, a frame every n_T / GIF_FRAMES steps, each shown FRAME_MS
# milliseconds but the last, x_0, held HOLD_MS; LABEL pixels above the grid for t
# (before the frame is enlarged to WIDTH)
GIF_IMAGES, GIF_FRAMES, FRAME_MS, HOLD_MS, LABEL = 16, 20, 160, 2000, 14
# the loss per timestep: at LOSS_TS timesteps, with DRAWS noises for each image
LOSS_TS, DRAWS = 40, 16
# the guidance sweep: its weights w, and its samples of one class at each
SWEEP_WEIGHTS, SWEEP_SAMPLES = (0.0, 0.5, 1.0, 2.0, 4.0), 8


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


def predicted_x0(
    ddpm: DDPM, states: torch.Tensor, ts: list[int], c: torch.Tensor | None
) -> torch.Tensor:
    """The model's guess of x_0 from each state x_t of a walk (T, n, C, H, W) at the
    timesteps ts, (x_t - sqrtmab eps) / sqrtab, with eps as Algorithm 2 takes it;
    at t = 0 the state itself."""
    guesses = []
    for x_t, t in zip(states, ts):
        if t == 0:
            guesses.append(x_t)
            continue
        # the same timestep for every image, scaled to (0, 1] as in training
        t_scaled = torch.full((len(x_t), 1), t / ddpm.n_T, device=x_t.device)
        eps = ddpm.guided_eps(x_t, t_scaled, c, GUIDE_W if c is not None else 0.0)
        guesses.append((x_t - ddpm.sqrtmab[t] * eps) / ddpm.sqrtab[t])
    return torch.stack(guesses)


def guidance_sweep(
    ddpm: DDPM, digit: int, weights: tuple[float, ...], n: int, size, device
) -> torch.Tensor:
    """n samples of class `digit` from the same x_T, drawn at each guidance weight
    of `weights` by `ddpm.walk` (a DDIM): (len(weights), n, C, H, W)."""
    x_T = torch.randn(n, *size, device=device)
    c = torch.full((n,), digit, device=device)
    return torch.stack([ddpm.walk(x_T, c, w) for w in weights])


def gif_frame(x: torch.Tensor, t: int) -> Image.Image:
    """One frame of the GIF: the images x (N, C, H, W) in [0, 1] as a grid, with
    "t = ..." written above it, enlarged by the least whole factor that makes it at
    least WIDTH pixels wide."""
    grid = make_grid(x, nrow=math.ceil(math.sqrt(len(x))))
    # (C, H, W) in [0, 1] -> 8-bit (H, W, C), or (H, W) for one channel
    pixels = grid.mul(255).add(0.5).clamp(0, 255).byte().permute(1, 2, 0)
    image = Image.fromarray(pixels[..., 0].numpy() if x.shape[1] == 1 else
                            pixels.numpy())
    frame = Image.new(image.mode, (image.width, image.height + LABEL))
    frame.paste(image, (0, LABEL))
    ImageDraw.Draw(frame).text((2, 1), f"t = {t}", fill="white")
    # each pixel becomes a square block of scale x scale: sharp, not a blur
    scale = math.ceil(WIDTH / frame.width)
    return frame.resize((frame.width * scale, frame.height * scale), Image.NEAREST)


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
        # a record that a spreadsheet saved may start with a byte-order mark
        with open(path, newline="", encoding="utf-8-sig") as file:
            rows = list(csv.DictReader(file))
        if not rows:
            raise ValueError("no rows")
        return [int(r["epoch"]) for r in rows], [float(r["loss"]) for r in rows]
    except (OSError, KeyError, ValueError, TypeError, csv.Error):
        raise UserError(
            f"{path} is not a run's record: give --record the _log.csv that a "
            f"trainer wrote beside its checkpoint"
        ) from None


def plot_walk(
    images: torch.Tensor, ts: list[int], title: str, path: str,
    rows: list[str] | None = None,
) -> None:
    """A figure of images (T, N, C, H, W) in [0, 1]: a column for each of the T
    timesteps, a row for each of the N images, labelled `rows` where given."""
    plot_grid(images, [f"t = {t}" for t in ts], title, path, rows)


def plot_grid(
    images: torch.Tensor, columns: list[str], title: str, path: str,
    rows: list[str] | None = None, captions: list[list[str]] | None = None,
) -> None:
    """A figure of images (T, N, C, H, W) in [0, 1]: T columns titled `columns`,
    a row for each of the N images, labelled `rows` where given, and under image
    (j, k) the text captions[j][k] where given."""
    n_t, n = images.shape[:2]
    width = max(CELL * n_t, WIDTH / DPI)
    fig = Figure(figsize=(width, CELL * n + 0.6), dpi=DPI, layout="constrained")
    axes = fig.subplots(n, n_t, squeeze=False)
    for j, column in enumerate(columns):
        axes[0][j].set_title(column)
        for k in range(n):
            # (C, H, W) -> (H, W, C), or (H, W) for one channel
            pixels = images[j, k].permute(1, 2, 0).squeeze(-1).cpu().numpy()
            # each pixel a sharp block on the projector, not a blur
            axes[k][j].imshow(pixels, cmap="gray", vmin=0, vmax=1,
                              interpolation="nearest")
            # no ticks or frame, but room for the row's label and the caption
            axes[k][j].set_xticks([])
            axes[k][j].set_yticks([])
            axes[k][j].set_frame_on(False)
            if captions is not None:
                axes[k][j].set_xlabel(captions[j][k])
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
    left.set_ylabel(
        r"per-pixel mean of $(\epsilon - \epsilon_\theta(x_t, t))^2$ (log scale)"
    )
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
    ax.set_title(
        r"per-pixel mean of $(\epsilon - \epsilon_\theta(x_t, t))^2$ over training"
    )
    fig.savefig(path)
