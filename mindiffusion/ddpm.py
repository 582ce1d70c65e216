"""DDPM (Ho et al. 2020): the noise schedules, the training loss and the sampler.

Notes, section 1. Timesteps are indexed t = 0..T; training draws t from 1..T, and the
sampler walks from x_T down to x_0.
"""
import torch
import torch.nn as nn


def ddpm_schedules(beta1: float, beta2: float, T: int) -> dict[str, torch.Tensor]:
    """The schedule tensors of the notes, T + 1 entries each, indexed by t = 0..T.

    Computed in float64 and stored in float32, so that the long product alphabar_t
    carries no accumulated rounding error.
    """
    if not 0 < beta1 < beta2 < 1:
        raise ValueError(
            f"betas must satisfy 0 < beta1 < beta2 < 1, got ({beta1}, {beta2})"
        )
    if T < 1:
        raise ValueError(f"T, the number of diffusion steps, must be at least 1: {T}")

    # \beta_t = \beta_1 + (\beta_2 - \beta_1) t / T: beta1 at t = 0, beta2 at t = T
    beta_t = beta1 + (beta2 - beta1) * torch.arange(0, T + 1, dtype=torch.float64) / T
    # \sqrt{\beta_t}, the standard deviation of the noise added at each sampling step
    sqrt_beta_t = torch.sqrt(beta_t)
    # \alpha_t = 1 - \beta_t
    alpha_t = 1 - beta_t
    # \bar{\alpha}_t = \prod_{s=0}^{t} \alpha_s
    alphabar_t = torch.cumprod(alpha_t, dim=0)
    # \sqrt{\bar{\alpha}_t}, how much of x_0 is left in x_t
    sqrtab = torch.sqrt(alphabar_t)
    # 1 / \sqrt{\alpha_t}
    oneover_sqrta = 1 / torch.sqrt(alpha_t)
    # \sqrt{1 - \bar{\alpha}_t}, the standard deviation of the noise in x_t
    sqrtmab = torch.sqrt(1 - alphabar_t)
    # (1 - \alpha_t) / \sqrt{1 - \bar{\alpha}_t}, the weight of eps in the sampler
    mab_over_sqrtmab = (1 - alpha_t) / sqrtmab

    schedules = {
        "alpha_t": alpha_t,
        "oneover_sqrta": oneover_sqrta,
        "sqrt_beta_t": sqrt_beta_t,
        "alphabar_t": alphabar_t,
        "sqrtab": sqrtab,
        "sqrtmab": sqrtmab,
        "mab_over_sqrtmab": mab_over_sqrtmab,
    }
    return {name: value.float() for name, value in schedules.items()}


class DDPM(nn.Module):
    """Wraps a noise predictor `eps_model(x_t, t / n_T)` with the n_T-step schedules.

    Calling the module returns the training loss (Algorithm 1); `sample` generates
    images (Algorithm 2). With `n_classes` = K, it is a class-conditional DDPM with
    classifier-free guidance (Ho & Salimans 2021): the model is called as
    `eps_model(x_t, t / n_T, c)` with c in 0..K-1, or K, the null class ("no class"),
    which training puts in place of a label with probability `p_uncond`.
    """

    def __init__(
        self,
        eps_model: nn.Module,
        betas: tuple[float, float],
        n_T: int,
        criterion: nn.Module = nn.MSELoss(),
        n_classes: int | None = None,
        p_uncond: float = 0.1,
    ) -> None:
        super().__init__()
        self.eps_model = eps_model

        # buffers follow the module through .to(device) and into the state_dict,
        # but the optimizer never sees them
        for name, value in ddpm_schedules(betas[0], betas[1], n_T).items():
            self.register_buffer(name, value)

        self.betas = betas
        self.n_T = n_T
        self.criterion = criterion
        self.n_classes = n_classes
        self.p_uncond = p_uncond

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """Algorithm 1 (training): the noise-prediction loss for a batch of images,
        and with classes, of their labels c, shape (B,)."""
        # t ~ Uniform({1, ..., n_T}), one per image
        t = torch.randint(1, self.n_T + 1, (x.shape[0],), device=x.device)
        # \epsilon \sim N(0, I)
        eps = torch.randn_like(x)
        # x_t = \sqrt{\bar{\alpha}_t} x_0 + \sqrt{1 - \bar{\alpha}_t} \epsilon,
        # the schedules indexed (B,) -> (B, 1, 1, 1) to scale each image
        x_t = (
            self.sqrtab[t, None, None, None] * x
            + self.sqrtmab[t, None, None, None] * eps
        )
        if self.n_classes is None:
            # || \epsilon - \epsilon_\theta(x_t, t) ||^2, with t scaled to (0, 1]
            return self.criterion(eps, self.eps_model(x_t, t / self.n_T))
        if c is None:
            raise ValueError(
                f"this DDPM has n_classes={self.n_classes}: pass the labels, "
                f"ddpm(x, c) with c of shape (B,)"
            )
        # each label becomes the null class with probability p_uncond, so that one
        # model learns both \epsilon(x_t, c) and \epsilon(x_t, \varnothing)
        dropped = torch.rand(c.shape, device=c.device) < self.p_uncond
        c = torch.where(dropped, self.n_classes, c)
        return self.criterion(eps, self.eps_model(x_t, t / self.n_T, c))

    def guided_eps(
        self, x_t: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None, guide_w: float
    ) -> torch.Tensor:
        """The noise prediction the samplers use: the model's own, or with classes,
        the classifier-free guided one (eq. 6 of Ho & Salimans 2021)."""
        if self.n_classes is None:
            return self.eps_model(x_t, t)
        if guide_w == 0:
            # (1 + 0) eps(x_t, c) - 0 eps(x_t, null): the null prediction is not needed
            return self.eps_model(x_t, t, c)
        # the conditional and the null predictions in one doubled batch:
        # (n, C, H, W) -> (2n, C, H, W)
        null = torch.full_like(c, self.n_classes)
        eps_c, eps_null = self.eps_model(
            torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([c, null])
        ).chunk(2)
        # \tilde\epsilon = (1 + w) \epsilon(x_t, c) - w \epsilon(x_t, \varnothing):
        # w = 0 is plain conditional sampling; the other convention in use,
        # s \epsilon(x_t, c) + (1 - s) \epsilon(x_t, \varnothing), is s = 1 + w
        return (1 + guide_w) * eps_c - guide_w * eps_null

    def conditioning(
        self, n_sample: int, c: torch.Tensor | None, guide_w: float, device
    ) -> tuple[torch.Tensor | None, float]:
        """The classes to sample and their guidance weight: c and guide_w, or with no
        c given, the null class for all, unguided, since guiding the null class by
        itself, (1 + w) eps(x, null) - w eps(x, null), is eps(x, null) again."""
        if self.n_classes is None:
            if c is not None:
                raise ValueError("c is for a DDPM with n_classes; this one has none")
            return None, guide_w
        if c is None:
            return torch.full((n_sample,), self.n_classes, device=device), 0.0
        return c.to(device), guide_w

    # inference mode: no autograd bookkeeping at all, less even than no_grad keeps
    @torch.inference_mode()
    def sample(
        self,
        n_sample: int,
        size,
        device,
        c: torch.Tensor | None = None,
        guide_w: float = 0.0,
    ) -> torch.Tensor:
        """Algorithm 2 (sampling): n_sample images of shape `size`, from x_T to x_0;
        with classes, of classes c (None: unconditional) guided with weight guide_w.

        Every tensor is made on `device`: nothing is copied over from the CPU per step.
        """
        c, guide_w = self.conditioning(n_sample, c, guide_w, device)
        # x_T ~ N(0, I)
        x_i = torch.randn(n_sample, *size, device=device)
        for i in range(self.n_T, 0, -1):
            # the last step (i = 1) returns the mean itself, with no noise added
            z = torch.randn(n_sample, *size, device=device) if i > 1 else 0
            # the same timestep for every image, as a (n_sample, 1) tensor
            t = torch.full((n_sample, 1), i / self.n_T, device=device)
            eps = self.guided_eps(x_i, t, c, guide_w)
            # x_{i-1} = (x_i - \beta_i/\sqrt{1-\bar{\alpha}_i} eps) / \sqrt{\alpha_i}
            #           + \sqrt{\beta_i} z,   eps = eps_model(x_i, i / n_T)
            x_i = (
                self.oneover_sqrta[i] * (x_i - eps * self.mab_over_sqrtmab[i])
                + self.sqrt_beta_t[i] * z
            )
        return x_i
