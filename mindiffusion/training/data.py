"""The training data: a dataset that is missing explained in one sentence, the order
in which an epoch takes the images, which a resume takes up again, and the classes
of a class-conditional run (--cond): their names, the rows of the grids, and the
classes a command line asks for by number or by name.

The guided noise prediction itself, eq. 6 of Ho & Salimans (2021), is in
`DDPM.guided_eps`.
"""
import collections
import contextlib
import io
import math
import os
import sys

import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler, Sampler, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS

from mindiffusion.training.devices import process_rank, say, world_size
from mindiffusion.training.flags import UserError


# the 5,000 real MNIST digits that ship with the repository, in torchvision's layout
SHIPPED_DIGITS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "contents", "mnist-subset",
)
MNIST_FILES = [f"{split}-{kind}-idx{n}-ubyte" for split in ("train", "t10k")
               for kind, n in (("images", 3), ("labels", 1))]


def has_mnist(root: str) -> bool:
    """Whether torchvision's MNIST is in root, as its own layout puts it."""
    return all(os.path.exists(os.path.join(root, "MNIST", "raw", name))
               for name in MNIST_FILES)


def mnist_root(root: str) -> str:
    """root where MNIST is there, else the repository's own 5,000 digits."""
    return root if has_mnist(root) else SHIPPED_DIGITS


@contextlib.contextmanager
def explain_missing_dataset(
    name: str, root: str, instead: str | None = "run with --fake-data N"
):
    """Turn a failed torchvision download into one sentence that says what to do:
    put the files in place, or else `instead`, what the command can do without them.

    torchvision prints each mirror it tries; that chatter is held back, and shown
    only if the dataset loads after all. Under torchrun, the first process on each
    machine downloads while the others wait, then they read what it wrote.
    """
    if os.path.abspath(root) == SHIPPED_DIGITS:
        say(f"{name}: the 5,000 digits that ship in {SHIPPED_DIGITS} (400 of each "
            f"digit to train on, 100 to test)")
    first_on_machine = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if dist.is_initialized() and not first_on_machine:
        dist.barrier()
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):
            yield
    except (OSError, RuntimeError) as err:
        reason = str(err).splitlines()[0].rstrip(":")
        otherwise = f", or {instead}" if instead else ""
        raise UserError(
            f"{name} is not in {root} and could not be downloaded ({reason}): put its "
            f"files there or point --data-root at them{otherwise}"
        ) from None
    if dist.is_initialized() and first_on_machine:
        dist.barrier()
    sys.stdout.write(chatter.getvalue())


@contextlib.contextmanager
def explain_image_folder(root: str | None):
    """Check a folder for `ImageFolder`, and turn its errors into one sentence."""
    layout = "ImageFolder wants the images one folder down, in ROOT/<subfolder>/*.jpg"
    if root is None:
        raise UserError(
            "no image folder given: pass --data-root DIR or set CELEBA_PATH "
            "(or run with --fake-data N)"
        )
    if not os.path.isdir(root):
        raise UserError(f"{root} is not a folder: give the image folder to --data-root")
    try:
        yield
    except FileNotFoundError:
        loose = [f for f in os.listdir(root) if f.lower().endswith(IMG_EXTENSIONS)]
        if loose:
            raise UserError(
                f"{root} holds {len(loose)} images directly, but {layout}: move them "
                f"into a subfolder such as {os.path.join(root, 'all')}"
            ) from None
        # ImageFolder takes every subfolder for a class, a hidden one too, and
        # refuses a class without images
        folders = sorted(e.path for e in os.scandir(root) if e.is_dir())
        empty = [folder for folder in folders if not holds_images(folder)]
        if empty and len(empty) < len(folders):
            raise UserError(
                f"{empty[0]} holds no images, and ImageFolder takes each subfolder "
                f"of {root} for a class: remove it, or move it out of {root}"
            ) from None
        raise UserError(f"no images found under {root}: {layout}") from None


def holds_images(folder: str) -> bool:
    """Whether an image file is in folder or in a folder below it."""
    return any(
        name.lower().endswith(IMG_EXTENSIONS)
        for _, _, names in os.walk(folder, followlinks=True) for name in names
    )


class UnreadableImage(UserError):
    """A file of an image folder that PIL cannot read. Its text is the file's path,
    or where a DataLoader worker passes it on, the worker's traceback, whose last
    line ends with the path."""

    def path(self) -> str:
        return str(self).strip().rpartition("UnreadableImage: ")[2]


def read_image(path: str) -> Image.Image:
    """ImageFolder's loader, as torchvision's own opens a file in RGB, but naming
    the file that cannot be read, such as a text saved as .jpg."""
    try:
        with open(path, "rb") as file:
            return Image.open(file).convert("RGB")
    except OSError:
        raise UnreadableImage(path) from None


class FakeImages(Dataset):
    """`size` random images of shape image_size (C, H, W), each with a label in
    0..num_classes-1, for --fake-data: drawn once, from a generator of their own,
    then read as MNIST and CIFAR10 read theirs, a uint8 array through PIL and the
    transform, so that a batch costs what a real one does (torchvision's FakeData
    draws each image anew, at about three times the cost of an MNIST digit)."""

    def __init__(
        self, size: int, image_size: tuple, transform=None, num_classes: int = 10
    ) -> None:
        generator = torch.Generator().manual_seed(0)
        channels, height, width = image_size
        # (size, H, W, C), the layout PIL reads
        shape = (size, height, width, channels)
        self.images = torch.randint(
            0, 256, shape, dtype=torch.uint8, generator=generator
        )
        self.targets = torch.randint(num_classes, (size,), generator=generator).tolist()
        self.transform, self.num_classes = transform, num_classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        pixels = self.images[index].numpy()
        # a grey image is (H, W) to PIL
        image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


class EpochOrder(Sampler):
    """The order in which an epoch takes the images. In one process, that of the
    notes' DataLoader(shuffle=True): a permutation from a seed that RandomSampler
    draws from torch's generator as the epoch starts. Under torchrun, this rank's
    share of DistributedSampler's permutation, from a seed every rank holds and the
    epoch. `seed` names the epoch's order in a save; `resume(seed, batches)` takes
    that order up again, after the batches done, which are never loaded."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int | None) -> None:
        self.size, self.batch_size = len(dataset), batch_size
        self.seed, self.skip, self.shared = seed, 0, None
        if world_size() > 1:
            self.shared = DistributedSampler(
                dataset, world_size(), process_rank(), seed=seed
            )
        # whole epochs, as a resume cuts the first one short
        share = len(self.shared) if self.shared else self.size
        self.batches_per_epoch = math.ceil(share / batch_size)

    def set_epoch(self, epoch: int) -> None:
        if self.shared:
            self.shared.set_epoch(epoch)

    def resume(self, seed: int, batches: int) -> None:
        self.seed, self.skip = seed, batches * self.batch_size
        if self.shared:
            self.shared.seed = seed

    def __iter__(self):
        if self.shared:
            order = list(self.shared)
        else:
            if not self.skip:
                # RandomSampler's own draw, as DataLoader(shuffle=True) makes it
                self.seed = int(torch.empty((), dtype=torch.int64).random_().item())
            generator = torch.Generator().manual_seed(self.seed)
            order = torch.randperm(self.size, generator=generator).tolist()
        skip, self.skip = self.skip, 0
        return iter(order[skip:])

    def __len__(self) -> int:
        return (len(self.shared) if self.shared else self.size) - self.skip


def first_of_each_class(dataset: Dataset, n: int) -> Subset:
    """The first n images of each class (label) of the dataset, in its order, for
    --per-class: MNIST's first 400 of each digit are the 4,000 digits of the
    README's lesson figures."""
    counts, kept = collections.Counter(), []
    for index, label in enumerate(dataset.targets):
        label = int(label)
        if counts[label] < n:
            counts[label] += 1
            kept.append(index)
    if len(kept) == len(dataset):
        say(f"--per-class {n} takes all {len(kept):,} images: no class has more")
    return Subset(dataset, kept)


def data_range(normalize) -> tuple[float, float]:
    """The range into which the recipe's Normalize(mean, std) takes pixels
    in [0, 1], (low, high) over all channels: MNIST's [-0.5, 0.5], CIFAR-10's and
    CelebA's [-1, 1]."""
    mean, std = (torch.tensor(v, dtype=torch.float64) for v in normalize)
    return float(((0 - mean) / std).min()), float(((1 - mean) / std).max())


def kept_walk(normalize, raw: bool = False, unit_eps: bool = False) -> dict:
    """A DDIM's arguments for the walk of a model trained with Normalize(mean, std):
    by default the published one, x_0 kept within the data's range and eps
    re-derived from it; with `raw`, the walk as the model alone takes it; with
    `unit_eps`, this repository's own rule on top, each sample's eps scaled to the
    deviation of a noise draw (ddim.py)."""
    x0_range = None if raw else data_range(normalize)
    return dict(x0_range=x0_range, unit_eps=unit_eps)


def denormalize(x: torch.Tensor, normalize) -> torch.Tensor:
    """Undo the recipe's Normalize(mean, std): back to pixels in [0, 1]."""
    mean, std = (torch.tensor(v, device=x.device).view(-1, 1, 1) for v in normalize)
    return (x * std + mean).clamp(0, 1)


# a grid shows the first ten classes, one row each
GRID_CLASSES = 10


def class_names(dataset) -> list[str]:
    """The names of the dataset's classes, in the order of their labels."""
    # FakeImages draws labels in 0..num_classes-1 but has no names for them
    names = getattr(dataset, "classes", None)
    names = list(names) if names else [str(k) for k in range(dataset.num_classes)]
    if len(names) < 2:
        raise UserError(
            f"--cond: {dataset.root} has one subfolder, so one class ({names[0]}): "
            f"put each class's images in a subfolder of its own"
        )
    return names


def grid_classes(n_classes: int, per_class: int, device) -> torch.Tensor:
    """The labels of a grid: per_class of each of the first ten classes, in order."""
    # (rows,) -> (rows * per_class,): [0, 0, 0, 0, 1, 1, 1, 1, ...]
    rows = torch.arange(min(n_classes, GRID_CLASSES), device=device)
    return rows.repeat_interleave(per_class)


def parse_classes(wanted: list[str], names: list[str]) -> list[int]:
    """The labels of the classes a command line names: names, numbers, or "all"."""
    if "all" in wanted and "all" not in names:
        if len(wanted) > 1:
            raise UserError("--class all already takes every class: give it alone")
        return list(range(len(names)))
    labels = []
    for word in wanted:
        # a name first: an image folder's subfolders may be called 1, 2, ...
        if word in names:
            labels.append(names.index(word))
        elif word.isdigit() and int(word) < len(names):
            labels.append(int(word))
        elif word.isdigit():
            raise UserError(
                f"--class {word}: the model has {len(names)} classes, numbered "
                f"0 to {len(names) - 1}"
            )
        else:
            raise UserError(
                f"--class {word}: the model has no such class; its classes are "
                f"{', '.join(names)} (or their numbers 0 to {len(names) - 1}, or all)"
            )
    return labels
