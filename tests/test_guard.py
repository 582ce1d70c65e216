"""The guard before each optimizer step: it reads the step's loss and the largest
gradient magnitude, max |g|, which is infinite exactly when a gradient is, and lets
a finite step through untouched."""

import math

import pytest
import torch
import torch.nn as nn

from mindiffusion.training.flags import UserError
from mindiffusion.training.steps import Guard


def layers():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])


def test_a_finite_step_passes_untouched_and_gives_its_loss():
    model = layers()
    optim = torch.optim.Adam(model.parameters())
    guard = Guard(optim, scaled=False)
    loss = model(torch.randn(8, 64)).square().mean()
    loss.backward()
    before = [p.grad.clone() for p in model.parameters()]
    assert guard.check(loss, 0, 1) == loss.item()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before))


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_one_gradient_not_finite_is_divergence_named_by_its_step(bad):
    model = layers()
    guard = Guard(torch.optim.Adam(model.parameters()), scaled=False)
    loss = model(torch.randn(8, 64)).square().mean()
    loss.backward()
    # a single entry of the last layer's bias
    model[3].bias.grad[5] = bad
    with pytest.raises(UserError) as error:
        guard.check(loss, 2, 7)
    norm = "nan" if math.isnan(bad) else "inf"
    assert f"training diverged at epoch 2, step 7: the loss is {loss.item()}" in str(
        error.value
    )
    assert f"the gradient norm {norm}" in str(error.value)


def test_under_fp16_an_overflow_is_left_to_the_scaler():
    model = layers()
    guard = Guard(torch.optim.Adam(model.parameters()), scaled=True)
    loss = model(torch.randn(8, 64)).square().mean()
    loss.backward()
    model[0].weight.grad[0, 0] = math.inf
    # the scaler skips the step and lowers its scale: no divergence yet
    assert guard.check(loss, 0, 1) == loss.item()
    assert guard.overflows == 1
