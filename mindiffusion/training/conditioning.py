"""The classes of a class-conditional run (--cond): their names, the rows of the
grids, and the classes a command line asks for by number or by name.

The guided noise prediction itself, eq. 6 of Ho & Salimans (2021), is in
`DDPM.guided_eps`.
"""
import torch
from torchvision.datasets.folder import find_classes

from mindiffusion.training.data import explain_image_folder
from mindiffusion.training.errors import UserError

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
