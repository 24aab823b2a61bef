"""Noise schedules: pure functions from (name, T, beta_start, beta_end) to every coefficient the
forward process, the loss and both samplers need, computed once in float64.

Notation (Ho et al. 2020, "DDPM"):      code                      paper
                                          betas[t]                  beta_t
                                          alphas[t]                 alpha_t = 1 - beta_t
                                          alphas_cumprod[t]         alpha_bar_t
                                          posterior_variance[t]     beta_tilde_t   (eq. 7)
                                          posterior_mean_coef1/2    the two factors of mu_tilde_t (eq. 7)
Index t runs over 0..T-1; index t here is the paper's t+1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from mnist_diff.choices import SCHEDULES, USES_BETA_RANGE

COSINE_OFFSET = 0.008
MAX_BETA = 0.999


def make_betas(name: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """The T betas of a named schedule, float64. Raises ValueError on impossible input."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if int(timesteps) != timesteps or timesteps < 2:
        raise ValueError(f"timesteps must be an integer >= 2, got {timesteps}")
    if USES_BETA_RANGE[name] and not 0.0 < beta_start < beta_end < 1.0:
        raise ValueError(f"need 0 < beta_start < beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
    T = int(timesteps)
    f64 = torch.float64
    if name == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=f64)
    if name == "quadratic":
        return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=f64) ** 2
    if name == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, T, dtype=f64)) * (beta_end - beta_start) + beta_start

    def alpha_bar(s: torch.Tensor) -> torch.Tensor:  # s = t / T in [0, 1]
        return torch.cos((s + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2

    s = torch.arange(T + 1, dtype=f64) / T
    return torch.clamp(1 - alpha_bar(s[1:]) / alpha_bar(s[:-1]), max=MAX_BETA)


@dataclass(frozen=True)
class Schedule:
    """All per-timestep coefficients, shape [T]. Build with `make_schedule`; move with `.to(device)`."""

    name: str
    timesteps: int
    beta_start: float
    beta_end: float
    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    log_snr: torch.Tensor

    @property
    def alpha_bar_T(self) -> float:
        """alpha_bar at the last step: how much signal is left in x_T (0 is pure noise)."""
        return float(self.alphas_cumprod[-1])

    def to(self, device, dtype: torch.dtype = torch.float32) -> Schedule:
        """A copy whose tensors live on `device` in `dtype` (precision is kept by computing in float64 first)."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[key] = value.to(device=device, dtype=dtype)
        return Schedule(**moved)


def make_schedule(name: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    betas = make_betas(name, timesteps, beta_start, beta_end)
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=betas.dtype), alphas_cumprod[:-1]])
    # beta_tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t); it is 0 at t=0, so the log is
    # clipped to the next value, as in improved-diffusion.
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    posterior_log_variance_clipped = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
    return Schedule(
        name=name,
        timesteps=int(timesteps),
        beta_start=float(beta_start),
        beta_end=float(beta_end),
        betas=betas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
        sqrt_one_minus_alphas_cumprod=(1.0 - alphas_cumprod).sqrt(),
        sqrt_recip_alphas_cumprod=(1.0 / alphas_cumprod).sqrt(),
        sqrt_recipm1_alphas_cumprod=(1.0 / alphas_cumprod - 1.0).sqrt(),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_log_variance_clipped,
        posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
        log_snr=torch.log(alphas_cumprod / (1.0 - alphas_cumprod)),
    )
