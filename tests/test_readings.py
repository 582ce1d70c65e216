"""The guard's readings: the loss and the gradients' norm of each step, taken as
backward ends, in a plain run and across the buckets that torchrun's DDP averages;
on a GPU, the loop's lines around each step never wait for it."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from conftest import narrow_unets
from mindiffusion.training import run as run_module
from mindiffusion.training.steps import StepReadings
from mindiffusion.training.cli import run_training
from train_cifar10 import train_cifar10

NO_GPU = "only a CUDA GPU can show whether the GPU waits, and this machine has none"


def layers():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])


def largest_gradient(model: nn.Module) -> float:
    return max(p.grad.abs().max().item() for p in model.parameters())


def test_the_norm_is_the_largest_gradient_magnitude_of_the_step():
    model = layers()
    readings = StepReadings(model)
    for _ in range(2):
        model.zero_grad()
        loss = model(torch.randn(8, 64)).square().mean()
        readings.take_loss(loss)
        loss.backward()
        assert readings.read() == (loss.item(), largest_gradient(model))


def test_under_ddp_the_norm_covers_every_bucket_of_averaged_gradients():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = layers()
        # buckets of 16 KB hold one layer's weight each: 64 x 64 x 4 bytes
        ddp = DistributedDataParallel(model, bucket_cap_mb=0.016)
        readings = StepReadings(ddp)
        averaged = readings.bucket_averaged
        buckets = []
        readings.bucket_averaged = lambda future: buckets.append(1) or averaged(future)
        # DDP sends one bucket at the first step, and sizes them after it
        for step, poisoned in enumerate((False, False, True)):
            ddp.zero_grad()
            buckets.clear()
            if poisoned:
                # a NaN in the last layer's gradients alone: the first bucket sent
                model[-1].bias.register_hook(lambda g: g * math.nan)
            loss = ddp(torch.randn(8, 64)).square().mean()
            readings.take_loss(loss)
            loss.backward()
            if step > 0:
                assert len(buckets) > 1
            loss_value, norm = readings.read()
            assert loss_value == loss.item()
            if poisoned:
                assert math.isnan(norm)
            else:
                assert norm == largest_gradient(model)
    finally:
        dist.destroy_process_group()


def never_waits(method):
    """`method`, run with CUDA's sync debug mode raising at any wait for the GPU."""

    def strict(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return method(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    return strict


@pytest.mark.cuda(reason=NO_GPU)
@pytest.mark.parametrize("flags", [{}, dict(ema=0.999), dict(amp="fp16")])
def test_on_cuda_the_lines_around_a_step_never_wait_for_the_gpu(
    flags, tmp_path, monkeypatch
):
    narrow_unets(monkeypatch)
    for cls, name in [
        (run_module.Run, "check_gradients"),
        (run_module.Run, "after_step"),
        (StepReadings, "take_loss"),
        (StepReadings, "gradients_done"),
    ]:
        monkeypatch.setattr(cls, name, never_waits(getattr(cls, name)))
    run_training(
        train_cifar10, n_epoch=1, device="cuda", batch_size=4, n_T=10,
        out=str(tmp_path), fake_data=12, num_workers=0, grid_sampler="ddim",
        grid_steps=1, **flags,
    )
    rows = (tmp_path / "ddpm_cifar_log.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("0,3,")
