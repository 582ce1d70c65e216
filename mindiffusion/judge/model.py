"""The digit judge's classifier: a small CNN that reads 28x28 digits as one of the
ten digits or as junk, its shipped weights, and its features for Frechet distances."""
import hashlib
import os

import torch
import torch.nn as nn
from torchvision import transforms

from mindiffusion.training.flags import UserError

WEIGHTS = os.path.join(
    os.path.dirname(__file__), "..", "..", "contents", "mnist_judge.pth"
)
# the eleventh class: not a digit
JUNK = 10
# the images the judge reads: MNIST's digits, and those padded for NaiveUnet
DIGIT_SHAPES = ((1, 28, 28), (1, 32, 32))
# a sample is read as a digit when the judge gives it at least this probability
SURE = 0.9


def conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """A 3x3 convolution that keeps the image's size, batch-normalised, then ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class DigitJudge(nn.Module):
    """A small CNN over 28x28 images in [0, 1]: eleven logits, the ten digits and
    JUNK, from 128 features that the Frechet distance reads."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            # (B, 1, 28, 28) -> (B, 16, 14, 14) -> (B, 32, 7, 7) -> (B, 64, 3, 3)
            conv(1, 16), conv(16, 16), nn.MaxPool2d(2),
            conv(16, 32), conv(32, 32), nn.MaxPool2d(2),
            conv(32, 64), nn.MaxPool2d(2),
            # (B, 64, 3, 3) -> (B, 576) -> (B, 128)
            nn.Flatten(), nn.Linear(576, 128), nn.ReLU(),
        )
        self.classify = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, JUNK + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


def as_digits(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as the judge reads them: (B, 1, 32, 32), MNIST padded for
    NaiveUnet, or (B, 1, 28, 28) -> (B, 1, 28, 28)."""
    if images.shape[1:] not in DIGIT_SHAPES:
        raise UserError(
            f"the judge reads MNIST digits, 1x28x28 or 1x32x32, not "
            f"{'x'.join(map(str, images.shape[1:]))} images"
        )
    return transforms.functional.center_crop(images, [28, 28])


def load_judge(path: str = WEIGHTS) -> DigitJudge:
    """The judge with the weights at path, ready to read."""
    judge = DigitJudge()
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder: give the judge's weights, a .pth file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        judge.load_state_dict(state["model"])
    except FileNotFoundError:
        raise UserError(f"no judge weights at {path}: train some, --train") from None
    except Exception:
        # an empty file ends early (EOFError), another kind fails its own way
        raise UserError(f"{path} holds no weights of the digit judge") from None
    return judge.eval()


@torch.no_grad()
def read(judge: DigitJudge, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The judge's (B, 11) probabilities and (B, 128) features of images in [0, 1]."""
    features = judge.features(as_digits(images))
    return judge.classify(features).softmax(1), features


class JudgeFeatures(nn.Module):
    """The judge's 128 features of the 8-bit RGB images that mindiffusion.fid hands
    its extractor, in a 1-tuple as torch-fidelity's Inception gives its own."""

    def __init__(self, path: str = WEIGHTS) -> None:
        super().__init__()
        self.judge = load_judge(path)
        with open(path, "rb") as file:
            digest = hashlib.sha256(file.read()).hexdigest()[:16]
        # for fid's cache key: other weights, other statistics
        self.name = f"mindiffusion digit judge, 128 features, weights {digest}"

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor]:
        # (B, 3, H, W) uint8, a grey image in each channel -> (B, 1, H, W) in [0, 1]
        return (read(self.judge, pixels[:, :1].float() / 255)[1],)
