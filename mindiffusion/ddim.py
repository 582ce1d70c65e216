"""DDIM (Song et al. 2020): sample a trained DDPM in a few steps.

DDIM keeps DDPM's model, schedules and training loss, and changes only the sampler:
it walks a few evenly spaced timesteps from n_T down to 0, and with eta = 0 no noise
is added on the way. A DDPM checkpoint loads into `DDIM` as it is.

With `x0_range`, the data's range, each step keeps the model's x_0 within it and
re-derives eps from the kept x_0: the published walk, as Ho et al.'s released
sampler clips x_0 (`clip_denoised`), diffusers' DDIMScheduler with `clip_sample` and
`use_clipped_model_output`, and lucidrains' `ddim_sample`. With `unit_eps`, a rule of
this repository's own, the eps of each sample is then scaled to the standard
deviation 1 that a draw of N(0, I) has: a noise model that cannot see its input's
scale, such as the notes' NaiveUnet, then stays on the walk at eta 0
(docs/sampling.md).
"""
import torch
import torch.nn as nn

from mindiffusion.ddpm import DDPM


class DDIM(DDPM):
    """A DDPM sampled with DDIM: `n_steps` model calls (None: all n_T), noise
    scaled by `eta` (0: deterministic; 1: as much noise as DDPM's posterior), the
    model's x_0 kept within `x0_range`, (low, high), where one is given, and with
    `unit_eps` each sample's eps at a standard deviation of 1."""

    def __init__(
        self,
        eps_model: nn.Module,
        betas: tuple[float, float],
        n_T: int,
        eta: float = 0.0,
        n_steps: int | None = None,
        criterion: nn.Module = nn.MSELoss(),
        n_classes: int | None = None,
        p_uncond: float = 0.1,
        x0_range: tuple[float, float] | None = None,
        unit_eps: bool = False,
    ) -> None:
        super().__init__(eps_model, betas, n_T, criterion, n_classes, p_uncond)
        n_steps = n_T if n_steps is None else n_steps
        if not 1 <= n_steps <= n_T:
            raise ValueError(f"n_steps must be between 1 and n_T = {n_T}: {n_steps}")
        if not 0 <= eta <= 1:
            raise ValueError(f"eta must be between 0 and 1: {eta}")
        self.eta = eta
        self.n_steps = n_steps
        self.x0_range, self.unit_eps = x0_range, unit_eps

    @classmethod
    def of(
        cls,
        ddpm: DDPM,
        n_steps: int,
        eta: float = 0.0,
        x0_range: tuple[float, float] | None = None,
        unit_eps: bool = False,
    ) -> "DDIM":
        """A DDIM sampler of `n_steps` on the noise model of a trained `ddpm`, whose
        weights it shares, on ddpm's device."""
        device = ddpm.sqrtab.device
        ddim = cls(ddpm.eps_model, ddpm.betas, ddpm.n_T, eta=eta, n_steps=n_steps,
                   n_classes=ddpm.n_classes, x0_range=x0_range, unit_eps=unit_eps)
        return ddim.to(device)

    @torch.inference_mode()
    def sample(
        self,
        n_sample: int,
        size,
        device,
        c: torch.Tensor | None = None,
        guide_w: float = 0.0,
    ) -> torch.Tensor:
        """DDIM sampling (eq. 12): n_sample images of shape `size`, from x_T to x_0;
        with classes, of classes c guided with weight guide_w, as DDPM.sample."""
        c, guide_w = self.conditioning(n_sample, c, guide_w, device)
        # x_T ~ N(0, I)
        x_t = torch.randn(n_sample, *size, device=device)
        return self.walk(x_t, c, guide_w)

    def timesteps(self) -> list[int]:
        """tau: n_steps + 1 timesteps evenly spaced from n_T down to 0, the data."""
        return torch.linspace(self.n_T, 0, self.n_steps + 1).round().long().tolist()

    @torch.inference_mode()
    def walk(
        self, x_t: torch.Tensor, c: torch.Tensor | None = None, guide_w: float = 0.0
    ) -> torch.Tensor:
        """The walk of `sample` from a given x_T down to x_0, eq. 12 at each step;
        c and guide_w as `conditioning` returns them."""
        tau = self.timesteps()
        for t, t_prev in zip(tau[:-1], tau[1:]):
            x0_pred, eps = self.x0_and_eps(x_t, t, c, guide_w)
            # a_t = \bar{\alpha}_t and a_{prev} at the next timestep; at t = 0, x is the
            # data and a is 1 (the schedules' entry 0 belongs to no noisy x_t)
            ab_t = self.alphabar_t[t]
            ab_prev = self.alphabar_t[t_prev] if t_prev > 0 else torch.ones_like(ab_t)
            # eq. 16: \sigma = \eta \sqrt{(1 - a_{prev}) / (1 - a_t)}
            #                        \sqrt{1 - a_t / a_{prev}}
            sigma = self.eta * torch.sqrt((1 - ab_prev) / (1 - ab_t))
            sigma = sigma * torch.sqrt(1 - ab_t / ab_prev)
            # eq. 12: x_{prev} = \sqrt{a_{prev}} x0_pred
            #                    + \sqrt{1 - a_{prev} - \sigma^2} eps + \sigma z,
            # the root clamped at 0, which rounding can cross when eta = 1
            x_t = (
                ab_prev.sqrt() * x0_pred
                + (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps
                + sigma * torch.randn_like(x_t)
            )
        return x_t

    def x0_and_eps(
        self, x_t: torch.Tensor, t: int, c: torch.Tensor | None, guide_w: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's x_0 and eps at x_t, timestep t: kept within x0_range, and
        eps at the scale of a noise draw, where the DDIM says so."""
        # the same timestep for every image, scaled to (0, 1] as in training
        t_scaled = torch.full((len(x_t), 1), t / self.n_T, device=x_t.device)
        eps = self.guided_eps(x_t, t_scaled, c, guide_w)
        # the model's x_0: (x_t - \sqrt{1 - a_t} eps) / \sqrt{a_t}
        x0_pred = (x_t - self.sqrtmab[t] * eps) / self.sqrtab[t]
        if self.x0_range is not None:
            # x_0 kept within the data's range, and where that moved it, the eps
            # that gives it from x_t: eps = (x_t - \sqrt{a_t} x_0) / \sqrt{1 - a_t}
            kept = x0_pred.clamp(*self.x0_range)
            re_derived = (x_t - self.sqrtab[t] * kept) / self.sqrtmab[t]
            eps = torch.where(kept == x0_pred, eps, re_derived)
            x0_pred = kept
        if self.unit_eps:
            # each sample's eps at the standard deviation of a N(0, I) draw:
            # (n, C, H, W) -> (n, 1, 1, 1) deviations
            eps = eps / eps.flatten(1).std(dim=1).view(-1, 1, 1, 1)
        return x0_pred, eps

    @torch.inference_mode()
    def invert(
        self, x_0: torch.Tensor, c: torch.Tensor | None = None, guide_w: float = 0.0
    ) -> torch.Tensor:
        """The x_T from which the deterministic walk (eta 0) comes down to x_0: the
        walk's steps reversed, up from 0 to n_T (the encoding of section 5.4 of the
        paper, the ODE of eq. 14 run forwards). Each step up to t takes the model's
        eps at t, as the step down from t does: at t = 0 the model was never
        trained. c and guide_w as `conditioning` returns them."""
        tau = self.timesteps()[::-1]
        x = x_0
        for t_prev, t in zip(tau[:-1], tau[1:]):
            _, eps = self.x0_and_eps(x, t, c, guide_w)
            ab_t = self.alphabar_t[t]
            ab_prev = self.alphabar_t[t_prev] if t_prev > 0 else torch.ones_like(ab_t)
            # x_0 as the model sees it from here, then taken up to t along eps:
            # x_t = \sqrt{a_t} x0_pred + \sqrt{1 - a_t} eps
            x0_pred = (x - (1 - ab_prev).sqrt() * eps) / ab_prev.sqrt()
            x = self.sqrtab[t] * x0_pred + self.sqrtmab[t] * eps
        return x


def slerp(x_a: torch.Tensor, x_b: torch.Tensor, fraction: float) -> torch.Tensor:
    """The point `fraction` of the way along the great circle from x_a to x_b, two
    draws of N(0, I) (Shoemake 1985, as the DDIM paper interpolates x_T): unlike
    the straight line, whose middle is too short to be such a draw, every point on
    it has the length that noise has."""
    # the angle between them, from their dot product over their lengths
    cos = (x_a * x_b).sum() / (x_a.norm() * x_b.norm())
    theta = torch.arccos(cos.clamp(-1, 1))
    return (
        torch.sin((1 - fraction) * theta) * x_a + torch.sin(fraction * theta) * x_b
    ) / torch.sin(theta)
