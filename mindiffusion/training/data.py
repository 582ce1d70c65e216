"""The training data: a dataset that is missing explained in one sentence, the
loader that a prepared run trains from, rebuilt from the notes' DataLoader, and the
classes of a class-conditional run (--cond): their names, the rows of the grids,
and the classes a command line asks for by number or by name.

The guided noise prediction itself, eq. 6 of Ho & Salimans (2021), is in
`DDPM.guided_eps`.
"""
import collections
import contextlib
import io
import itertools
import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes
from tqdm import tqdm

from mindiffusion.training.devices import (
    process_rank,
    say,
    split_batch,
    world_size,
)
from mindiffusion.training.flags import UserError
from mindiffusion.training.signals import ignore_stop_signals


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
        raise UserError(f"no images found under {root}: {layout}") from None


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


def real_images(x: torch.Tensor, dataset: Dataset, n: int = 8) -> torch.Tensor:
    """The first n images of batch x; a shorter batch is topped up from the dataset."""
    if len(x) >= n:
        return x[:n]
    top_up = [dataset[j % len(dataset)][0] for j in range(n - len(x))]
    return torch.cat([x, torch.stack(top_up).to(x.device)])


class ResumableSampler(DistributedSampler):
    """DistributedSampler, whose shuffle depends on its seed and the epoch alone, that
    starts the epoch `epoch` after `batches` batches.

    The batches done are skipped here, as indices: they are never loaded.
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, seed: int, epoch: int, batches: int
    ) -> None:
        super().__init__(dataset, world_size(), process_rank(), seed=seed)
        self.batch_size, self.start, self.skip = batch_size, (epoch, batches), 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        start_epoch, batches = self.start
        self.skip = batches * self.batch_size if epoch == start_epoch else 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return super().__len__() - self.skip


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


class PreparedLoader:
    """The notes' DataLoader, rebuilt for a run: shuffled by the run's seed alone and
    started where a resumed checkpoint stopped, shared out among torchrun's ranks,
    with workers that leave stop signals to the training process and, on CUDA,
    page-locked batches.

    Each pass is the next epoch's, and calls epoch_started() before its first batch.
    It yields the notes' (x, labels) pairs.
    """

    def __init__(
        self,
        dataloader: DataLoader,
        device: torch.device,
        num_workers: int,
        seed: int,
        epoch: int,
        batches: int,
        epoch_started: Callable[[], None],
    ) -> None:
        self.dataset, self.epoch_started = dataloader.dataset, epoch_started
        # --batch-size is the global batch, shared out among the ranks
        self.batch_size = split_batch(dataloader.batch_size)
        self.sampler = ResumableSampler(
            self.dataset, self.batch_size, seed, epoch, batches
        )
        on_cuda = device.type == "cuda"
        self.loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            # the workers' seeds come from a generator of their own, so that starting
            # workers never draws from the one that makes the training noise
            generator=torch.Generator(),
            worker_init_fn=ignore_stop_signals,
            # page-locked batches copy to the GPU while it computes
            pin_memory=on_cuda,
            # the workers start once, rather than at every epoch
            persistent_workers=num_workers > 0,
        )
        # whole epochs, before the first one is cut short by a resume
        self.batches_per_epoch = len(self.loader)
        self.epoch, self.epoch_pass = epoch, None
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        # kept, so that `close` can end a pass cut short by a stop
        self.epoch_pass = self.batches()
        return self.epoch_pass

    def close(self) -> None:
        """End the loader's worker processes now. They ignore the SIGTERM with
        which Python's exit would end them, and wait for it to no end otherwise."""
        if self.epoch_pass is not None:
            self.epoch_pass.close()
        # the last reference to the loader: its workers end with it
        self.loader = None

    def batches(self):
        """One epoch's (x, labels) batches."""
        if process_rank() == 0:
            # above the progress bar that tqdm(dataloader) has just drawn
            tqdm.write(f"Epoch {self.epoch} : ")
        self.epoch_started()
        yield from self.loader
        # a new shuffle at each epoch, the same one on every rank
        self.epoch += 1
        self.sampler.set_epoch(self.epoch)


def data_range(normalize) -> tuple[float, float]:
    """The range into which the training script's Normalize(mean, std) takes pixels
    in [0, 1], (low, high) over all channels: MNIST's [-0.5, 0.5], CIFAR-10's and
    CelebA's [-1, 1]."""
    mean, std = (torch.tensor(v, dtype=torch.float64) for v in normalize)
    return float(((0 - mean) / std).min()), float(((1 - mean) / std).max())


def kept_walk(normalize, raw: bool = False) -> dict:
    """A DDIM's arguments for the kept walk of a model trained with Normalize(mean,
    std): x_0 within the data's range and eps at the scale of a noise draw
    (ddim.py); with `raw`, none, the walk as the model alone takes it."""
    return {} if raw else dict(x0_range=data_range(normalize), unit_eps=True)


def denormalize(x: torch.Tensor, normalize) -> torch.Tensor:
    """Undo the training script's Normalize(mean, std): back to pixels in [0, 1]."""
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


def folder_classes(root: str | None, fake_data: int | None) -> int:
    """How many classes --cond trains on: the image folder's subfolders, or the ten
    of FakeImages."""
    if fake_data:
        return 10
    with explain_image_folder(root):
        return len(find_classes(root)[0])


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
