"""What only DDIM's deterministic walk (eta 0) can draw: there each x_T leads to one
image, so that

- two x_T, and the spherical path between them, turn one image into another;
- the same x_T walked in 10, 20, 50 or 100 steps comes down to the same image;
- an image walked up the same steps reversed finds its x_T, and comes back down
  to (nearly) itself.

Each figure's computation returns its images, (frames, n, C, H, W), for the plot.
"""
import torch

from mindiffusion.ddim import DDIM, slerp
from mindiffusion.judge.model import JUNK, load_judge, read

# the interpolation's frames, from the first x_T to the second
FRAMES = 9
# the consistency figure's step counts
STEP_COUNTS = (10, 20, 50, 100)


def interpolation(
    ddim: DDIM,
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    c: torch.Tensor | None,
    guide_w: float,
    frames: int = FRAMES,
) -> tuple[torch.Tensor, list[float]]:
    """The images the walk draws from x_T spherically between x_a and x_b, (n, C,
    H, W) each, at `frames` fractions from 0 to 1: (frames, n, C, H, W), and the
    fractions."""
    fractions = torch.linspace(0, 1, frames).tolist()
    # one slerp per image pair: (n, C, H, W) at each fraction
    x_T = [
        torch.stack([slerp(a, b, f) for a, b in zip(x_a, x_b)]) for f in fractions
    ]
    return torch.stack([ddim.walk(x, c, guide_w) for x in x_T]), fractions


def consistency(
    ddim: DDIM,
    x_T: torch.Tensor,
    c: torch.Tensor | None,
    guide_w: float,
    step_counts: tuple[int, ...] = STEP_COUNTS,
) -> torch.Tensor:
    """The images of the same x_T (n, C, H, W) walked in each of step_counts
    (those up to n_T): (len(step_counts), n, C, H, W)."""
    images = []
    for count in step_counts:
        walk = DDIM.of(ddim, count, eta=0.0, x0_range=ddim.x0_range,
                       unit_eps=ddim.unit_eps)
        images.append(walk.walk(x_T, c, guide_w))
    return torch.stack(images)


def inversion(
    ddim: DDIM, x_0: torch.Tensor, c: torch.Tensor | None, guide_w: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The x_T that the walk finds for the images x_0 (n, C, H, W), walking up,
    and what it draws from them, walking down: each (n, C, H, W)."""
    x_T = ddim.invert(x_0, c, guide_w)
    return x_T, ddim.walk(x_T, c, guide_w)


def digit_captions(images: torch.Tensor) -> list[list[str]]:
    """What the digit judge reads in each image of (frames, n, 1, H, W) in [0, 1]:
    "3, 0.98", or "junk, 0.87", for each frame and image."""
    judge = load_judge()
    frames, n = images.shape[:2]
    # (frames, n, 1, H, W) -> (frames * n, 1, H, W), the judge's batch
    probs, _ = read(judge, images.flatten(0, 1).cpu())
    sure, label = probs.max(dim=1)
    words = [
        f"{'junk' if k == JUNK else k}, {p:.2f}"
        for k, p in zip(label.tolist(), sure.tolist())
    ]
    return [words[j * n : (j + 1) * n] for j in range(frames)]
