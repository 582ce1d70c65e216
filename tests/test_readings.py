"""The guard's readings: the loss and the gradients' norm of each step, taken as
backward ends, in a plain run and across the buckets that torchrun's DDP averages."""

import math

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from mindiffusion.readings import StepReadings


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
