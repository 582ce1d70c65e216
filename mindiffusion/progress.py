"""Progress bars for waits that call the noise model many times, such as a grid.

`DDPM.sample` keeps the notes' loop; the bar counts the model's calls from outside,
with a forward pre-hook, as `mindiffusion.sample --progress` takes its snapshots.
"""
import contextlib

import torch.nn as nn
from tqdm import tqdm


def model_calls(ddpm: nn.Module) -> int:
    """How many times one `sample` calls the model: n_T, or a DDIM's n_steps."""
    return getattr(ddpm, "n_steps", None) or ddpm.n_T


@contextlib.contextmanager
def timesteps(ddpm: nn.Module, description: str, samples: int = 1):
    """A bar over the timesteps of `samples` calls of ddpm.sample, while it lasts."""
    bar = tqdm(total=samples * model_calls(ddpm), desc=description)

    def count_call(module, inputs) -> None:
        bar.update()

    handle = ddpm.eps_model.register_forward_pre_hook(count_call)
    try:
        yield bar
    finally:
        handle.remove()
        bar.close()
