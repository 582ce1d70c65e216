"""The judge's command line, python -m mindiffusion.judge."""
import argparse
import glob
import os

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import MNIST

from mindiffusion import frechet, judge
from mindiffusion.judge.model import (
    DIGIT_SHAPES,
    WEIGHTS,
    DigitJudge,
    load_judge,
    read,
)
from mindiffusion.judge.scores import figures, grid_images, rows_as_digits
from mindiffusion.judge.teach import train
from mindiffusion.sample import GUIDE_W, check_out, load_ddpm
from mindiffusion.training import flags, progress
from mindiffusion.training.data import denormalize, mnist_root
from mindiffusion.training.devices import resolve_device
from mindiffusion.training.flags import UserError


def real_digit_moments(judge: DigitJudge, data_root: str):
    """The moments of the judge's features of MNIST's test digits at data_root, or
    None where MNIST is not there (nothing is downloaded)."""
    try:
        test = MNIST(data_root, train=False, transform=transforms.ToTensor())
    except RuntimeError:
        return None
    moments = frechet.Moments()
    for x, _ in DataLoader(test, 1000):
        moments.add(read(judge, x)[1])
    return moments


def sample_checkpoint(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint's samples in [0, 1], a row of --n for each digit where it
    was trained with --cond, and the digits asked for (None: unconditional)."""
    steps = args.steps if args.sampler == "ddim" else None
    ddpm, recipe = load_ddpm(
        args.input, args.sampler, steps, args.eta, True, args.raw_walk, args.unit_eps
    )
    if args.sampler == "ddim" and steps is None:
        # the default's steps, or the model's n_T where it has fewer
        ddpm.n_steps = min(STEPS, ddpm.n_T)
    # before any sampling: the judge reads digits of MNIST's shape, ten classes
    image_size = tuple(recipe["image_size"])
    if image_size not in DIGIT_SHAPES:
        raise UserError(f"the judge reads MNIST digits, 1x28x28 or 1x32x32, not the "
                        f"{'x'.join(map(str, image_size))} images of {args.input}")
    if recipe.get("n_classes") not in (None, 10):
        raise UserError(f"{args.input} was trained on {recipe['n_classes']} classes, "
                        f"not the ten digits the judge reads")
    device = resolve_device(args.device)
    asked = None
    n = args.n or 64
    if args.guide_w is not None and not recipe.get("n_classes"):
        raise UserError(f"--guide-w: {args.input} was trained without --cond, so it "
                        f"has no digits to guide towards")
    if recipe.get("n_classes"):
        # (10,) -> (10 * n,): a row of n for each digit
        asked = torch.arange(10).repeat_interleave(args.n or 8)
        n = len(asked)
    torch.manual_seed(args.seed)
    guide_w = GUIDE_W if args.guide_w is None else args.guide_w
    c = None if asked is None else asked.to(device)
    with torch.no_grad(), progress.timesteps(ddpm, "sampling"):
        x = ddpm.to(device).eval().sample(n, recipe["image_size"], device, c, guide_w)
    return denormalize(x, recipe["normalize"]).cpu(), asked


# the flags of each use of the command, which the other uses refuse, not ignore
SAMPLING = ("n", "sampler", "steps", "eta", "raw_walk", "unit_eps", "guide_w", "seed",
            "device")
TRAINING = ("per_class", "epochs", "out")
DEFAULTS = dict(sampler="ddim", eta=0.0, raw_walk=False, unit_eps=False, seed=0,
                device="cpu", epochs=25)
# DDIM's steps where --steps is not given, or the model's n_T if fewer
STEPS = 20


def check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, in one sentence, a flag this use of the command would ignore; then
    fill in the defaults of the flags left out."""
    given = [name for name in (*SAMPLING, *TRAINING) if getattr(args, name) is not None]

    def refuse(names: tuple, why: str) -> None:
        for name in given:
            if name in names:
                parser.error(f"--{name.replace('_', '-')} {why}")

    if args.train and args.input:
        parser.error("--train takes no grid or checkpoint to read")
    if args.train and not args.out:
        parser.error("--train needs --out PTH for the judge's weights")
    if not args.train and not args.input:
        parser.error("give a grid PNG or a checkpoint to read, or --train")
    grid = not args.train and args.input.lower().endswith(".png")
    if args.rows_are_classes and not grid:
        parser.error("--rows-are-classes is for a grid PNG: a checkpoint knows its "
                     "classes")
    refuse(SAMPLING if args.train or grid else (), "is for sampling a checkpoint")
    refuse(() if args.train else TRAINING, "is for --train")
    if args.sampler == "ddpm":
        refuse(("steps", "eta", "raw_walk", "unit_eps"),
               "is DDIM's: add --sampler ddim, or drop it")
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def check_input(path: str) -> None:
    """Refuse, in one sentence, an input that is not there, naming the newest grid
    of its folder, or an image other than a PNG."""
    if not os.path.exists(path):
        folder = os.path.dirname(path) or "."
        grids = glob.glob(os.path.join(glob.escape(folder), "*.png"))
        if grids:
            newest = max(grids, key=os.path.getmtime)
            raise UserError(f"{path} does not exist: the newest grid there is {newest}")
        raise UserError(f"{path} does not exist")
    extension = os.path.splitext(path)[1].lower()
    if extension != ".png" and extension in Image.registered_extensions():
        raise UserError(
            f"{path} is a {extension} image: the judge reads grids as PNG, whose "
            f"pixels are exact, as `sample` writes them"
        )


def main(argv: list[str] | None = None) -> None:
    parser = flags.command_parser("python -m mindiffusion.judge", judge.__doc__)
    add = parser.add_argument
    add("input", nargs="?",
        help="a grid PNG of MNIST samples, or an MNIST checkpoint to sample")
    add("--rows-are-classes", action="store_true",
        help="a grid whose row r drew digit r, as --cond grids and `sample --class "
        "all` are (default: off)")
    add("--n", type=flags.at_least(1),
        help="a checkpoint's samples (default: 64), or of each digit for one trained "
        "with --cond (default: 8)")
    add("--sampler", choices=("ddpm", "ddim"),
        help="how a checkpoint is sampled (default: ddim)")
    add("--steps", type=flags.at_least(1), help="DDIM's steps (default: 20)")
    add("--eta", type=flags.eta, help="DDIM's noise, 0 to 1 (default: 0)")
    add("--raw-walk", action="store_true", default=None, help=flags.RAW_WALK_HELP)
    add("--unit-eps", action="store_true", default=None, help=flags.UNIT_EPS_HELP)
    add("--guide-w", type=flags.guidance_weight, metavar="W",
        help=f"the guidance weight, for a --cond checkpoint (default: {GUIDE_W})")
    add("--seed", type=flags.seed, metavar="N",
        help="seed of a checkpoint's samples (default: 0)")
    add("--device", metavar="NAME",
        help="where a checkpoint samples (default: cpu)")
    add("--weights", default=WEIGHTS, metavar="PTH",
        help="the judge's weights (default: the shipped contents/mnist_judge.pth)")
    add("--data-root", metavar="DIR",
        help="MNIST's folder: its test digits for the Frechet distance (left out "
        "where they are not there), its training digits for --train, downloaded "
        "into it where they are not there (default: ./data, or without MNIST "
        "there, for --train, the 5,000 digits that ship in contents/mnist-subset)")
    add("--train", action="store_true",
        help="train a judge on MNIST, downloading it if need be, and write its "
        "weights to --out (default: off)")
    add("--per-class", type=flags.at_least(1), metavar="N",
        help="with --train, the first N training digits of each digit, as the "
        "trainer's --per-class takes them (default: all)")
    add("--epochs", type=flags.at_least(1), metavar="N",
        help="with --train, passes over the digits (default: 25)")
    add("--out", metavar="PTH", help="with --train, where its weights go")
    args = parser.parse_args(argv)
    check_flags(parser, args)
    if args.data_root is not None and not os.path.isdir(args.data_root):
        parser.error(f"--data-root {args.data_root} does not exist")
    try:
        if args.train:
            check_out(args.out, image=False)
            # by default, without MNIST in ./data, the digits that ship here
            root = args.data_root or mnist_root("./data")
            train(root, args.per_class, args.epochs, args.out)
            return
        classifier = load_judge(args.weights)
        check_input(args.input)
        if args.input.lower().endswith(".png"):
            images, rows = grid_images(args.input)
            # black cells at the end: black samples, or a short row's empty cells
            black = 0
            while black < len(images) and images[-1 - black].max() == 0:
                black += 1
            if black:
                print(f"the grid ends in {black} black cells, each read as a sample: "
                      f"a short row's empty cells look the same")
            asked = None
            if args.rows_are_classes:
                asked = rows_as_digits(images, rows, args.input)
        else:
            images, asked = sample_checkpoint(args)
        probs, features = read(classifier, images)
    except UserError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    result = figures(probs, asked)
    n = result["samples"]
    print(f"read as digits (at least 90% sure): {result['digits'] / n:.2f} "
          f"({result['digits']} of {n})")
    print(f"distinct digits: {result['distinct']}")
    print(f"digit score: {result['score']:.1f} of 10")
    if asked is not None:
        print(f"drawn as the digit asked for: {result['as_asked'] / n:.2f} "
              f"({result['as_asked']} of {n})")
    data_root = args.data_root or "./data"
    real = real_digit_moments(classifier, data_root)
    if real is None:
        print(f"Frechet distance: left out, no MNIST in {data_root}")
        return
    samples = frechet.Moments()
    samples.add(features)
    distance = frechet.frechet_distance(*samples.statistics(), *real.statistics())
    print(f"Frechet distance to MNIST's {real.n:,} test digits, in the judge's "
          f"features: {distance:.1f} ({n} samples: few samples raise it)")
