"""The setups the bench measures, the names of its rows, and the plan of a run."""
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn

from mindiffusion.dummy import DummyEpsModel
from mindiffusion.training.recipes import LAPTOP
from mindiffusion.unet import NaiveUnet

BETAS = (1e-4, 0.02)
# the notes' diffusion steps, for the bare step and the trainer's runs alike
N_T = 1000
# a knob joins `best` when it alone trains at least this much faster than the default
BEST_AT_LEAST = 1.03
# the training knobs, each measured alone
TRAIN_KNOBS = ("bf16", "fp16", "channels_last", "compile", "fused_adam", "tf32")
KNOB_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# the sampling rows: torch.compile's mode, or None for the eager model
SAMPLE_MODES = {"default": None, "compile": "default", "cuda_graphs": "reduce-overhead"}
# the train rows, in the order of their tables: best takes the knobs that paid alone
TRAIN_ROWS = ("default", *TRAIN_KNOBS, "fast", "best")
# the loop rows: the bare row they are compared with, and their extra Run flags
# (loop_fast's are fast_settings(device))
LOOP_ROWS = {
    "loop_default": ("default", {}),
    "loop_fast": ("fast", None),
    "loop_ema": ("default", {"ema": 0.999}),
}
ROW_NAMES = (*TRAIN_ROWS, "cuda_graphs", *LOOP_ROWS)
# the kinds of row, in the order of their tables
UNITS = {"train": "img/s", "sample": "s/step", "loop": "img/s"}
# knobs that need CUDA, and why
CUDA_ONLY = {
    "tf32": "TF32 is a CUDA tensor-core format",
    "cuda_graphs": "CUDA graphs need a CUDA device",
}


class Setup(NamedTuple):
    """A setup of the notes: its noise model, image shape, batch size, grid size, and
    the trainer's dataset that trains it, with the settings of its preset."""

    name: str
    model: Callable[[], nn.Module]
    size: tuple[int, int, int]
    batch_size: int
    n_sample: int
    dataset: str
    preset: dict
# --laptop's settings, but for its device, which is the bench's; its precision,
# memory format and average, which are each row's own, so that loop_default is the
# bare default's; and its timed grids, which would land in a timed loop
OWN = ("device", "amp", "ema", "channels_last", "grid_minutes")
LAPTOP_RUN = {k: v for k, v in LAPTOP.items() if k not in OWN}
# the most telling first, so that a run cut short by a time limit has them
SETUPS = [
    Setup("CIFAR-10 NaiveUnet(3,3,128) 32x32", lambda: NaiveUnet(3, 3, 128),
          (3, 32, 32), 512, 8, "cifar10", {}),
    Setup("MNIST DummyEpsModel(1) 28x28", lambda: DummyEpsModel(1),
          (1, 28, 28), 128, 16, "mnist", {}),
    Setup("CelebA NaiveUnet(3,3,128) 128x128", lambda: NaiveUnet(3, 3, 128),
          (3, 128, 128), 32, 8, "celeba", {}),
    Setup(f"Laptop MNIST NaiveUnet(1,1,{LAPTOP['n_feat']}) 32x32",
          lambda: NaiveUnet(1, 1, LAPTOP["n_feat"]), (1, 32, 32),
          LAPTOP["batch_size"], 16, "mnist", LAPTOP_RUN),
]


class Plan(NamedTuple):
    """What the command line asks for: the rows, their sizes and the device."""

    device: torch.device
    names: frozenset[str]
    batch_size: int | None
    n_sample: int | None
    steps: int
    warmup: int
    # the Run flags of --fast here, and the same as training knobs
    fast_settings: dict
    fast: frozenset[str]
    native_bf16: bool
    # the rows --quick leaves out, each with why, and the one setup whose rows besides
    # the defaults it measures (None: every setup's)
    left_out: dict[str, str]
    knob_setup: str | None

    def asks_for(self, name: str, setup: Setup) -> bool:
        """Whether the row `name` of `setup` is to be measured."""
        mine = self.knob_setup in (None, setup.name) or name == "default"
        return name in self.names and mine
