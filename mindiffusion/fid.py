"""FID of a checkpoint's samples against its own training set, as the papers measure.

    python -m mindiffusion.fid contents/ddpm_cifar.pth                  # DDIM, 50 steps
    python -m mindiffusion.fid contents/ddpm_cifar.pth --steps 10,20,50,100
    python -m mindiffusion.fid contents/ddpm_cifar.pth --sampler ddpm --n 10000
    python -m mindiffusion.fid contents/ddpm_mnist.pth --features digits  # offline

Features are the 2048 pool3 activations of the TensorFlow Inception of 2015-12-05,
through torch-fidelity, which reproduces it and its resizing. The training set's
mean and covariance are cached, so a second FID of the same data costs only the
samples. Fewer than 50,000 samples bias FID upward: such figures are not comparable
to the papers'. This module holds the command, the training set, the Inception and
the cache; the arithmetic of pixels, moments and distance is in mindiffusion.frechet.
For MNIST, `--features digits` takes the 128 features of the digit judge
(mindiffusion.judge) instead: no download, and features made for digits.
"""
import hashlib
import io
import json
import os
import sys
import urllib.error

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import CIFAR10, MNIST, ImageFolder
from tqdm import tqdm

from mindiffusion.frechet import Moments, frechet_distance, to_uint8
from mindiffusion.judge.model import JudgeFeatures
from mindiffusion.sample import GUIDE_W, load_ddpm
from mindiffusion.training import flags, progress
from mindiffusion.training.data import (
    FakeImages,
    denormalize,
    explain_image_folder,
    explain_missing_dataset,
)
from mindiffusion.training.devices import resolve_device
from mindiffusion.training.flags import UserError
from mindiffusion.training.files import cannot_write_in, write_or_explain

# where torch-fidelity's download of the Inception weights comes from
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
# the Inception's name, for the cache key and the --json figures
EXTRACTOR = "torch-fidelity inception-v3-compat 2015-12-05 pool3 2048"
# the papers' sample count
PAPERS_N = 50_000


def inception(weights: str | None, device: torch.device) -> nn.Module:
    """torch-fidelity's Inception, giving the 2048 pool3 features of uint8 images.

    The weights come from `weights`, a local file, or else from torch's hub cache,
    where torch-fidelity downloads them the first time.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import (
        FeatureExtractorInceptionV3,
    )

    if weights is not None:
        # torch-fidelity loads the file with weights_only=False: check it first
        try:
            torch.load(weights, map_location="cpu", weights_only=True)
        except Exception:
            raise UserError(
                f"--inception-weights {weights} is not a readable file of weights"
            ) from None
    try:
        extractor = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=weights
        )
    except (RuntimeError, TypeError):
        # load_state_dict's list of every name and shape that does not fit, or a
        # file that holds no dictionary at all
        if weights is None:
            raise
        raise UserError(
            f"--inception-weights {weights} holds other weights than torch-fidelity's "
            f"Inception: give the file downloaded from {INCEPTION_URL}"
        ) from None
    except (urllib.error.URLError, OSError) as err:
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise UserError(
            f"the Inception weights are not in {cache} and could not be downloaded "
            f"({getattr(err, 'reason', err)}): fetch {INCEPTION_URL} on a machine "
            f"with a network and give it with --inception-weights PATH"
        ) from None
    # for the cache key: a change of the extractor recomputes the statistics
    extractor.name = EXTRACTOR
    return extractor.to(device)


def features_of(extractor: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The extractor's features of images in [0, 1], (B, C, H, W) -> (B, 2048), or
    (B, 128) for the digit judge's."""
    (features,) = extractor(to_uint8(images))
    return features


def reference_dataset(
    recipe: dict, data_root: str | None, fake_data: int | None,
    instead: str = "give --fake-data N to measure against random images",
):
    """The checkpoint's training set as pixels in [0, 1], read as its script read
    it (without the Normalize, which the samples have undone too), and a name for
    it in the cache key; `instead` says what the command can do without it."""
    size = tuple(recipe["image_size"])
    if fake_data:
        dataset = FakeImages(fake_data, size, transform=transforms.ToTensor())
        return dataset, f"FakeImages({fake_data}, {size})"
    name = recipe.get("dataset")
    if name == "ImageFolder":
        root = data_root or os.environ.get("CELEBA_PATH")
        tf = transforms.Compose([transforms.Resize(size[1:]), transforms.ToTensor()])
        with explain_image_folder(root):
            dataset = ImageFolder(root=root, transform=tf)
    elif name in ("MNIST", "CIFAR10"):
        root = data_root or "./data"
        # a crop larger than the image pads it: MNIST's 28x28 digits become the
        # 32x32 a NaiveUnet was trained on, as the trainer's mnist --eps-model unet pads
        tf = transforms.Compose(
            [transforms.CenterCrop(size[1:]), transforms.ToTensor()]
        )
        with explain_missing_dataset(name, root, instead):
            dataset = {"MNIST": MNIST, "CIFAR10": CIFAR10}[name](
                root, train=True, download=True, transform=tf
            )
    elif name == "FakeImages":
        raise UserError(
            f"the checkpoint trained on --fake-data's random images, which no folder "
            f"holds: {instead}"
        )
    else:
        raise UserError(
            f"the checkpoint does not name its training set (it was saved before "
            f"checkpoints did): {instead}"
        )
    return dataset, f"{name} train at {os.path.abspath(root)}, {tf}"


def cached_statistics(path: str, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The mean and covariance cached at path for this key, or None: no file, a
    file of another key, or one that cannot be read, which is said in one line."""
    if not os.path.exists(path):
        return None
    try:
        cached = torch.load(path, weights_only=True)
        found, mu, sigma = cached["key"], cached["mu"], cached["sigma"]
    except Exception:
        # a truncated or garbled file, or one of another layout: the statistics
        # are computed again and the file rewritten
        print(f"the cached reference statistics in {path} cannot be read: computing "
              f"them again")
        return None
    return (mu, sigma) if found == key else None


def reference_statistics(dataset, name, extractor, batch_size, device, cache_dir):
    """The mean and covariance of the dataset's features, from the cache in the
    folder cache_dir when the dataset, its split, the transform, the image count and
    the extractor, by its `name`, are the ones it was computed for."""
    key = json.dumps(
        dict(dataset=name, images=len(dataset), extractor=extractor.name)
    )
    path = os.path.join(
        cache_dir, hashlib.sha256(key.encode()).hexdigest()[:16] + ".pt"
    )
    cached = cached_statistics(path, key)
    if cached is not None:
        print(f"reference statistics from the cache: {path}")
        return cached
    moments = Moments()
    loader = DataLoader(dataset, batch_size=batch_size)
    for images, _ in tqdm(loader, desc="features of the training set"):
        moments.add(features_of(extractor, images.to(device)))
    mu, sigma = moments.statistics()
    buffer = io.BytesIO()
    torch.save(dict(key=key, mu=mu, sigma=sigma), buffer)
    write_or_explain(path, buffer.getvalue(), "the reference statistics' cache")
    return mu, sigma


def sample_statistics(
    ddpm, recipe, extractor, n, batch_size, device, description, guide_w
):
    """The mean and covariance of the features of n samples, drawn in batches; a
    model trained with --cond draws each class in equal numbers, guided by guide_w."""
    n_classes = recipe.get("n_classes")
    # 0, 1, ..., K-1, 0, 1, ...: (n,)
    labels = torch.arange(n, device=device) % n_classes if n_classes else None
    firsts = range(0, n, batch_size)
    moments = Moments()
    with progress.timesteps(ddpm, description, samples=len(firsts)):
        for first in firsts:
            size = min(batch_size, n - first)
            c = None if labels is None else labels[first : first + size]
            x = ddpm.sample(size, recipe["image_size"], device, c, guide_w)
            moments.add(features_of(extractor, denormalize(x, recipe["normalize"])))
    return moments.statistics()


def main(argv: list[str] | None = None) -> None:
    parser = flags.command_parser("python -m mindiffusion.fid", __doc__)
    add = parser.add_argument
    add("checkpoint", help="a checkpoint of the trainer, or a notes' script's weights")
    add("--n", type=flags.at_least(2), default=PAPERS_N,
        help="samples per FID, as many as the papers by default (default: %(default)s)")
    add("--sampler", choices=("ddpm", "ddim"), default="ddim",
        help="the sampler (default: %(default)s)")
    add("--steps", type=flags.step_counts, metavar="S[,S...]",
        help="DDIM's steps; a list gives one FID per entry, like Table 1 of the DDIM "
        "paper (default: 50, or n_T if less)")
    add("--eta", type=flags.eta, help="DDIM's noise, 0 to 1 (default: 0)")
    add("--raw-walk", action="store_true", help=flags.RAW_WALK_HELP)
    add("--unit-eps", action="store_true", help=flags.UNIT_EPS_HELP)
    add("--guide-w", type=flags.guidance_weight, metavar="W",
        help=f"for a --cond checkpoint: the guidance weight; the paper's best FIDs "
        f"came at small weights (default: {GUIDE_W})")
    add("--no-ema", dest="use_ema", action="store_false",
        help="the trained weights, not their --ema average (default: the average)")
    add("--data-root", metavar="DIR",
        help="the training set's folder (default: ./data; CelebA: $CELEBA_PATH)")
    add("--fake-data", type=flags.at_least(2), metavar="N",
        help="measure against N random images, not the training set (default: off)")
    add("--batch-size", type=flags.at_least(1), default=250, metavar="N",
        help="images per batch, for sampling and features (default: %(default)s)")
    add("--device", default="cuda", metavar="NAME", help=flags.DEVICE_HELP)
    add("--seed", type=flags.seed, metavar="N",
        help="seed for the samples, the same FID each time (default: unseeded)")
    add("--features", choices=("inception", "digits"), default="inception",
        help="inception: the papers' 2048 Inception features; digits, for MNIST: "
        "the digit judge's 128, offline (default: %(default)s)")
    add("--inception-weights", metavar="PATH",
        help="the Inception weights as a local file, for machines without a network "
        "(default: torch-fidelity's download into torch's hub cache)")
    add("--cache-dir", metavar="DIR",
        default=os.path.join(torch.hub.get_dir(), "mindiffusion_fid"),
        help="where the training set's statistics are kept (default: %(default)s)")
    add("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    args = parser.parse_args(argv)
    ddim_flags = (args.steps, args.eta, args.raw_walk, args.unit_eps)
    if args.sampler == "ddpm" and ddim_flags != (None, None, False, False):
        parser.error("--steps, --eta, --raw-walk and --unit-eps are DDIM's: add "
                     "--sampler ddim, or drop them")
    if args.features == "digits" and args.inception_weights:
        parser.error("--inception-weights: --features digits reads no Inception")
    if args.json and not os.path.isdir(os.path.dirname(args.json) or "."):
        parser.error(f"--json {args.json}: its folder does not exist")
    if args.json and os.path.exists(args.json):
        parser.error(f"--json {args.json} already exists: choose another file")
    # before the sampling, which takes hours at the papers' --n
    if args.json and (why := cannot_write_in(os.path.dirname(args.json) or ".")):
        parser.error(f"--json {args.json}: its folder cannot be written in ({why})")
    # the cache's folder before any work, not after the training set's features
    if os.path.exists(args.cache_dir) and not os.path.isdir(args.cache_dir):
        parser.error(f"--cache-dir {args.cache_dir} is a file: give a folder")
    try:
        os.makedirs(args.cache_dir, exist_ok=True)
    except OSError as err:
        parser.error(f"--cache-dir {args.cache_dir} could not be made ({err.strerror})")

    try:
        device = resolve_device(args.device)
        ddpm, recipe = load_ddpm(
            args.checkpoint, args.sampler, None, args.eta or 0.0, args.use_ema,
            args.raw_walk, args.unit_eps,
        )
        if args.features == "digits" and recipe["image_size"][0] != 1:
            raise UserError(f"--features digits: {args.checkpoint} has no MNIST digits")
        steps = args.steps or [progress.model_calls(ddpm)]
        conditional = recipe.get("n_classes") is not None
        if args.guide_w is not None and not conditional:
            raise UserError(
                f"--guide-w: {args.checkpoint} was trained without --cond, so it has "
                f"no classes to guide towards"
            )
        guide_w = GUIDE_W if args.guide_w is None else args.guide_w
        if args.sampler == "ddim" and max(steps) > ddpm.n_T:
            raise UserError(
                f"--steps {max(steps)} is more than the model's n_T = {ddpm.n_T}"
            )
        dataset, name = reference_dataset(recipe, args.data_root, args.fake_data)
        if args.features == "digits":
            extractor = JudgeFeatures().to(device)
        else:
            extractor = inception(args.inception_weights, device)
        if args.n < PAPERS_N:
            print(
                f"warning: --n {args.n} is below the papers' {PAPERS_N:,}: this FID "
                f"is biased upward and not comparable to theirs",
                file=sys.stderr,
            )
        ddpm.to(device).eval()
        mu_real, sigma_real = reference_statistics(
            dataset, name, extractor, args.batch_size, device, args.cache_dir
        )
    except UserError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")

    results = []
    for count in steps:
        if args.sampler == "ddim":
            ddpm.n_steps = count
        if args.seed is not None:
            # each entry from the same seed, so that its FID does not depend on the
            # entries before it
            torch.manual_seed(args.seed)
        mu, sigma = sample_statistics(
            ddpm, recipe, extractor, args.n, args.batch_size, device,
            f"{args.n} samples, {count} steps", guide_w,
        )
        fid = frechet_distance(mu, sigma, mu_real, sigma_real)
        results.append(dict(steps=count, fid=fid))

    print(f"FID of {args.checkpoint} against {name} ({len(dataset):,} images)")
    print(f"{'steps':>6}  FID")
    for result in results:
        print(f"{result['steps']:>6}  {result['fid']:.2f}")
    last = results[-1]
    if args.json:
        figures = dict(
            checkpoint=args.checkpoint, n=args.n, sampler=args.sampler,
            eta=getattr(ddpm, "eta", None), raw_walk=args.raw_walk,
            unit_eps=args.unit_eps,
            ema=recipe["averaged"], guide_w=guide_w if conditional else None,
            reference=name, reference_images=len(dataset), extractor=extractor.name,
            results=results,
        )
        text = json.dumps(figures, indent=2)
        try:
            write_or_explain(args.json, text.encode(), f"--json {args.json}")
        except UserError as err:
            parser.exit(2, f"{parser.prog}: error: {err}\n")
    walk = f", eta={ddpm.eta}" if args.sampler == "ddim" else ""
    walk += ", raw walk" if args.raw_walk else ""
    walk += ", unit eps" if args.unit_eps else ""
    guidance = f", guide_w={guide_w}" if conditional else ""
    print(f"FID: {last['fid']:.4f} (n={args.n}, sampler={args.sampler}, "
          f"steps={last['steps']}{walk}{guidance})")


if __name__ == "__main__":
    flags.run_command(main, "python -m mindiffusion.fid")
