"""--ema: the averaged weights against the closed-form moving average of the weights
training went through, the grid drawn from them, and --resume carrying them on, for
each of the three datasets' runs of the trainer."""

from fractions import Fraction

import pytest
import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from conftest import cheap_ddpm, narrow_unets
from mindiffusion.training.steps import averaged_copy, warmup_decay
import mindiffusion.train as trainer


# two steps of 2 fake images per epoch, on the CPU; lr 0.1 makes each step show
RUN = dict(device="cpu", batch_size=2, n_T=2, fake_data=4, num_workers=0, seed=0)
RUN["lr"] = 0.1
# MNIST with a narrow UNet: the loop is the same, the model far smaller
SCRIPTS = [("mnist", dict(eps_model="unet", n_feat=8)), ("cifar10", {}), ("celeba", {})]


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


@pytest.mark.parametrize("warmup", [True, False])
@pytest.mark.parametrize("dataset, extra", SCRIPTS)
def test_ema_is_the_moving_average_of_the_weights_and_draws_the_grid(
    dataset, extra, warmup, tmp_path, sampled_by
):
    trajectory = []

    def keep_weights(optimizer, args, kwargs):
        trajectory.append(
            [p.detach().clone() for p in optimizer.param_groups[0]["params"]]
        )

    handle = register_optimizer_step_post_hook(keep_weights)
    try:
        ddpm = trainer.train(dataset, n_epoch=1, out=str(tmp_path), ema=0.5,
                             ema_warmup=warmup, **extra, **RUN)
    finally:
        handle.remove()
    assert len(trajectory) == 2
    # e_1 = w_1, then e_2 = d e_1 + (1 - d) w_2: d = min(0.5, (1 + 1) / (10 + 1))
    # after one update with the warm-up, 0.5 without
    d = 2 / 11 if warmup else 0.5
    expected = [d * e + (1 - d) * w for e, w in zip(*trajectory)]

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


@pytest.mark.parametrize("dataset, extra", SCRIPTS)
def test_resume_carries_the_average_on(dataset, extra, tmp_path, sampled_by, capsys):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    run = dict(dataset=dataset, ema=0.5, **extra, **RUN)
    trainer.train(n_epoch=2, out=str(straight), **run)
    trainer.train(n_epoch=1, out=str(halves), **run)
    trainer.train(n_epoch=2, out=str(halves), resume=True, **run)
    (path,) = straight.glob("*.pth")
    one_go = torch.load(path, weights_only=True)["ema"]
    resumed = torch.load(halves / path.name, weights_only=True)["ema"]
    assert one_go.keys() == resumed.keys()
    for name in one_go:
        assert torch.equal(one_go[name], resumed[name]), name
    # the warm-up's decay depends on the count of updates, which the resume keeps:
    # restarted at 0, the resumed half would average differently
    assert int(resumed["n_averaged"]) == 4


def test_ema_turned_on_when_resuming_starts_from_the_resumed_weights(
    tmp_path, sampled_by, capsys
):
    trainer.train("cifar10", n_epoch=1, out=str(tmp_path), **RUN)
    assert torch.load(tmp_path / "ddpm_cifar.pth", weights_only=True)["ema"] is None
    ddpm = trainer.train(
        "cifar10", n_epoch=2, out=str(tmp_path), ema=0.5, resume=True, **RUN
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


def test_the_warmup_decay_follows_the_formula_then_stays_at_decay():
    # (1 + n) / (10 + n) for n = 0, 1, 2, 3, 4
    hand = [1 / 10, 2 / 11, 3 / 12, 4 / 13, 5 / 14]
    assert [warmup_decay(0.999, n) for n in range(5)] == pytest.approx(hand)
    # (1 + n) / (10 + n) = 0.995 at n = 1790
    assert warmup_decay(0.995, 1789) < 0.995
    assert warmup_decay(0.995, 1790) == pytest.approx(0.995)
    assert warmup_decay(0.995, 10**6) == 0.995


@pytest.mark.parametrize("warmup", [True, False])
def test_the_average_of_a_two_parameter_model_is_the_hand_computed_one(warmup):
    model = nn.Linear(1, 1)
    ema = averaged_copy(model, decay=0.28, warmup=warmup)
    # (weight, bias) after each of four steps
    steps = [(1, 2), (3, -1), (0, 4), (5, 5)]
    for weight, bias in steps:
        with torch.no_grad():
            model.weight.fill_(weight)
            model.bias.fill_(bias)
        ema.update_parameters(model)
    # the first update copies; then d = 2/11, 3/12 and 4/13, capped at 0.28
    decays = [Fraction(2, 11), Fraction(3, 12), Fraction(28, 100)]
    if not warmup:
        decays = [Fraction(28, 100)] * 3
    e = [Fraction(v) for v in steps[0]]
    for d, w in zip(decays, steps[1:]):
        e = [d * a + (1 - d) * b for a, b in zip(e, w)]
    assert float(ema.module.weight.detach()) == pytest.approx(float(e[0]), rel=1e-6)
    assert float(ema.module.bias.detach()) == pytest.approx(float(e[1]), rel=1e-6)
    assert int(ema.n_averaged) == 4
