"""The judge's figures: the share of samples read as digits, the distinct digits, the
digit score (an Inception Score), the share drawn as asked; and the images of a grid
PNG, read back cell by cell."""
import math

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from mindiffusion.judge.model import JUNK, SURE
from mindiffusion.training.flags import UserError

# torchvision's make_grid puts 2 pixels between images and around them
PAD = 2


def digit_score(probs: torch.Tensor) -> float:
    """The Inception Score exp(E_x KL(p(y|x) || p(y))) over the ten digits, (B, 11)
    probabilities -> a number from 1 to 10. A sample's junk probability counts as no
    digit in particular: it is spread evenly over the ten."""
    p = probs[:, :JUNK] + probs[:, JUNK:] / JUNK
    marginal = p.mean(0, keepdim=True)
    kl = (p * (p.clamp_min(1e-12).log() - marginal.clamp_min(1e-12).log())).sum(1)
    return math.exp(kl.mean().item())


def figures(probs: torch.Tensor, asked: torch.Tensor | None) -> dict:
    """The judge's figures of (B, 11) probabilities; with the (B,) digits asked
    for, the share drawn as asked, surely."""
    confidence, label = probs.max(1)
    sure = (label != JUNK) & (confidence >= SURE)
    result = dict(
        samples=len(probs),
        digits=int(sure.sum()),
        distinct=len(label[sure].unique()),
        score=digit_score(probs),
    )
    if asked is not None:
        result["as_asked"] = int((sure & (label == asked)).sum())
    return result


def grid_images(path: str) -> tuple[torch.Tensor, int]:
    """The images of a grid PNG that make_grid wrote, row by row: (N, 1, S, S) in
    [0, 1] for S of 32 or 28, every cell of the grid counted, a black one as well as
    the empty cells that end a short row; and the grid's number of rows. A grid
    that `sample` enlarged is read at its native size."""
    grid = native_size(grey_pixels(path))
    height, width = grid.shape[1:]
    sides = [side for side in (32, 28) if cells_fit(height, width, side)]
    if not sides:
        raise UserError(
            f"{path} is {width}x{height}, not a grid of 28x28 or 32x32 images"
        )
    # where both fit (a 512-pixel side is 15 cells of 32 or 17 of 28), the side
    # whose padding is black throughout; a cut through digits is not
    size = min(sides, key=lambda side: padding_of(grid, side).max().item())
    step = size + PAD
    # (1, H, W) -> (1, rows, columns, S, S): each cell, the padding between dropped
    cells = grid[:, PAD:, PAD:].unfold(1, size, step).unfold(2, size, step)
    # -> (rows * columns, 1, S, S), row by row
    images = cells.permute(1, 2, 0, 3, 4).reshape(-1, 1, size, size)
    return images, cells.shape[1]


def grey_pixels(path: str) -> torch.Tensor:
    """The PNG at path as grey pixels (1, H, W) in [0, 1]: 8-bit and 16-bit alike.
    A colour image, whose channels differ, holds no MNIST digits."""
    try:
        image = Image.open(path)
        # 16-bit grey opens as I;16 (or I), which convert("L") would clip to white
        if image.mode.startswith("I"):
            pixels = np.asarray(image, dtype=np.float64) / 65535
            return torch.from_numpy(pixels).float().unsqueeze(0)
        rgb = transforms.functional.pil_to_tensor(image.convert("RGB"))
        grid = transforms.functional.pil_to_tensor(image.convert("L"))
    except OSError:
        raise UserError(f"{path} is not an image that can be read") from None
    # (3, H, W): a grey image has the same value in each channel
    if (rgb.amax(0) - rgb.amin(0)).max() > 0:
        raise UserError(
            f"{path} is in colour, such as CIFAR-10's or CelebA's grids: the judge "
            f"reads MNIST digits"
        )
    return grid.float() / 255


def native_size(grid: torch.Tensor) -> torch.Tensor:
    """grid (1, H, W) at its native size: where each pixel of it is a block of k x k
    equal pixels, as `sample` enlarges a grid by a whole factor, one of each, for
    the largest k that leaves a grid of whole cells (a black grid is blocks at any
    k)."""
    height, width = grid.shape[1:]
    for k in range(min(height, width) // PAD, 1, -1):
        if height % k or width % k or not whole_cells(height // k, width // k):
            continue
        small = grid[:, ::k, ::k]
        # each pixel of the small grid back as a k x k block
        if torch.equal(small.repeat_interleave(k, 1).repeat_interleave(k, 2), grid):
            return small
    return grid


def whole_cells(height: int, width: int) -> bool:
    """Whether a grid of height x width pixels holds at least one cell of 28 or 32
    pixels a side, with make_grid's padding around each."""
    return any(
        min(height, width) > side and cells_fit(height, width, side)
        for side in (32, 28)
    )


def cells_fit(height: int, width: int, side: int) -> bool:
    """Whether both sides of a grid are PAD + k (side + PAD) pixels: cells of
    `side` pixels, make_grid's padding before each and after the last."""
    return (height - PAD) % (side + PAD) == 0 and (width - PAD) % (side + PAD) == 0


def padding_of(grid: torch.Tensor, side: int) -> torch.Tensor:
    """The pixels of grid (1, H, W) that are padding when its cells are side
    pixels wide: the PAD rows and columns before each cell and after the last."""
    step = side + PAD
    rows = [r for r in range(grid.shape[1]) if r % step < PAD]
    columns = [c for c in range(grid.shape[2]) if c % step < PAD]
    return torch.cat([grid[:, rows, :].flatten(), grid[:, :, columns].flatten()])


def rows_as_digits(images: torch.Tensor, rows: int, path: str) -> torch.Tensor:
    """The digit each image of a grid of ten rows was asked for: its row's."""
    if rows != 10 or len(images) % 10:
        raise UserError(f"--rows-are-classes: {path} has {rows} rows of images, "
                        f"not ten full ones")
    # (10,) -> (N,): each row's digit for every image in it
    return torch.arange(10).repeat_interleave(len(images) // 10)
