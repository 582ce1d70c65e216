"""The schedules against their closed forms, and DDPM's loss (Algorithm 1) and sampler
(Algorithm 2) against a Gaussian oracle whose answers are known in closed form."""

import math

import pytest
import torch
import torch.nn as nn

from mindiffusion.ddpm import DDPM, ddpm_schedules

BETAS = (1e-4, 0.02)


def test_schedules_match_their_closed_forms():
    T = 1000
    s = ddpm_schedules(*BETAS, T)
    beta = [BETAS[0] + (BETAS[1] - BETAS[0]) * t / T for t in range(T + 1)]
    alpha = [1 - b for b in beta]
    alphabar = [math.prod(alpha[: t + 1]) for t in range(T + 1)]
    expected = {
        "alpha_t": alpha,
        "oneover_sqrta": [1 / math.sqrt(a) for a in alpha],
        "sqrt_beta_t": [math.sqrt(b) for b in beta],
        "alphabar_t": alphabar,
        "sqrtab": [math.sqrt(ab) for ab in alphabar],
        "sqrtmab": [math.sqrt(1 - ab) for ab in alphabar],
        "mab_over_sqrtmab": [
            (1 - a) / math.sqrt(1 - ab) for a, ab in zip(alpha, alphabar)
        ],
    }
    assert set(s) == set(expected)
    for name, values in expected.items():
        assert s[name].shape == (T + 1,), name
        assert s[name].dtype == torch.float32, name
        torch.testing.assert_close(
            s[name].double(),
            torch.tensor(values, dtype=torch.float64),
            rtol=2e-7,
            atol=0,
            msg=name,
        )
    # beta runs from beta1 at t=0 to beta2 at t=T
    assert s["sqrt_beta_t"][0] ** 2 == pytest.approx(BETAS[0], rel=1e-6)
    assert s["sqrt_beta_t"][T] ** 2 == pytest.approx(BETAS[1], rel=1e-6)


@pytest.mark.parametrize(
    "beta1, beta2",
    [(0.0, 0.02), (-1e-4, 0.02), (0.02, 1e-4), (0.02, 0.02), (1e-4, 1.0)],
)
def test_out_of_range_betas_raise_value_error(beta1, beta2):
    with pytest.raises(ValueError, match="0 < beta1 < beta2 < 1"):
        ddpm_schedules(beta1, beta2, 10)


@pytest.mark.parametrize("T", [0, -3])
def test_fewer_than_one_step_raises_value_error(T):
    with pytest.raises(ValueError, match="at least 1"):
        ddpm_schedules(*BETAS, T)
    with pytest.raises(ValueError, match="at least 1"):
        DDPM(eps_model=nn.Identity(), betas=BETAS, n_T=T)


def test_schedules_are_buffers_not_parameters():
    ddpm = DDPM(eps_model=nn.Conv2d(1, 1, 1), betas=BETAS, n_T=10)
    buffers = dict(ddpm.named_buffers())
    for name in (
        "sqrtab",
        "sqrtmab",
        "oneover_sqrta",
        "mab_over_sqrtmab",
        "sqrt_beta_t",
    ):
        assert buffers[name].shape == (11,)
        assert name in ddpm.state_dict()
    assert {n for n, _ in ddpm.named_parameters()} == {
        "eps_model.weight",
        "eps_model.bias",
    }
    assert ddpm.double().sqrtab.dtype == torch.float64


class Recorder(nn.Module):
    """Predicts zero noise and records every timestep it is given."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t):
        self.calls.append(t.clone())
        return torch.zeros_like(x)


def test_training_draws_t_uniformly_from_1_to_n_T():
    recorder = Recorder()
    ddpm = DDPM(eps_model=recorder, betas=BETAS, n_T=5)
    torch.manual_seed(0)
    ddpm(torch.zeros(5000, 1, 1, 1))
    steps = recorder.calls[0] * 5
    assert torch.equal(steps, steps.round())
    counts = torch.bincount(steps.round().long(), minlength=6)
    assert counts[0] == 0
    # 1000 expected per step; binomial standard deviation about 28
    assert ((counts[1:] - 1000).abs() < 150).all(), counts


def test_sampling_walks_n_T_down_to_1_with_one_timestep_tensor_per_image():
    recorder = Recorder()
    ddpm = DDPM(eps_model=recorder, betas=BETAS, n_T=4)
    ddpm.sample(3, (1, 2, 2), "cpu")
    assert len(recorder.calls) == 4
    for call, i in zip(recorder.calls, [4, 3, 2, 1]):
        assert call.shape == (3, 1)
        assert torch.allclose(call, torch.full((3, 1), i / 4))


def test_sampling_adds_noise_only_while_i_is_above_1():
    # with a zero noise prediction, Algorithm 2 reads
    # x_{i-1} = x_i / sqrt(alpha_i) + sigma_i z,
    # sigma_i = sqrt(beta_i), and the last step (i = 1) adds no z
    T = 2
    beta = [BETAS[0] + (BETAS[1] - BETAS[0]) * t / T for t in range(T + 1)]
    ddpm = DDPM(eps_model=Recorder(), betas=BETAS, n_T=T)
    torch.manual_seed(0)
    x_T, z = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3)
    x_1 = x_T / math.sqrt(1 - beta[2]) + math.sqrt(beta[2]) * z
    expected = x_1 / math.sqrt(1 - beta[1])
    torch.manual_seed(0)
    torch.testing.assert_close(ddpm.sample(4, (1, 3, 3), "cpu"), expected)


class GaussianOracle(nn.Module):
    """The best possible noise predictor when every pixel of x_0 is N(mu, sd^2).

    With ab = alphabar_t, x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps is Gaussian, and
    E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab sd^2 + 1 - ab).
    """

    def __init__(self, mu: float, sd: float, n_T: int):
        super().__init__()
        self.mu, self.sd, self.n_T = mu, sd, n_T
        beta = [BETAS[0] + (BETAS[1] - BETAS[0]) * t / n_T for t in range(n_T + 1)]
        alphabar = [math.prod(1 - b for b in beta[: t + 1]) for t in range(n_T + 1)]
        self.alphabar = torch.tensor(alphabar, dtype=torch.float64)

    def forward(self, x_t, t):
        # the model sees t / n_T; one timestep per image, broadcast over its pixels
        steps = torch.round(t.double() * self.n_T).long().view(-1, 1, 1, 1)
        ab = self.alphabar[steps]
        eps = (1 - ab).sqrt() * (x_t - ab.sqrt() * self.mu) / (ab * self.sd**2 + 1 - ab)
        return eps.float()


@pytest.mark.parametrize("mu, sd", [(0.5, 0.3), (-1.0, 2.0)])
def test_sampling_with_the_oracle_gives_back_the_data_distribution(mu, sd):
    n_T = 1000
    ddpm = DDPM(eps_model=GaussianOracle(mu, sd, n_T), betas=BETAS, n_T=n_T)
    torch.manual_seed(0)
    x = ddpm.sample(256, (1, 16, 16), "cpu")
    # 65,536 pixels: standard errors sd/256 for the mean and about sd/362 for the std
    assert abs(x.mean().item() - mu) < 0.02 * sd
    assert abs(x.std().item() - sd) < 0.02 * sd


@pytest.mark.parametrize("mu, sd", [(0.5, 0.3), (-1.0, 2.0)])
def test_training_loss_with_the_oracle_is_the_closed_form_minimum(mu, sd):
    n_T = 1000
    oracle = GaussianOracle(mu, sd, n_T)
    ddpm = DDPM(eps_model=oracle, betas=BETAS, n_T=n_T)
    # the oracle's error at step t is ab sd^2 / (ab sd^2 + 1 - ab); t ~ U{1..n_T}
    ab = oracle.alphabar[1:]
    expected = (ab * sd**2 / (ab * sd**2 + 1 - ab)).mean().item()
    torch.manual_seed(0)
    losses = [ddpm(mu + sd * torch.randn(16384, 1, 2, 2)).item() for _ in range(4)]
    assert sum(losses) / len(losses) == pytest.approx(expected, abs=0.01)
