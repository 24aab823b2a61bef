"""DDPM and DDIM samplers: plain functions of (model, schedule, random source). No I/O, no state.

`model(x_t, t)` predicts the noise eps. With `clip_x0` (the default) both samplers clip the predicted x_0 to
[-1, 1] at every step, the data range; without it they follow the closed-form updates unchanged. Clipping
changes DDPM (T clipped steps) and DDIM (`steps` clipped steps, eps recomputed) differently, so it is part of
any DDPM-vs-DDIM comparison.
Random numbers come from a `StackedRandomGenerator`: one generator per image, so an image depends on
its seed only, never on the batch it was drawn in (as in NVlabs/edm).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mnist_diff.choices import SAMPLERS
from mnist_diff.diffusion.forward import predict_x0, q_posterior
from mnist_diff.diffusion.schedules import Schedule

# Per-step noise is drawn for this many steps at once per image: one generator call per image per block
# instead of per step. Blocks are fixed by step index, so images stay independent of the batch size.
NOISE_BLOCK = 50


class StackedRandomGenerator:
    """A batch of independent torch.Generators, one per image seed."""

    def __init__(self, device, seeds: Sequence[int]):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s) % (1 << 63)) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, size: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[len(seeds), *size] standard normal numbers; row i comes from seed i alone."""
        return torch.stack(
            [torch.randn(tuple(size), generator=g, device=self.device, dtype=dtype) for g in self.generators]
        )


def image_seeds(seed: int, count: int, start: int = 0) -> list[int]:
    """The seeds of images start..start+count-1 of a run with base seed `seed`."""
    return [seed * 1_000_003 + i for i in range(start, start + count)]


def ddim_timesteps(timesteps: int, steps: int) -> list[int]:
    """`steps` evenly spaced timesteps from T-1 down to 0, both ends included (the "trailing-exact"
    spacing: linspace, rounded). Raises ValueError when they can't be distinct."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"ddim_steps must be a positive integer, got {steps}")
    if steps > timesteps:
        raise ValueError(f"ddim_steps ({steps}) cannot exceed timesteps ({timesteps})")
    if steps == 1:
        return [timesteps - 1]
    grid = torch.linspace(timesteps - 1, 0, steps, dtype=torch.float64).round().long().tolist()
    return grid  # distinct: the spacing (T-1)/(steps-1) >= 1 whenever steps <= T


def _noise_at(rng: StackedRandomGenerator, shape, index: int, total: int, cache: dict) -> torch.Tensor:
    block = index // NOISE_BLOCK
    if cache.get("block") != block:
        length = min(NOISE_BLOCK, total - block * NOISE_BLOCK)
        cache["block"], cache["noise"] = block, rng.randn((length, *shape))
    return cache["noise"][:, index % NOISE_BLOCK]


Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def ddpm_sample(
    model: Model,
    schedule: Schedule,
    rng: StackedRandomGenerator,
    shape=(1, 28, 28),
    progress: Callable[[int], None] | None = None,
    clip_x0: bool = True,
) -> torch.Tensor:
    """Ancestral sampling over all T steps: x_{t-1} = mu_tilde(x_t, x0_hat) + sqrt(beta_tilde_t) z  (eqs. 6-7),
    with x0_hat = predict_x0(x_t, eps_theta(x_t, t)), clipped to [-1, 1] when `clip_x0`. Unclipped, mu_tilde
    is exactly Ho et al.'s eq. (11) mean. No noise is added at the last step."""
    x = rng.randn(shape)
    cache: dict = {}
    T = schedule.timesteps
    for i, t_int in enumerate(range(T - 1, -1, -1)):
        t = torch.full((len(rng),), t_int, device=x.device, dtype=torch.long)
        x0 = predict_x0(schedule, x, t, model(x, t).float())
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        mean, var = q_posterior(schedule, x0, x, t)
        x = mean + var.sqrt() * _noise_at(rng, shape, i, T, cache) if t_int > 0 else mean
        if progress:
            progress(1)
    return x


@torch.no_grad()
def ddim_sample(
    model: Model,
    schedule: Schedule,
    rng: StackedRandomGenerator,
    steps: int = 50,
    eta: float = 0.0,
    shape=(1, 28, 28),
    progress: Callable[[int], None] | None = None,
    clip_x0: bool = True,
) -> torch.Tensor:
    """DDIM (Song et al. 2021), eq. (12): from timestep t to the next one s < t,
        x_s = sqrt(a_s) x0_hat + sqrt(1 - a_s - sigma^2) eps_hat + sigma z,
        sigma = eta sqrt((1 - a_s) / (1 - a_t)) sqrt(1 - a_t / a_s)            (eq. 16)
    where a = alpha_bar of the timestep actually moved to (a_s = 1 after the final step at t=0).
    With `clip_x0`, x0_hat is clipped to [-1, 1] and eps_hat is recomputed from the clipped x0_hat, so that
    x0_hat and eps_hat still add up to x_t (x_t = sqrt(a_t) x0_hat + sqrt(1 - a_t) eps_hat). Without it, eps_hat
    is the model's own prediction (which the recomputation would only reproduce up to rounding)."""
    seq = ddim_timesteps(schedule.timesteps, steps)
    x = rng.randn(shape)
    cache: dict = {}
    ac = schedule.alphas_cumprod
    for i, t_int in enumerate(seq):
        t = torch.full((len(rng),), t_int, device=x.device, dtype=torch.long)
        eps = model(x, t).float()
        x0 = predict_x0(schedule, x, t, eps)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        if i == len(seq) - 1:
            x = x0
        else:
            a_t, a_s = ac[t_int], ac[seq[i + 1]]
            if clip_x0:
                eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
            sigma = eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)).sqrt()
            x = a_s.sqrt() * x0 + (1 - a_s - sigma**2).clamp(min=0).sqrt() * eps
            if eta > 0:
                x = x + sigma * _noise_at(rng, shape, i, len(seq), cache)
        if progress:
            progress(1)
    return x


def sample(
    model: Model,
    schedule: Schedule,
    rng: StackedRandomGenerator,
    sampler: str = "ddpm",
    ddim_steps: int = 50,
    eta: float = 0.0,
    shape=(1, 28, 28),
    progress: Callable[[int], None] | None = None,
    clip_x0: bool = True,
) -> torch.Tensor:
    """Images from the named sampler: in [-1, 1] with `clip_x0`, possibly a little outside without it."""
    if sampler == "ddpm":
        return ddpm_sample(model, schedule, rng, shape, progress, clip_x0)
    if sampler == "ddim":
        return ddim_sample(model, schedule, rng, ddim_steps, eta, shape, progress, clip_x0)
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


def network_calls(sampler: str, timesteps: int, ddim_steps: int) -> int:
    """Model evaluations per image."""
    return timesteps if sampler == "ddpm" else ddim_steps
