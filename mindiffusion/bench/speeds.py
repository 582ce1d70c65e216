"""How each row's speed is measured: the bare training step, the sampler's step,
and the trainer's own loop."""
import contextlib
import csv
import glob
import os
import tempfile
import time

import torch
import torch.nn as nn

from mindiffusion.bench.setups import BETAS, KNOB_DTYPES, N_T, Setup
from mindiffusion.ddpm import DDPM
from mindiffusion.train import train
from mindiffusion.training.cli import DEFAULTS


def synchronize(device: torch.device) -> None:
    """Wait for the GPU, whose kernels run behind the Python that launched them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def tf32_matmuls(enabled: bool):
    """While it lasts, float32 matmuls on CUDA in TF32, if `enabled`; cuDNN's
    convolutions already take TF32 by torch's default."""
    previous = torch.backends.cuda.matmul.allow_tf32
    if enabled:
        torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def train_throughput(
    ddpm: DDPM, x: torch.Tensor, steps: int, warmup: int, knobs: frozenset = frozenset()
) -> float:
    """Images per second of Algorithm 1 training steps on batch x, after `warmup`
    untimed steps, with the knobs bf16, fp16 (with loss scaling) and fused_adam."""
    # None, Adam's default, is its foreach implementation
    fused = True if "fused_adam" in knobs else None
    optim = torch.optim.Adam(ddpm.parameters(), lr=1e-5, fused=fused)
    dtype = next((KNOB_DTYPES[k] for k in KNOB_DTYPES if k in knobs), None)
    # float16 needs its loss scaled, so that small gradients do not round to zero;
    # disabled, the scaler passes the loss and the step through
    scaler = torch.amp.GradScaler(x.device.type, enabled=dtype == torch.float16)
    ddpm.train()
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(x.device)
            start = time.perf_counter()
        optim.zero_grad()
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            loss = ddpm(x)
        scaler.scale(loss).backward()
        scaler.step(optim)
        scaler.update()
    synchronize(x.device)
    return steps * len(x) / (time.perf_counter() - start)


def train_speed(
    setup: Setup, knobs: frozenset, device, batch_size: int, steps: int, warmup: int
) -> float:
    """Images per second of the setup's model trained with `knobs` on a random
    batch already on the device, so that data loading is left out."""
    torch.manual_seed(0)
    ddpm = DDPM(setup.model(), BETAS, n_T=N_T).to(device)
    x = torch.randn(batch_size, *setup.size, device=device)
    if "channels_last" in knobs:
        ddpm.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    if "compile" in knobs:
        # in place, as the trainer's --compile does
        ddpm.eps_model.compile()
    with tf32_matmuls("tf32" in knobs):
        return train_throughput(ddpm, x, steps, warmup, knobs)


def sampling_step_time(
    eps_model: nn.Module, n_sample: int, size, steps: int, warmup: int, device
) -> float:
    """Seconds per step of Algorithm 2 for n_sample images, after `warmup` steps."""
    eps_model.eval()
    DDPM(eps_model, BETAS, n_T=warmup).to(device).sample(n_sample, size, device)
    timed = DDPM(eps_model, BETAS, n_T=steps).to(device)
    synchronize(device)
    start = time.perf_counter()
    timed.sample(n_sample, size, device)
    synchronize(device)
    return (time.perf_counter() - start) / steps


def sample_speed(
    setup: Setup, mode: str | None, device, n_sample: int, steps: int, warmup: int
) -> float:
    """Seconds per sampler step of the setup's model, eager (mode None) or compiled
    in torch.compile's `mode`."""
    torch.manual_seed(0)
    eps_model = setup.model().to(device)
    if mode is not None:
        eps_model = torch.compile(eps_model, mode=mode)
    return sampling_step_time(eps_model, n_sample, setup.size, steps, warmup, device)


def loop_settings(
    setup: Setup, flags: dict, device, batch_size: int, steps: int
) -> dict:
    """The settings of a short run of the trainer on the setup: two epochs of
    `steps` steps on fake data, its grid one DDIM step, no saves within an epoch,
    with the trainer's default number of DataLoader workers and the flags `flags`."""
    fixed = dict(
        device=str(device), batch_size=batch_size, n_epoch=2, n_T=N_T,
        fake_data=steps * batch_size, grid_every=2, grid_sampler="ddim",
        grid_steps=1, save_every=None,
    )
    return {"num_workers": DEFAULTS["num_workers"], **setup.preset, **fixed, **flags}


def loop_speed(setup: Setup, settings: dict, out: str) -> float:
    """Images per second of the second epoch of the trainer run in-process on the
    setup with `settings` into the folder `out`, as its record has it: the first
    epoch holds the warm-up and the compiling."""
    train(setup.dataset, **settings, out=out)
    (log,) = glob.glob(os.path.join(out, "*_log.csv"))
    with open(log, newline="") as file:
        epochs = list(csv.DictReader(file))
    return float(epochs[1]["images_per_s"])


def loop_in_temporary_folder(setup: Setup, settings: dict) -> float:
    """loop_speed into a folder of its own, removed after: a new run refuses to
    overwrite a checkpoint."""
    with tempfile.TemporaryDirectory(prefix="bench_") as out:
        return loop_speed(setup, settings, out)
