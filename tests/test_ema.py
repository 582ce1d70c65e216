"""--ema: the averaged weights against the closed-form moving average of the weights
training went through, the grid drawn from them, and --resume carrying them on, for
each of the three scripts, since each carries its own copy of the loop."""

import functools

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from conftest import cheap_ddpm, narrow_unets
from mindiffusion.run import run_training
from train_celeba import train_celeba
from train_cifar10 import train_cifar10
from train_mnist import train_mnist

# two steps of 2 fake images per epoch, on the CPU; lr 0.1 makes each step show
RUN = dict(device="cpu", batch_size=2, n_T=2, fake_data=4, num_workers=0, seed=0)
RUN["lr"] = 0.1
# MNIST with a narrow UNet: the loop is the script's own, the model far smaller
small_mnist = functools.partial(train_mnist, eps_model="unet", n_feat=8)
SCRIPTS = [small_mnist, train_cifar10, train_celeba]


@pytest.fixture
def sampled_by(monkeypatch):
    """Record which DDPM draws each grid, and train on a cheap loss that moves every
    weight at each step."""
    samplers = []
    cheap_ddpm(
        monkeypatch, on_sample=lambda ddpm, size: samplers.append(ddpm), moving=True
    )
    narrow_unets(monkeypatch)
    return samplers


@pytest.mark.parametrize("train", SCRIPTS)
def test_ema_is_the_moving_average_of_the_weights_and_draws_the_grid(
    train, tmp_path, sampled_by
):
    trajectory = []

    def keep_weights(optimizer, args, kwargs):
        trajectory.append(
            [p.detach().clone() for p in optimizer.param_groups[0]["params"]]
        )

    handle = register_optimizer_step_post_hook(keep_weights)
    try:
        ddpm = run_training(train, n_epoch=1, out=str(tmp_path), ema=0.5, **RUN)
    finally:
        handle.remove()
    assert len(trajectory) == 2
    # e_1 = w_1, then e_k = 0.5 e_{k-1} + 0.5 w_k
    expected = trajectory[0]
    for weights in trajectory[1:]:
        expected = [0.5 * e + 0.5 * w for e, w in zip(expected, weights)]

    (checkpoint,) = tmp_path.glob("*.pth")
    saved = torch.load(checkpoint, weights_only=True)
    names = [name for name, _ in ddpm.named_parameters()]
    for name, value in zip(names, expected):
        torch.testing.assert_close(saved["ema"][f"module.{name}"], value)
        assert torch.equal(saved["model"][name], trajectory[-1][names.index(name)])
    # the grid came from the average, not from the trained weights
    (sampler,) = sampled_by
    assert sampler is not ddpm
    last = names[-1]
    torch.testing.assert_close(sampler.get_parameter(last), expected[names.index(last)])
    assert not torch.equal(sampler.get_parameter(last), ddpm.get_parameter(last))


@pytest.mark.parametrize("train", SCRIPTS)
def test_resume_carries_the_average_on(train, tmp_path, sampled_by, capsys):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    run_training(train, n_epoch=2, out=str(straight), ema=0.5, **RUN)
    run_training(train, n_epoch=1, out=str(halves), ema=0.5, **RUN)
    run_training(train, n_epoch=2, out=str(halves), ema=0.5, resume=True, **RUN)
    (path,) = straight.glob("*.pth")
    one_go = torch.load(path, weights_only=True)["ema"]
    resumed = torch.load(halves / path.name, weights_only=True)["ema"]
    assert one_go.keys() == resumed.keys()
    for name in one_go:
        assert torch.equal(one_go[name], resumed[name]), name
    assert int(resumed["n_averaged"]) == 4


def test_ema_turned_on_when_resuming_starts_from_the_resumed_weights(
    tmp_path, sampled_by, capsys
):
    run_training(train_cifar10, n_epoch=1, out=str(tmp_path), **RUN)
    assert torch.load(tmp_path / "ddpm_cifar.pth", weights_only=True)["ema"] is None
    ddpm = run_training(
        train_cifar10, n_epoch=2, out=str(tmp_path), ema=0.5, resume=True, **RUN
    )
    assert (
        "--ema: the checkpoint has no average yet: it starts from these weights"
        in capsys.readouterr().out
    )
    saved = torch.load(tmp_path / "ddpm_cifar.pth", weights_only=True)
    assert int(saved["ema"]["n_averaged"]) == 2
    assert not torch.equal(
        saved["ema"]["module.eps_model.out.weight"], ddpm.eps_model.out.weight
    )
