"""Classifier-free guidance. Against a Gaussian oracle: when class k's data are
N(mu_k, s_k^2) per pixel and the null class's N(mu_0, s_0^2), every best predictor is
linear in x_t, so the guided walk is affine and its mean and std follow exactly, in
float64, step by step. Then the label dropout and the conditional models."""

import math

import pytest
import torch
import torch.nn as nn

from mindiffusion.ddim import DDIM
from mindiffusion.ddpm import DDPM
from mindiffusion.unet import NaiveUnet
from test_ddpm import BETAS
from mindiffusion.dummy import DummyEpsModel

# classes 0 and 1, and the null class 2
MUS, SDS = (0.5, -1.0, -0.25), (0.3, 0.6, 1.0)
N_T = 1000


def schedule(n_T):
    beta = [BETAS[0] + (BETAS[1] - BETAS[0]) * t / n_T for t in range(n_T + 1)]
    alphabar = [math.prod(1 - b for b in beta[: t + 1]) for t in range(n_T + 1)]
    return beta, alphabar


class ClassOracle(nn.Module):
    """The best noise predictor of each class's Gaussian, the null class included:
    E[eps | x_t, c] = sqrt(1 - ab) (x_t - sqrt(ab) mu_c) / (ab s_c^2 + 1 - ab)."""

    def __init__(self):
        super().__init__()
        self.alphabar = torch.tensor(schedule(N_T)[1], dtype=torch.float64)
        self.mus, self.sds = torch.tensor(MUS).double(), torch.tensor(SDS).double()

    def forward(self, x_t, t, c):
        steps = torch.round(t.double() * N_T).long().view(-1, 1, 1, 1)
        ab = self.alphabar[steps]
        mu, sd = self.mus[c].view(-1, 1, 1, 1), self.sds[c].view(-1, 1, 1, 1)
        eps = (1 - ab).sqrt() * (x_t - ab.sqrt() * mu) / (ab * sd**2 + 1 - ab)
        return eps.float()


def guided(k, w, ab):
    """The guided prediction at alphabar ab, as C x_t - D."""
    coefficient = [math.sqrt(1 - ab) / (ab * s**2 + 1 - ab) for s in SDS]
    C = (1 + w) * coefficient[k] - w * coefficient[2]
    D = (1 + w) * coefficient[k] * MUS[k] - w * coefficient[2] * MUS[2]
    D *= math.sqrt(ab)
    return C, D


def ddpm_walk(k, w):
    """Mean and std of Algorithm 2 with the guided oracle, from x_T ~ N(0, 1)."""
    beta, alphabar = schedule(N_T)
    mean, var = 0.0, 1.0
    for i in range(N_T, 0, -1):
        C, D = guided(k, w, alphabar[i])
        m = beta[i] / math.sqrt(1 - alphabar[i])
        # x_{i-1} = (x_i - m (C x_i - D)) / sqrt(alpha_i) + sqrt(beta_i) z
        A, B = (1 - m * C) / math.sqrt(1 - beta[i]), m * D / math.sqrt(1 - beta[i])
        mean, var = A * mean + B, A**2 * var + (beta[i] if i > 1 else 0.0)
    return mean, math.sqrt(var)


def ddim_walk(k, w, n_steps):
    """Mean and std of DDIM's eq. 12 (eta 0) with the guided oracle."""
    alphabar = schedule(N_T)[1]
    mean, var = 0.0, 1.0
    tau = [round(N_T - j * N_T / n_steps) for j in range(n_steps + 1)]
    for t, t_prev in zip(tau[:-1], tau[1:]):
        a, a_prev = alphabar[t], (alphabar[t_prev] if t_prev > 0 else 1.0)
        C, D = guided(k, w, a)
        direction = math.sqrt(1 - a_prev)
        # x_0 guess = ((1 - sqrt(1 - a) C) x_t + sqrt(1 - a) D) / sqrt(a)
        A = math.sqrt(a_prev) * (1 - math.sqrt(1 - a) * C) / math.sqrt(a)
        A += direction * C
        B = math.sqrt(a_prev) * math.sqrt(1 - a) * D / math.sqrt(a) - direction * D
        mean, var = A * mean + B, A**2 * var
    return mean, math.sqrt(var)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("k, w", [(0, 0.0), (1, 0.0), (0, 2.0), (1, 3.0)])
def test_guided_samples_follow_the_exact_guided_walk(sampler, k, w):
    if sampler == "ddpm":
        model = DDPM(ClassOracle(), BETAS, N_T, n_classes=2)
        walk = ddpm_walk(k, w)
    else:
        model = DDIM(ClassOracle(), BETAS, N_T, n_steps=50, n_classes=2)
        walk = ddim_walk(k, w, 50)
    calls = []
    model.eps_model.register_forward_hook(lambda m, args, out: calls.append(len(out)))
    torch.manual_seed(0)
    c = torch.full((256,), k)
    x = model.sample(256, (1, 16, 16), "cpu", c=c, guide_w=w)
    # one doubled batch per step, the conditional and the null predictions; at
    # w = 0 the conditional one alone
    batch = 256 if w == 0 else 512
    assert calls == [batch] * (N_T if sampler == "ddpm" else 50)
    # 65,536 pixels: standard errors about sd/256 for the mean and sd/362 for the std
    assert abs(x.mean().item() - walk[0]) < 0.02 * SDS[k]
    assert abs(x.std().item() - walk[1]) < 0.02 * SDS[k]
    if w == 0:
        # plain conditional sampling gives back the class's own Gaussian
        tolerance = 0.02 if sampler == "ddpm" else 0.1
        assert walk[0] == pytest.approx(MUS[k], abs=tolerance * SDS[k])
        assert walk[1] == pytest.approx(SDS[k], rel=tolerance)
    else:
        # guidance sharpens the class and pushes it away from the null class's mean
        assert walk[1] < SDS[k]
        assert abs(walk[0] - MUS[2]) > abs(MUS[k] - MUS[2])


class LabelRecorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.labels = []

    def forward(self, x, t, c):
        self.labels.append(c)
        return torch.zeros_like(x)


def test_training_drops_a_p_uncond_share_of_the_labels_to_the_null_class():
    recorder = LabelRecorder()
    ddpm = DDPM(recorder, BETAS, 10, n_classes=10, p_uncond=0.1)
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (20000,))
    ddpm(torch.zeros(20000, 1, 1, 1), labels)
    (seen,) = recorder.labels
    dropped = seen == 10
    # binomial standard deviation sqrt(0.09 / 20000) = 0.0021
    assert abs(dropped.float().mean().item() - 0.1) < 0.01
    assert torch.equal(seen[~dropped], labels[~dropped])


def test_unconditional_sampling_is_the_null_class_and_c_needs_classes():
    recorder = LabelRecorder()
    ddpm = DDPM(recorder, BETAS, 2, n_classes=3)
    ddpm.sample(4, (1, 2, 2), "cpu")
    # at the default w = 0, one batch of the null class
    assert all(torch.equal(c, torch.full((4,), 3)) for c in recorder.labels)
    recorder.labels.clear()
    # guided, (1 + w) eps(x, null) - w eps(x, null) is eps(x, null): no doubled
    # batch, half of which would be the null class too, for the same images
    for sampler in (ddpm, DDIM.of(ddpm, 2)):
        torch.manual_seed(0)
        plain = sampler.sample(4, (1, 2, 2), "cpu")
        recorder.labels.clear()
        torch.manual_seed(0)
        guided = sampler.sample(4, (1, 2, 2), "cpu", guide_w=2.0)
        assert all(torch.equal(c, torch.full((4,), 3)) for c in recorder.labels)
        assert torch.equal(plain, guided)
    plain = DDPM(nn.Identity(), BETAS, 2)
    with pytest.raises(ValueError, match="n_classes"):
        plain.sample(2, (1, 2, 2), "cpu", c=torch.zeros(2, dtype=torch.long))


def test_a_conditional_naive_unet_embeds_the_classes_and_the_null_class():
    torch.manual_seed(0)
    unet = NaiveUnet(1, 1, n_feat=8, n_classes=10)
    assert unet.classembed.num_embeddings == 11
    x, t = torch.randn(3, 1, 32, 32), torch.rand(3, 1)
    outputs = [unet(x, t, torch.full((3,), k)) for k in (0, 1, 10)]
    assert outputs[0].shape == (3, 1, 32, 32)
    assert not torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], outputs[2])
    # without classes: the notes' module, its state_dict unchanged
    assert set(NaiveUnet(1, 1, n_feat=8).state_dict()) == {
        k for k in unet.state_dict() if not k.startswith("classembed")
    }


def test_a_conditional_dummy_eps_model_reads_a_map_per_class():
    torch.manual_seed(0)
    model = DummyEpsModel(1, n_classes=10)
    assert model.classmap.num_embeddings == 11
    assert model.conv[0][0].in_channels == 2
    x, t = torch.randn(2, 1, 28, 28), torch.rand(2, 1)
    model.eval()
    outputs = [model(x, t, torch.full((2,), k)) for k in (3, 10)]
    assert outputs[0].shape == (2, 1, 28, 28)
    assert not torch.equal(outputs[0], outputs[1])
    # without classes: the notes' module, its state_dict unchanged
    assert set(DummyEpsModel(1).state_dict()) == set(model.state_dict()) - {
        "classmap.weight"
    }


def test_at_w_0_the_single_call_equals_the_doubled_batch():
    torch.manual_seed(0)
    model = DDPM(NaiveUnet(1, 1, 8, n_classes=3), BETAS, N_T, n_classes=3).eval()
    x_t, t = torch.randn(4, 1, 32, 32), torch.full((4, 1), 0.5)
    c = torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        single = model.guided_eps(x_t, t, c, 0.0)
        # the doubled batch, as for w > 0, and its conditional half
        null = torch.full_like(c, 3)
        both = model.eps_model(torch.cat([x_t, x_t]), torch.cat([t, t]),
                               torch.cat([c, null]))
    torch.testing.assert_close(single, both[:4])
