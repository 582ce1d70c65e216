"""DDIM: its timesteps and model calls, its last step onto x_0, and its samples against
the Gaussian oracle, whose DDIM walk can be followed exactly in closed form."""

import itertools
import math
import operator

import pytest
import torch
import torch.nn as nn

from conftest import REPO
from mindiffusion import sample
from mindiffusion.ddim import DDIM
from mindiffusion.ddpm import DDPM
from test_ddpm import BETAS, GaussianOracle


class CountingEps(nn.Module):
    """Predicts zero noise, and records the timestep of each call."""

    def __init__(self):
        super().__init__()
        self.seen_t = []

    def forward(self, x, t):
        self.seen_t.append(t[0].item())
        return torch.zeros_like(x)


def test_ddim_walks_n_steps_evenly_spaced_timesteps_from_n_T():
    ddim = DDIM(CountingEps(), BETAS, n_T=1000, n_steps=50)
    ddim.sample(2, (1, 2, 2), torch.device("cpu"))
    # t / n_T = 1, 0.98, ..., 0.02: 50 calls, the next stop after 0.02 being x_0
    expected = [(1000 - 20 * k) / 1000 for k in range(50)]
    assert ddim.eps_model.seen_t == pytest.approx(expected)


def test_ddim_with_50_steps_calls_the_model_20_times_less_than_ddpm():
    ddpm = DDPM(CountingEps(), BETAS, n_T=1000)
    ddim = DDIM(CountingEps(), BETAS, n_T=1000, n_steps=50)
    ddpm.sample(1, (1, 2, 2), torch.device("cpu"))
    ddim.sample(1, (1, 2, 2), torch.device("cpu"))
    assert len(ddpm.eps_model.seen_t) == 1000 and len(ddim.eps_model.seen_t) == 50
    assert len(ddpm.eps_model.seen_t) / len(ddim.eps_model.seen_t) == 20


def test_without_n_steps_ddim_calls_the_model_at_every_timestep():
    ddim = DDIM(CountingEps(), BETAS, n_T=7)
    ddim.sample(1, (1, 2, 2), torch.device("cpu"))
    assert ddim.eps_model.seen_t == pytest.approx([t / 7 for t in range(7, 0, -1)])


class ConstantEps(nn.Module):
    """Predicts the same noise everywhere, and keeps the last x_t it was given."""

    def forward(self, x, t):
        self.last_x_t = x.clone()
        return torch.full_like(x, 0.3)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_the_last_step_lands_on_the_models_x_0(eta):
    # x_0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t) at the last timestep, t = 20:
    # no noise and no eps term are left, whatever eta is
    ddim = DDIM(ConstantEps(), BETAS, n_T=1000, eta=eta, n_steps=50)
    torch.manual_seed(0)
    x_0 = ddim.sample(3, (1, 4, 4), torch.device("cpu"))
    ab = ddim.alphabar_t[20]
    expected = (ddim.eps_model.last_x_t - (1 - ab).sqrt() * 0.3) / ab.sqrt()
    torch.testing.assert_close(x_0, expected)


def test_a_ddpm_state_dict_loads_into_ddim():
    ddpm = DDPM(nn.Conv2d(1, 1, 3, padding=1), BETAS, n_T=1000)
    ddim = DDIM(nn.Conv2d(1, 1, 3, padding=1), BETAS, n_T=1000, n_steps=50)
    ddim.load_state_dict(ddpm.state_dict())
    assert torch.equal(ddim.eps_model.weight, ddpm.eps_model.weight)


@pytest.mark.parametrize("n_steps, eta", [(0, 0.0), (1001, 0.0), (50, -0.1), (50, 1.5)])
def test_out_of_range_steps_or_eta_raise_value_error(n_steps, eta):
    with pytest.raises(ValueError):
        DDIM(CountingEps(), BETAS, n_T=1000, eta=eta, n_steps=n_steps)


def ddim_walk_of_the_oracle(mu, sd, n_T, n_steps, eta):
    """The exact mean and std of DDIM's output when the model is the Gaussian oracle.

    Each step of eq. 12 is affine in x_t, x_prev = A x_t + B + sigma z, so from
    x_T ~ N(0, 1) the mean and variance follow in closed form, in float64.
    """
    beta = [BETAS[0] + (BETAS[1] - BETAS[0]) * t / n_T for t in range(n_T + 1)]
    alphabar = [math.prod(1 - b for b in beta[: t + 1]) for t in range(n_T + 1)]
    mean, var = 0.0, 1.0
    tau = [round(n_T - k * n_T / n_steps) for k in range(n_steps + 1)]
    for t, t_prev in zip(tau[:-1], tau[1:]):
        a, a_prev = alphabar[t], (alphabar[t_prev] if t_prev > 0 else 1.0)
        # the oracle: eps = c (x_t - sqrt(a) mu)
        c = math.sqrt(1 - a) / (a * sd**2 + 1 - a)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        direction = math.sqrt(max(1 - a_prev - sigma**2, 0.0))
        # x_0 guess = ((1 - sqrt(1 - a) c) x_t + sqrt(1 - a) c sqrt(a) mu) / sqrt(a)
        A = (
            math.sqrt(a_prev) * (1 - math.sqrt(1 - a) * c) / math.sqrt(a)
            + direction * c
        )
        B = (
            math.sqrt(a_prev) * math.sqrt(1 - a) * c - direction * c * math.sqrt(a)
        ) * mu
        mean, var = A * mean + B, A**2 * var + sigma**2
    return mean, math.sqrt(var)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("mu, sd", [(0.5, 0.3), (-1.0, 2.0)])
def test_ddim_50_steps_with_the_oracle_gives_back_the_data(mu, sd, eta):
    n_T = 1000
    oracle = GaussianOracle(mu, sd, n_T)
    calls = []
    oracle.register_forward_hook(lambda module, args, out: calls.append(1))
    ddim = DDIM(eps_model=oracle, betas=BETAS, n_T=n_T, eta=eta, n_steps=50)
    torch.manual_seed(0)
    x = ddim.sample(256, (1, 16, 16), torch.device("cpu"))
    assert len(calls) == 50
    walk_mean, walk_sd = ddim_walk_of_the_oracle(mu, sd, n_T, 50, eta)
    # 65,536 pixels: standard errors sd/256 for the mean and about sd/362 for the std
    assert abs(x.mean().item() - walk_mean) < 0.02 * sd
    assert abs(x.std().item() - walk_sd) < 0.02 * sd
    assert abs(walk_mean - mu) < 0.02 * sd


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("mu, sd", [(0.5, 0.3), (-1.0, 2.0)])
def test_the_oracles_walk_reaches_the_data_as_the_steps_grow(mu, sd, eta):
    # DDIM's discretisation error: with few steps the std comes out low (by 9% for
    # sd 0.3 at 50 steps with eta 0), and the error shrinks as the steps grow
    errors = [
        abs(ddim_walk_of_the_oracle(mu, sd, 1000, n_steps, eta)[1] - sd) / sd
        for n_steps in (10, 50, 200, 1000)
    ]
    assert errors == sorted(errors, reverse=True)
    assert errors[1] < 0.2 and errors[-1] < 0.015


def test_eta_1_is_the_posterior_variance_which_the_words_say(capsys):
    """At eta 1, DDIM's sigma^2 is the DDPM paper's posterior variance
    beta-tilde_t = (1 - alphabar_{t-1}) / (1 - alphabar_t) beta_t, below the beta_t
    that DDPM.sample adds: the help and the sampling page must not call them equal."""
    # the schedule in float64, from its definition: beta_t linear over t = 0..1000
    beta = [BETAS[0] + (BETAS[1] - BETAS[0]) * t / 1000 for t in range(1001)]
    alphabar = list(itertools.accumulate((1 - b for b in beta), operator.mul))

    def ratio(t):
        return (1 - alphabar[t - 1]) / (1 - alphabar[t])

    assert [round(ratio(t), 2) for t in (2, 100, 1000)] == [0.61, 0.98, 1.0]
    with pytest.raises(SystemExit):
        sample.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    page = " ".join((REPO / "docs" / "sampling.md").read_text().split())
    for text in (help_text, page):
        assert "as much as DDPM" not in text and "posterior variance" in text
    assert "0.61 at t = 2, 0.98 at t = 100" in page


def test_steps_that_do_not_divide_n_t_round_to_the_nearest_timestep():
    # linspace(10, 0, 4) = 10, 6.67, 3.33, 0: rounded, the model sees t = 10, 7, 3
    ddim = DDIM(CountingEps(), BETAS, n_T=10, n_steps=3)
    ddim.sample(1, (1, 2, 2), torch.device("cpu"))
    assert ddim.eps_model.seen_t == pytest.approx([1.0, 0.7, 0.3])


@pytest.mark.parametrize("eta", [0.25, 0.5])
def test_a_few_steps_with_eta_between_0_and_1_follow_the_oracle_s_walk(eta):
    # 3 steps of 10, far from the data, where eta's noise shapes the result: the
    # samples' mean and std are those of the closed-form walk of eq. 12 and 16
    mu, sd, n_T = 0.5, 0.3, 10
    ddim = DDIM(GaussianOracle(mu, sd, n_T), BETAS, n_T=n_T, eta=eta, n_steps=3)
    torch.manual_seed(0)
    x = ddim.sample(256, (1, 16, 16), torch.device("cpu"))
    walk_mean, walk_sd = ddim_walk_of_the_oracle(mu, sd, n_T, 3, eta)
    assert abs(x.mean().item() - walk_mean) < 0.01 * walk_sd
    assert abs(x.std().item() - walk_sd) < 0.01 * walk_sd


class ScaleBlindOracle(GaussianOracle):
    """The Gaussian oracle, told each sample rescaled to the deviation that x_t has
    at its t: like NaiveUnet, whose first GroupNorm divides out the input's scale,
    it cannot see when a sample has grown too large or too small."""

    def forward(self, x_t, t):
        steps = torch.round(t.double() * self.n_T).long().view(-1, 1, 1, 1)
        ab = self.alphabar[steps]
        expected = (ab * self.sd**2 + 1 - ab).sqrt()
        seen = x_t.double().std(dim=(1, 2, 3), keepdim=True)
        return super().forward(x_t * (expected / seen).float(), t)


def spread_of_sample_deviations(eps_model, eta: float) -> torch.Tensor:
    """The deviation of each of 64 samples of 20 DDIM steps at eta."""
    ddim = DDIM(eps_model, BETAS, n_T=1000, eta=eta, n_steps=20)
    torch.manual_seed(0)
    x = ddim.sample(64, (1, 16, 16), torch.device("cpu"))
    return x.flatten(1).std(1)


def test_a_noise_model_blind_to_scale_loses_the_deterministic_walk():
    # what the sampling page shows of NaiveUnet at eta 0: each sample's deviation
    # runs away from the data's 0.3, up into static or down into flat grey; the
    # oracle, which sees the scale, keeps every sample near 0.3, and eta 1's fresh
    # noise holds the blind model's samples far closer
    sd = 0.3
    seeing = spread_of_sample_deviations(GaussianOracle(0.0, sd, 1000), eta=0.0)
    blind = spread_of_sample_deviations(ScaleBlindOracle(0.0, sd, 1000), eta=0.0)
    blind_noisy = spread_of_sample_deviations(ScaleBlindOracle(0.0, sd, 1000), 1.0)
    assert seeing.min() > 0.6 * sd and seeing.max() < 1.1 * sd
    assert blind.max() > 10 * sd and blind.min() < 0.1 * sd
    assert blind_noisy.std() < blind.std() / 5
