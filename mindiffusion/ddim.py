"""DDIM (Song et al. 2020): sample a trained DDPM in a few steps.

DDIM keeps DDPM's model, schedules and training loss, and changes only the sampler:
it walks a few evenly spaced timesteps from n_T down to 0, and with eta = 0 no noise
is added on the way. A DDPM checkpoint loads into `DDIM` as it is.
"""
import torch
import torch.nn as nn

from mindiffusion.ddpm import DDPM


class DDIM(DDPM):
    """A DDPM sampled with DDIM: `n_steps` model calls (None: all n_T), and noise
    scaled by `eta` (0: deterministic; 1: as much noise as DDPM's posterior)."""

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
    ) -> None:
        super().__init__(eps_model, betas, n_T, criterion, n_classes, p_uncond)
        n_steps = n_T if n_steps is None else n_steps
        if not 1 <= n_steps <= n_T:
            raise ValueError(f"n_steps must be between 1 and n_T = {n_T}: {n_steps}")
        if not 0 <= eta <= 1:
            raise ValueError(f"eta must be between 0 and 1: {eta}")
        self.eta = eta
        self.n_steps = n_steps

    @classmethod
    def of(cls, ddpm: DDPM, n_steps: int, eta: float = 0.0) -> "DDIM":
        """A DDIM sampler of `n_steps` on the noise model of a trained `ddpm`, whose
        weights it shares, on ddpm's device."""
        device = ddpm.sqrtab.device
        ddim = cls(ddpm.eps_model, ddpm.betas, ddpm.n_T, eta=eta, n_steps=n_steps,
                   n_classes=ddpm.n_classes)
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
        # tau: n_steps + 1 timesteps evenly spaced from n_T down to 0, the data
        tau = torch.linspace(self.n_T, 0, self.n_steps + 1).round().long().tolist()
        # x_T ~ N(0, I)
        x_t = torch.randn(n_sample, *size, device=device)
        for t, t_prev in zip(tau[:-1], tau[1:]):
            # the same timestep for every image, scaled to (0, 1] as in training
            t_scaled = torch.full((n_sample, 1), t / self.n_T, device=device)
            eps = self.guided_eps(x_t, t_scaled, c, guide_w)
            # a_t = \bar{\alpha}_t and a_{prev} at the next timestep; at t = 0, x is the
            # data and a is 1 (the schedules' entry 0 belongs to no noisy x_t)
            ab_t = self.alphabar_t[t]
            ab_prev = self.alphabar_t[t_prev] if t_prev > 0 else torch.ones_like(ab_t)
            # the model's x_0: (x_t - \sqrt{1 - a_t} eps) / \sqrt{a_t}
            x0_pred = (x_t - self.sqrtmab[t] * eps) / self.sqrtab[t]
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
