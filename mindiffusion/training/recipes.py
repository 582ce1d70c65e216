"""The recipes: each notes' script's own settings, in one table, which a test holds
equal to the scripts' defaults. The trainer builds each run from its recipe: the
noise model, the transform and the dataset, and the grid and the files it writes.
"""
import inspect
import os
from typing import NamedTuple

import torch
from torchvision import transforms
from torchvision.datasets import CIFAR10, MNIST, ImageFolder

from mindiffusion.ddpm import DDPM
from mindiffusion.dummy import DummyEpsModel
from mindiffusion.training.data import (
    FakeImages,
    class_names,
    explain_image_folder,
    explain_missing_dataset,
    mnist_root,
    read_image,
)
from mindiffusion.unet import NaiveUnet


class Recipe(NamedTuple):
    """A script's settings: its noise model and NaiveUnet's width, batch size,
    learning rate, device and data folder; the shape of its images (for
    --fake-data, as the files hold them), their Normalize, the side it resizes
    them to, if it does; how many samples its grid draws, whether real images
    join them; and the names of its checkpoint and of its epoch grids."""

    eps_model: str
    n_feat: int
    batch_size: int
    lr: float
    device: str
    data_root: str | None
    stored: tuple[int, int, int]
    normalize: tuple[tuple, tuple]
    resize: int | None
    n_sample: int
    real_in_grid: bool
    checkpoint: str
    grids: str


RGB = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
RECIPES = {
    "mnist": Recipe(
        eps_model="dummy", n_feat=128, batch_size=128, lr=2e-4, device="cuda:0",
        data_root="./data", stored=(1, 28, 28), normalize=((0.5,), (1.0,)),
        resize=None, n_sample=16, real_in_grid=False, checkpoint="ddpm_mnist.pth",
        grids="ddpm_sample_{}.png",
    ),
    "cifar10": Recipe(
        eps_model="unet", n_feat=128, batch_size=512, lr=1e-5, device="cuda:1",
        data_root="./data", stored=(3, 32, 32), normalize=RGB, resize=None,
        n_sample=8, real_in_grid=True, checkpoint="ddpm_cifar.pth",
        grids="ddpm_sample_cifar{}.png",
    ),
    # CelebA's aligned faces are 178 wide and 218 high
    "celeba": Recipe(
        eps_model="unet", n_feat=128, batch_size=32, lr=2e-5, device="cuda:1",
        data_root=os.environ.get("CELEBA_PATH"), stored=(3, 218, 178), normalize=RGB,
        resize=128, n_sample=8, real_in_grid=True, checkpoint="ddpm_celeba.pth",
        grids="ddpm_sample_celeba{:03d}.png",
    ),
}

# MNIST's --laptop: a small NaiveUnet that draws digits in minutes on two CPU cores,
# or on a Mac's GPU: many small steps at a high learning rate, in float32 (bfloat16
# was slower even on a CPU with it natively), grids of 20 DDIM steps, and within
# epochs of the full MNIST a grid every 2 minutes (docs/performance.md says what
# each setting was measured to give); without MNIST in ./data, the 5,000 digits
# that ship in contents/mnist-subset
LAPTOP = dict(eps_model="unet", n_feat=16, batch_size=16, lr=3e-3, ema=0.995,
              channels_last=True, grid_sampler="ddim", grid_steps=20,
              grid_minutes=2.0, num_workers=0, data_root=mnist_root("./data"),
              device="mps" if torch.backends.mps.is_available() else "cpu")

# the recipe's settings that are flags too
FLAGGED = ("eps_model", "n_feat", "batch_size", "lr", "device", "data_root")


def recipe_settings(dataset: str) -> dict:
    """The recipe of `dataset`, as the flags it sets by default."""
    recipe = RECIPES[dataset]
    return {name: getattr(recipe, name) for name in FLAGGED}


def image_size(recipe: Recipe, eps_model: str) -> tuple[int, int, int]:
    """The shape of the images the noise model sees, (C, H, W)."""
    channels, height, width = recipe.stored
    if recipe.resize:
        return channels, recipe.resize, recipe.resize
    # MNIST's NaiveUnet: 28x28 padded to 32x32, for its three halvings
    pad = 2 if eps_model == "unet" and channels == 1 else 0
    return channels, height + 2 * pad, width + 2 * pad


def transform(recipe: Recipe, eps_model: str) -> transforms.Compose:
    """The script's transform: to a tensor and its Normalize, after a resize to
    CelebA's 128x128, or for MNIST's NaiveUnet, a pad to 32x32 with black borders."""
    steps = [transforms.ToTensor(), transforms.Normalize(*recipe.normalize)]
    if recipe.resize:
        steps.insert(0, transforms.Resize((recipe.resize, recipe.resize)))
    elif image_size(recipe, eps_model) != recipe.stored:
        steps.insert(0, transforms.Pad(2))
    return transforms.Compose(steps)


def load_dataset(dataset: str, root: str | None, tf, fake_data: int | None):
    """The script's dataset in `root`, or under --fake-data, N random images of its
    shape; a dataset that is missing is one sentence that says what to pass."""
    recipe = RECIPES[dataset]
    if fake_data:
        return FakeImages(fake_data, image_size=recipe.stored, transform=tf)
    if dataset == "celeba":
        with explain_image_folder(root):
            # the loader names a file that cannot be read
            return ImageFolder(root=root, transform=tf, loader=read_image)
    name, kind = {"mnist": ("MNIST", MNIST), "cifar10": ("CIFAR-10", CIFAR10)}[dataset]
    with explain_missing_dataset(name, root):
        return kind(root, train=True, download=True, transform=tf)


def make_ddpm(
    recipe: Recipe, eps_model: str, n_feat: int, n_T: int, n_classes: int | None,
    p_uncond: float,
) -> DDPM:
    """The script's DDPM, its noise model the notes' DummyEpsModel or NaiveUnet, made
    as the script makes it, so that the same seed gives the same weights; with
    `n_classes`, class-conditional (--cond)."""
    channels = recipe.stored[0]
    if eps_model == "dummy":
        model = DummyEpsModel(channels, n_classes)
    else:
        model = NaiveUnet(channels, channels, n_feat, n_classes)
    return DDPM(model, (1e-4, 0.02), n_T, n_classes=n_classes, p_uncond=p_uncond)


def recipe_of(ddpm: DDPM, dataset, size: tuple) -> dict:
    """What python -m mindiffusion.sample needs to rebuild this DDPM from a
    checkpoint, and mindiffusion.fid to read the training set again, read off the
    objects themselves: the noise model's class and arguments, the dataset's class,
    image shape and Normalize."""
    eps_model = ddpm.eps_model
    names = [
        name
        for name in inspect.signature(type(eps_model).__init__).parameters
        if name not in ("self", "n_classes")
    ]
    normalize = next(
        t for t in dataset.transform.transforms if isinstance(t, transforms.Normalize)
    )
    cond = ddpm.n_classes is not None
    return dict(
        dataset=type(dataset).__name__,
        eps_model=type(eps_model).__name__,
        eps_model_args=tuple(getattr(eps_model, name) for name in names),
        betas=tuple(ddpm.betas),
        n_T=ddpm.n_T,
        image_size=size,
        normalize=(tuple(normalize.mean), tuple(normalize.std)),
        # --cond: the classes, by label, and how often training hides the label
        n_classes=ddpm.n_classes,
        classes=class_names(dataset) if cond else None,
        p_uncond=ddpm.p_uncond if cond else None,
    )


def notes_recipe(path: str, weights: dict) -> dict | None:
    """The recipe of the weights alone that a notes' script saved at `path`, read
    off the file's name (ddpm_cifar.pth: train_cifar10.py's) and the weights' own
    shapes; None for a name no script writes."""
    dataset = next((d for d, r in RECIPES.items() if r.checkpoint in path), None)
    if dataset is None:
        return None
    recipe = RECIPES[dataset]
    channels = recipe.stored[0]
    if "eps_model.conv.0.0.weight" in weights:
        eps_model, args = "DummyEpsModel", (channels,)
    else:
        n_feat = len(weights["eps_model.init_conv.main.0.weight"])
        eps_model, args = "NaiveUnet", (channels, channels, n_feat)
    return dict(
        dataset={"mnist": "MNIST", "cifar10": "CIFAR10"}.get(dataset, "ImageFolder"),
        eps_model=eps_model,
        eps_model_args=args,
        betas=(1e-4, 0.02),
        # the schedules hold t = 0, ..., n_T
        n_T=len(weights["sqrtab"]) - 1,
        image_size=image_size(recipe, "dummy" if channels == 1 else "unet"),
        normalize=recipe.normalize,
        n_classes=None,
    )
