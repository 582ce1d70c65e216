"""DDIM's kept walk, the published one (x_0 within the data's range, eps re-derived
from it), against diffusers' DDIMScheduler step for step; --unit-eps, this
repository's rule on top; the inversion and the spherical path between two x_T,
against closed forms and the Gaussian oracle; the shipped model's walks at eta 0;
and what the figures that only the deterministic walk draws compute."""
import math

import pytest
import torch
import torch.nn as nn

from conftest import REPO
from mindiffusion import sample
from mindiffusion.figures import command as figures_command
from mindiffusion.ddim import DDIM, slerp
from mindiffusion.figures import deterministic
from mindiffusion.judge import command as judge_command
from mindiffusion.training.data import data_range
from test_ddpm import BETAS, GaussianOracle
from test_figures import RECIPE, tiny_ddpm
from test_judge import figures_printed

SHIPPED_MODEL = REPO / "contents" / "mnist_laptop_cond.pth"


class FixedEps(nn.Module):
    """Predicts the same noise `eps` at every call, and records each input."""

    def __init__(self, eps: torch.Tensor):
        super().__init__()
        self.eps, self.inputs = eps, []

    def forward(self, x, t):
        self.inputs.append(x.clone())
        return self.eps.expand_as(x)


def schedule(n_T: int) -> list[float]:
    """alphabar_t for t = 0..n_T, in float64, from the betas the tests use."""
    beta = [BETAS[0] + (BETAS[1] - BETAS[0]) * t / n_T for t in range(n_T + 1)]
    return [math.prod(1 - b for b in beta[: t + 1]) for t in range(n_T + 1)]


def test_where_x_0_stays_in_range_the_kept_walk_is_the_plain_one():
    # the oracle's data, N(0, 0.3^2), inside a range that no x_0 reaches
    oracle = GaussianOracle(0.0, 0.3, 100)
    plain = DDIM(oracle, BETAS, n_T=100, eta=0.0, n_steps=10)
    kept = DDIM(oracle, BETAS, n_T=100, eta=0.0, n_steps=10, x0_range=(-50.0, 50.0))
    x_T = torch.randn(8, 1, 8, 8)
    assert torch.equal(plain.walk(x_T), kept.walk(x_T))


def test_out_of_range_x_0_is_kept_and_eps_re_derived_from_it():
    # two steps, T = 100 -> 50 -> 0, with a model whose eps puts x_0 far out of
    # [-0.5, 0.5]: the closed form of each step of eq. 12 with the kept x_0
    n_T, low, high = 100, -0.5, 0.5
    eps = torch.full((1, 1, 2, 2), -3.0)
    model = FixedEps(eps)
    ddim = DDIM(model, BETAS, n_T=n_T, eta=0.0, n_steps=2, x0_range=(low, high))
    x_T = torch.tensor([[[[0.2, -0.4], [1.5, 0.0]]]])
    out = ddim.walk(x_T)
    a = schedule(n_T)
    a_T, a_50 = a[100], a[50]
    x0 = ((x_T - math.sqrt(1 - a_T) * eps) / math.sqrt(a_T)).clamp(low, high)
    assert x0.eq(high).all()
    # the eps that gives the kept x_0 from x_T, not the model's
    eps_kept = (x_T - math.sqrt(a_T) * x0) / math.sqrt(1 - a_T)
    x_50 = math.sqrt(a_50) * x0 + math.sqrt(1 - a_50) * eps_kept
    torch.testing.assert_close(model.inputs[1], x_50)
    last = ((x_50 - math.sqrt(1 - a_50) * eps) / math.sqrt(a_50)).clamp(low, high)
    torch.testing.assert_close(out, last)
    # the model's own eps would have taken the walk elsewhere
    model_x_50 = math.sqrt(a_50) * x0 + math.sqrt(1 - a_50) * eps
    assert not torch.allclose(model.inputs[1], model_x_50, atol=1e-3)


class ReadsItsInput(nn.Module):
    """eps = 1.5 x + t: a model that reads x and t, whose x_0 leaves [-0.5, 0.5]."""

    def forward(self, x, t):
        return 1.5 * x + t.view(-1, 1, 1, 1)


def diffusers_ddim_step(
    model_output, alpha_prod_t, alpha_prod_t_prev, sample, eta, clip_range, noise
):
    """diffusers' DDIMScheduler.step (schedulers/scheduling_ddim.py) with
    clip_sample=True, clip_sample_range and use_clipped_model_output=True, its
    lines in order, for one step from a timestep to the one before."""
    beta_prod_t = 1 - alpha_prod_t
    pred_original_sample = (
        sample - beta_prod_t**0.5 * model_output
    ) / alpha_prod_t**0.5
    pred_original_sample = pred_original_sample.clamp(-clip_range, clip_range)
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance**0.5
    # use_clipped_model_output: eps re-derived from the clipped x_0
    model_output = (
        sample - alpha_prod_t**0.5 * pred_original_sample
    ) / beta_prod_t**0.5
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * model_output
    prev_sample = alpha_prod_t_prev**0.5 * pred_original_sample + pred_sample_direction
    return prev_sample + std_dev_t * noise


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_the_default_walk_is_diffusers_clipped_ddim_step_for_step(eta):
    n_T, clip = 100, 0.5
    model = ReadsItsInput()
    ddim = DDIM(model, BETAS, n_T=n_T, eta=eta, n_steps=4, x0_range=(-clip, clip))
    torch.manual_seed(0)
    x_T = torch.randn(3, 1, 4, 4)
    torch.manual_seed(1)
    ours = ddim.walk(x_T)
    # the same timesteps; set_alpha_to_one: the step to t = 0 takes alphabar 1
    a = schedule(n_T)
    tau = ddim.timesteps()
    torch.manual_seed(1)
    x, left_range = x_T.double(), False
    for t, t_prev in zip(tau[:-1], tau[1:]):
        eps = model(x, torch.full((len(x), 1), t / n_T, dtype=torch.float64))
        x0 = (x - math.sqrt(1 - a[t]) * eps) / math.sqrt(a[t])
        left_range = left_range or bool((x0.abs() > clip).any())
        noise = torch.randn(x.shape).double()
        a_prev = a[t_prev] if t_prev > 0 else 1.0
        x = diffusers_ddim_step(eps, a[t], a_prev, x, eta, clip, noise)
    assert left_range
    torch.testing.assert_close(ours, x.float(), atol=1e-5, rtol=1e-5)
    # --unit-eps, this repository's rule, walks elsewhere
    unit = DDIM(model, BETAS, n_T=n_T, eta=eta, n_steps=4, x0_range=(-clip, clip),
                unit_eps=True)
    torch.manual_seed(1)
    assert not torch.allclose(unit.walk(x_T), ours, atol=1e-3)


def test_unit_eps_scales_each_sample_s_eps_to_a_deviation_of_1():
    n_T = 100
    # two samples whose eps have deviations 2 and 0.5
    eps = torch.tensor([[[[2.0, -2.0], [2.0, -2.0]]], [[[0.5, -0.5], [-0.5, 0.5]]]])
    model = FixedEps(eps)
    ddim = DDIM(model, BETAS, n_T=n_T, eta=0.0, n_steps=2, unit_eps=True)
    x_T = torch.zeros(2, 1, 2, 2)
    ddim.walk(x_T)
    a = schedule(n_T)
    unit = eps / eps.flatten(1).std(1).view(-1, 1, 1, 1)
    x0 = (x_T - math.sqrt(1 - a[100]) * eps) / math.sqrt(a[100])
    x_50 = math.sqrt(a[50]) * x0 + math.sqrt(1 - a[50]) * unit
    torch.testing.assert_close(model.inputs[1], x_50)


def test_the_data_range_is_where_normalize_takes_0_and_1():
    assert data_range(((0.5,), (1.0,))) == (-0.5, 0.5)
    assert data_range(((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))) == (-1.0, 1.0)


def test_inversion_then_the_walk_gives_back_x_0_within_the_stated_error():
    # data N(0.5, 0.3^2), the oracle's: at 100 steps the walk down from the x_T
    # found differs from x_0 by under 0.02 on average, and doubling the steps
    # about halves that
    errors = {}
    torch.manual_seed(0)
    x0 = 0.5 + 0.3 * torch.randn(64, 1, 8, 8)
    for steps in (100, 200):
        ddim = DDIM(GaussianOracle(0.5, 0.3, 1000), BETAS, n_T=1000, n_steps=steps)
        x_T = ddim.invert(x0)
        # x_T is a noise draw's size: the data's trace is gone
        assert abs(x_T.std().item() - 1) < 0.1
        errors[steps] = (ddim.walk(x_T) - x0).abs().mean().item()
    assert errors[100] < 0.02
    assert errors[200] < 0.6 * errors[100]


def test_slerp_keeps_to_the_great_circle():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(slerp(e1, e2, 0.0), e1)
    torch.testing.assert_close(slerp(e1, e2, 1.0), e2)
    torch.testing.assert_close(slerp(e1, e2, 0.5), (e1 + e2) / math.sqrt(2))
    # two draws of equal length: every point between them has that length, where
    # the straight line's middle is shorter
    torch.manual_seed(0)
    a = torch.randn(1000)
    b = torch.randn(1000)
    b = b * a.norm() / b.norm()
    for fraction in (0.25, 0.5, 0.75):
        assert slerp(a, b, fraction).norm() == pytest.approx(a.norm().item(), rel=1e-4)
    assert ((a + b) / 2).norm() < 0.8 * a.norm()


def judged(argv, capsys) -> dict:
    judge_command.main([str(SHIPPED_MODEL), "--n", "4", *argv])
    return figures_printed(capsys.readouterr().out)


def test_the_shipped_model_s_walks_at_eta_0_read_as_docs_sampling_says(
    capsys, tmp_path
):
    root = ["--data-root", str(tmp_path)]
    read = "read as digits (at least 90% sure)"
    raw = judged([*root, "--raw-walk"], capsys)
    published = judged(root, capsys)
    unit = judged([*root, "--unit-eps"], capsys)
    # NaiveUnet, blind to its input's scale, loses the raw deterministic walk;
    # keeping x_0 in range rescues most of it, and --unit-eps the rest
    assert raw[read] < 0.5
    assert published[read] >= raw[read] + 0.3
    assert unit[read] >= 0.95 and unit[read] >= published[read]
    assert unit["distinct digits"] == 10
    assert unit["drawn as the digit asked for"] >= 0.95


class CountingTinyEps(nn.Module):
    """A small convolution that reads x and t, and counts its calls."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.calls = 0

    def forward(self, x, t, c=None):
        self.calls += 1
        return self.conv(x) * t.view(-1, 1, 1, 1)


def test_the_interpolation_walks_each_frame_from_its_point_on_the_circle():
    model = CountingTinyEps()
    ddim = DDIM(model, BETAS, n_T=50, eta=0.0, n_steps=5, x0_range=(-0.5, 0.5))
    x_a, x_b = torch.randn(2, 3, 1, 8, 8)
    images, fractions = deterministic.interpolation(ddim, x_a, x_b, None, 0.0, 5)
    assert fractions == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert images.shape == (5, 3, 1, 8, 8) and model.calls == 5 * 5
    # the ends are the two x_T's own images, in order, and the middle the image
    # of the circle's middle
    torch.testing.assert_close(images[0], ddim.walk(x_a))
    torch.testing.assert_close(images[-1], ddim.walk(x_b))
    middle = torch.stack([slerp(a, b, 0.5) for a, b in zip(x_a, x_b)])
    torch.testing.assert_close(images[2], ddim.walk(middle))


def test_consistency_walks_the_same_x_T_in_each_count_of_steps():
    model = CountingTinyEps()
    ddim = DDIM(model, BETAS, n_T=100, eta=0.0, n_steps=20)
    x_T = torch.randn(2, 1, 8, 8)
    images = deterministic.consistency(ddim, x_T, None, 0.0, (10, 50))
    assert model.calls == 10 + 50
    for count, image in zip((10, 50), images):
        torch.testing.assert_close(image, DDIM.of(ddim, count).walk(x_T))


def test_the_judge_s_captions_follow_the_frames_and_images():
    # a blank reads as junk; a bar reads alike wherever it stands
    bar = torch.zeros(1, 28, 28)
    bar[:, 4:24, 13:15] = 1
    blank = torch.zeros(1, 28, 28)
    images = torch.stack([torch.stack([blank, bar]), torch.stack([bar, blank])])
    captions = deterministic.digit_captions(images)
    assert captions[0][0].startswith("junk") and captions[1][1].startswith("junk")
    assert captions[0][1] == captions[1][0]


class Walked(Exception):
    """The figures command's first DDIM was made: what it was made with."""


def test_sample_and_figures_take_the_raw_walk_when_asked(tmp_path, monkeypatch):
    # an untrained model's x_0 leaves the data's range: the kept walk differs
    checkpoint = tmp_path / "tiny.pth"
    model = tiny_ddpm().state_dict()
    torch.save({"model": model, "recipe": RECIPE, "averaged": False}, checkpoint)
    for raw in ([], ["--raw-walk"]):
        out = tmp_path / ("raw" if raw else "kept")
        out.mkdir()
        sample.main([str(checkpoint), "--sampler", "ddim", "--steps", "5", "--seed",
                     "0", "--device", "cpu", "--out", str(out / "grid.png"), *raw])
    kept, raw = ((tmp_path / k / "grid.png").read_bytes() for k in ("kept", "raw"))
    assert kept != raw
    # figures: its first DDIM, the one that draws the images to noise

    def walked(*args, **kwargs):
        raise Walked(kwargs)

    monkeypatch.setattr(figures_command.DDIM, "of", walked)
    made = []
    for flag in ([], ["--raw-walk"], ["--unit-eps"]):
        with pytest.raises(Walked) as walk:
            figures_command.main([str(checkpoint), "--out", str(tmp_path / "f"),
                                  "--device", "cpu", *flag])
        made.append(walk.value.args[0])
    assert made[0] == dict(eta=1.0, x0_range=(-0.5, 0.5), unit_eps=False)
    assert made[1] == dict(eta=1.0, x0_range=None, unit_eps=False)
    assert made[2] == dict(eta=1.0, x0_range=(-0.5, 0.5), unit_eps=True)
