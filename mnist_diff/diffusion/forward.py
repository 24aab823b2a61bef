"""The forward process q and the training loss (Ho et al. 2020). Pure tensor math: no I/O."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mnist_diff.diffusion.schedules import Schedule


def extract(coef: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """coef[t] shaped [B, 1, 1, ...] to broadcast against a batch of `ndim`-dimensional images."""
    return coef[t].reshape(-1, *([1] * (ndim - 1)))


def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)   (eq. 4)."""
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
        + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
    )


def predict_x0(schedule: Schedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_0 implied by a noise prediction: (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
    return (
        extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
        - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps
    )


def q_posterior(schedule: Schedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
    """Mean and variance of q(x_{t-1} | x_t, x_0)   (eqs. 6-7)."""
    mean = (
        extract(schedule.posterior_mean_coef1, t, x_t.ndim) * x0
        + extract(schedule.posterior_mean_coef2, t, x_t.ndim) * x_t
    )
    return mean, extract(schedule.posterior_variance, t, x_t.ndim)


def training_loss(model, schedule: Schedule, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The simple epsilon-prediction loss (eq. 14): t ~ U{0..T-1}, MSE between true and predicted noise.
    Returns the per-image loss [B] in float32, so the caller decides how to reduce and check it."""
    batch = x0.shape[0]
    t = torch.randint(0, schedule.timesteps, (batch,), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    eps = model(q_sample(schedule, x0, t, noise), t)
    return F.mse_loss(eps.float(), noise.float(), reduction="none").flatten(1).mean(1)
