"""Progress bars for waits that call the noise model many times, such as a grid,
and snapshots of the walk from x_T to x_0.

`DDPM.sample` keeps the notes' loop; the bar counts the model's calls from outside,
with a forward pre-hook, and `model_inputs` keeps the states it passes the same way.
"""
import contextlib
import itertools

import torch.nn as nn
from tqdm import tqdm


def model_calls(ddpm: nn.Module) -> int:
    """How many times one `sample` calls the model: n_T, or a DDIM's n_steps."""
    return getattr(ddpm, "n_steps", None) or ddpm.n_T


@contextlib.contextmanager
def timesteps(
    ddpm: nn.Module, description: str, samples: int = 1, calls: int | None = None
):
    """A bar over the timesteps of `samples` calls of ddpm.sample, or over `calls`
    calls of its model, while it lasts."""
    bar = tqdm(total=calls or samples * model_calls(ddpm), desc=description)

    def count_call(module, inputs) -> None:
        bar.update()

    handle = ddpm.eps_model.register_forward_pre_hook(count_call)
    try:
        yield bar
    finally:
        handle.remove()
        bar.close()


@contextlib.contextmanager
def model_inputs(ddpm: nn.Module, calls: list[int], n: int):
    """While it lasts, a dict that gets the state x_t that ddpm.sample passes its
    model at each call numbered in `calls` (0 is the first, whose input is x_T):
    the first n images, as many as the walk samples."""
    inputs_at, counter = {}, itertools.count()

    def keep_input(module, inputs) -> None:
        call = next(counter)
        if call in calls:
            # guided (w > 0), the model sees x_t twice, for eps(x_t, c) and
            # eps(x_t, null): the first n are the images
            inputs_at[call] = inputs[0][:n].clone()

    handle = ddpm.eps_model.register_forward_pre_hook(keep_input)
    try:
        yield inputs_at
    finally:
        handle.remove()
