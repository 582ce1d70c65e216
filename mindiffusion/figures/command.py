"""The figures of a lesson on DDPM, as PNGs to drop into slides.

    python -m mindiffusion.figures                     # from the shipped MNIST model
    python -m mindiffusion.figures --data-root ./data  # noise real digits instead
    python -m mindiffusion.figures contents/ddpm_cifar.pth --data-root ./data

It writes into --out:
  forward_noising.png  x_t = sqrtab[t] x_0 + sqrtmab[t] eps at t = 0, 50, ..., 1000
  schedules.png        beta_t, alphabar_t, sqrtab and sqrtmab against t
  reverse_walk.png     a few samples of the checkpoint, x_t at chosen t, x_T to x_0
  reverse_walk.gif     a grid of 16 samples walking from x_T to x_0, t on each frame
  walk_and_x0.png      that walk's x_t, and under each the model's x_0 from it
  loss_per_t.png       the loss at each t beside the signal-to-noise ratio
  loss_curve.png       each epoch's mean loss, from the run's record (CSV)
  guidance_sweep.png   for a --cond model, its first class at w = 0, 0.5, 1, 2, 4,
                       each row with the share the digit judge reads as asked
and three that only DDIM's deterministic walk (eta 0, 20 steps) draws:
  interpolation.png    x_T moved along the great circle between two draws
  consistency.png      the same x_T walked in 10, 20, 50 and 100 steps
  inversion.png        images walked up to their x_T, and back down
For an MNIST model, the digit judge reads each image of those three. The images
noised and inverted are the dataset's first ones with --data-root, else samples of
the checkpoint. The same --seed on the same device gives the same figures, and an
existing file is never replaced: a run whose names are taken gives all of its files
the same suffix, _2, _3, ...
"""

import itertools
import os

import torch

from mindiffusion.ddim import DDIM
from mindiffusion.figures import deterministic
from mindiffusion.figures.lesson import (
    GIF_FRAMES,
    GIF_IMAGES,
    LOSS_TS,
    N_IMAGES,
    SWEEP_SAMPLES,
    SWEEP_WEIGHTS,
    guidance_sweep,
    predicted_x0,
    forward_noising,
    loss_curve,
    loss_per_timestep,
    plot_grid,
    plot_loss,
    plot_loss_per_t,
    plot_schedules,
    plot_walk,
    reverse_walk,
    schedule_curves,
    timesteps,
    walk_steps,
    write_gif,
)
from mindiffusion.fid import reference_dataset
from mindiffusion.judge.model import load_judge, read
from mindiffusion.judge.scores import figures as figures_of
from mindiffusion.sample import GUIDE_W, load_ddpm
from mindiffusion.training import flags, progress
from mindiffusion.training.data import (
    data_range,
    denormalize,
    kept_walk,
)
from mindiffusion.training.devices import resolve_device
from mindiffusion.training.files import cannot_write_in
from mindiffusion.training.flags import UserError

# the deterministic walk's steps, and the rows of its interpolation
DDIM_STEPS, PAIRS = 20, 4
# the images whose x_t and x_0 the walk figure sets side by side
X0_IMAGES = 3
# every file a run may write, by its name without a suffix
NAMES = (
    "forward_noising.png", "schedules.png", "loss_per_t.png", "walk_and_x0.png",
    "reverse_walk.png", "reverse_walk.gif", "loss_curve.png", "guidance_sweep.png",
    "interpolation.png", "consistency.png", "inversion.png",
)


def suffixed(name: str, suffix: str) -> str:
    """name with suffix before its extension: reverse_walk_2.png."""
    stem, extension = os.path.splitext(name)
    return stem + suffix + extension


def run_suffix(out: str) -> str:
    """The suffix of every name this run writes into `out`: "", or _2, _3, ...,
    the first that no file of NAMES there has yet, chosen once, so that the files
    of two runs never mix."""
    for k in itertools.count(1):
        suffix = "" if k == 1 else f"_{k}"
        taken = (os.path.join(out, suffixed(name, suffix)) for name in NAMES)
        if not any(os.path.exists(path) for path in taken):
            return suffix


def main(argv: list[str] | None = None) -> None:
    parser = flags.command_parser("python -m mindiffusion.figures", __doc__)
    add = parser.add_argument
    add("checkpoint", nargs="?", default="contents/mnist_laptop_cond.pth",
        help="a checkpoint of the trainer, or an export (default: "
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
    add("--raw-walk", action="store_true", help=flags.RAW_WALK_HELP)
    add("--unit-eps", action="store_true", help=flags.UNIT_EPS_HELP)
    add("--device", default="cuda", metavar="NAME", help=flags.DEVICE_HELP)
    args = parser.parse_args(argv)
    record = args.record or os.path.splitext(args.checkpoint)[0] + "_log.csv"
    try:
        device = resolve_device(args.device)
        ddpm, recipe = load_ddpm(args.checkpoint, "ddpm", None, 0.0, True)
        if args.record and not os.path.exists(record):
            raise UserError(f"--record {record} does not exist")
        losses = loss_curve(record) if os.path.exists(record) else None
        dataset = None
        if args.data_root and not os.path.isdir(args.data_root):
            raise UserError(f"--data-root {args.data_root} does not exist")
        if args.data_root:
            dataset, _ = reference_dataset(
                recipe, args.data_root, None,
                instead="leave --data-root out to noise the model's own samples",
            )
            if len(dataset) < N_IMAGES:
                raise UserError(
                    f"--data-root {args.data_root} holds {len(dataset)} images, and "
                    f"the figures noise {N_IMAGES}: add images, or leave --data-root "
                    f"out to noise the model's own samples"
                )
        os.makedirs(args.out, exist_ok=True)
        # before the sampling, which takes minutes on a CPU
        if why := cannot_write_in(args.out):
            raise UserError(f"--out {args.out} cannot be written in ({why}): choose "
                            f"another --out")
    except UserError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except OSError as err:
        parser.exit(2, f"{parser.prog}: error: --out {args.out} ({err.strerror})\n")

    ddpm.to(device).eval()
    torch.manual_seed(args.seed)
    size, normalize = recipe["image_size"], recipe["normalize"]
    ts = timesteps(ddpm.n_T)
    kept = kept_walk(normalize, args.raw_walk, args.unit_eps)
    n_classes = recipe.get("n_classes")
    # the rows' labels: MNIST's "3 - three" as 3
    names = [str(name).split(" - ")[0] for name in recipe.get("classes") or []]

    def labels(n: int) -> torch.Tensor | None:
        """Under --cond, n labels, the first classes in turn: (n,)."""
        return None if n_classes is None else torch.arange(n, device=device) % n_classes

    c = labels(N_IMAGES)
    guided = "" if n_classes is None else f", guided with w = {GUIDE_W}"
    written, suffix = [], run_suffix(args.out)

    def write(plot, *data, name: str, **options) -> None:
        path = os.path.join(args.out, suffixed(name, suffix))
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
        # eta 1, DDPM's posterior noise, which keeps a young model's samples from
        # static, and static would show no forward process; x_0 and eps kept
        ddim = DDIM.of(ddpm, min(50, ddpm.n_T), eta=1.0, **kept)
        with progress.timesteps(ddim, "samples to noise"):
            x0 = ddim.sample(N_IMAGES, size, device, c, GUIDE_W)
        source = (f"samples of the model (DDIM, {ddim.n_steps} steps, eta 1, "
                  f"{walk_rule(ddim)}{guided})")
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
    picked = [walk_ts.index(t) for t in sorted(ts, reverse=True)]
    # x_t beside the model's x_0 at each t, for the first images of the walk, after
    # the walk's bar, which counts the walk's calls alone
    states = walk[picked, :X0_IMAGES]
    with torch.no_grad():
        guesses = predicted_x0(ddpm, states, sorted(ts, reverse=True),
                               labels(GIF_IMAGES)[:X0_IMAGES] if n_classes else None)
    side_by_side = torch.stack([states, guesses], dim=2).flatten(1, 2)
    write(plot_grid, denormalize(side_by_side, normalize),
          [f"t = {t}" for t in sorted(ts, reverse=True)],
          "Algorithm 2's x_t, and under it the model's x_0 from it, "
          "(x_t - sqrtmab eps) / sqrtab", name="walk_and_x0.png",
          rows=[word for k in range(X0_IMAGES) for word in (f"x_t ({k})", "x_0")])
    walk = denormalize(walk, normalize)
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
    # DDIM's deterministic walk, eta 0, for the guidance sweep and the three after it
    ddim = DDIM.of(ddpm, min(DDIM_STEPS, ddpm.n_T), eta=0.0, **kept)
    if n_classes is not None:
        images, columns, title, rows = guidance_figure(ddim, recipe, device)
        write(plot_grid, images, columns, title, name="guidance_sweep.png", rows=rows)
    else:
        print("no guidance sweep: the checkpoint was trained without --cond")
    walks = deterministic_figures(ddim, recipe, x0, c, source, device)
    for name, (images, columns, title, captions) in walks.items():
        write(plot_grid, images, columns, title, name=name, captions=captions)
    for path in written:
        print(f"wrote {path}")


def walk_rule(ddim: DDIM) -> str:
    """Which of DDIM's walks drew a panel, for its title: the papers' own, which
    keeps x_0 within the data's range, or the raw one, and --unit-eps's rule."""
    rule = "x_0 kept in range" if ddim.x0_range is not None else "raw, x_0 not kept"
    return rule + (", eps at unit deviation" if ddim.unit_eps else "")


def guidance_figure(ddim: DDIM, recipe: dict, device) -> tuple:
    """The guidance sweep of a conditional model, walked by `ddim`: the first class
    at each weight of SWEEP_WEIGHTS, a row each, labelled with the share the digit
    judge reads as that digit for an MNIST model; as plot_grid's images, columns,
    title, rows."""
    with progress.timesteps(ddim, "guidance sweep", samples=len(SWEEP_WEIGHTS)):
        rows = guidance_sweep(ddim, 0, SWEEP_WEIGHTS, SWEEP_SAMPLES,
                              recipe["image_size"], device)
    images = denormalize(rows, recipe["normalize"])
    labels = [f"w = {w}" for w in SWEEP_WEIGHTS]
    if recipe["dataset"] == "MNIST":
        judge = load_judge()
        shares = [figures_of(read(judge, row.cpu())[0], torch.zeros(len(row)))
                  for row in images]
        labels = [f"{label}\n{share['as_asked'] / share['samples']:.2f} as asked"
                  for label, share in zip(labels, shares)]
    name = (recipe.get("classes") or ["0"])[0]
    title = (f"class {name}, guided with w = {', '.join(map(str, SWEEP_WEIGHTS))}: "
             f"(1 + w) eps(x, c) - w eps(x, null)\n(DDIM, eta 0, {ddim.n_steps} "
             f"steps, {walk_rule(ddim)})")
    # (weights, n, C, H, W) -> a column for each sample, a row for each weight
    return images.transpose(0, 1), [""] * SWEEP_SAMPLES, title, labels


def deterministic_figures(
    ddim: DDIM,
    recipe: dict,
    x0: torch.Tensor,
    c: torch.Tensor | None,
    source: str,
    device,
) -> dict:
    """The three figures of the deterministic walk `ddim`, by file name: (images in
    [0, 1], column titles, title, captions or None). x0 and c are the images and
    labels to invert; the interpolation draws from the null class, unguided."""
    normalize = recipe["normalize"]
    size = recipe["image_size"]
    walk = f"DDIM, eta 0, {ddim.n_steps} steps, {walk_rule(ddim)}"
    guide_w = 0.0 if c is None else GUIDE_W
    # the null class for a conditional model, as conditioning gives it with no class
    null, _ = ddim.conditioning(PAIRS, None, 0.0, device)
    # the counts that fit the model's n_T, which stands in for those above it
    counts = sorted({min(k, ddim.n_T) for k in deterministic.STEP_COUNTS})
    # the model's calls: each frame's walk, each count's, and the walk up and down
    calls = (deterministic.FRAMES + 2) * ddim.n_steps + sum(counts)
    with progress.timesteps(ddim, "deterministic walks", calls=calls):
        x_a, x_b = torch.randn(2, PAIRS, *size, device=device)
        between, fractions = deterministic.interpolation(ddim, x_a, x_b, null, 0.0)
        x_T = torch.randn(len(x0), *size, device=device)
        same = deterministic.consistency(ddim, x_T, c, guide_w, tuple(counts))
        found, back = deterministic.inversion(ddim, x0, c, guide_w)
    error = (back - x0).abs()
    print(f"inversion: the images walked up to x_T and back differ by "
          f"{error.mean():.4f} on average, {error.max():.4f} at most (their range: "
          f"{data_range(normalize)})")
    figures = {
        "interpolation.png": (
            denormalize(between, normalize), [f"{f:.2f}" for f in fractions],
            f"x_T along the great circle between two draws, unconditional ({walk})",
        ),
        "consistency.png": (
            denormalize(same, normalize), [f"{k} steps" for k in counts],
            f"the same x_T in {', '.join(map(str, counts))} steps\n(DDIM, eta 0, "
            f"{walk_rule(ddim)})",
        ),
        "inversion.png": (
            denormalize(torch.stack([x0, found, back]), normalize),
            ["x_0", "x_T found", "x_0 again"],
            f"walked up to x_T and back ({walk}),\nmean error {error.mean():.3f}",
        ),
    }
    digits = recipe["dataset"] == "MNIST"
    return {
        name: (images, columns, title,
               deterministic.digit_captions(images) if digits else None)
        for name, (images, columns, title) in figures.items()
    }


if __name__ == "__main__":
    main()
