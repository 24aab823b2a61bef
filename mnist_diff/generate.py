"""Drawing many images from a trained model: batching, autocast and a progress bar around `samplers`."""
from __future__ import annotations

import torch
from . import accel, samplers
from .data import to_uint8
from .device import autocast
from .schedules import Schedule


@torch.no_grad()
def generate(model, schedule: Schedule, *, num: int, seed: int, sampler: str = "ddpm", ddim_steps: int = 50,
             eta: float = 0.0, clip_x0: bool = True, batch_size: int | None = None, start: int = 0,
             precision: str = "auto", progress: bool = True, desc: str = "sampling",
             compile: str = "auto") -> torch.Tensor:
    """`num` images as uint8 [num, 1, 28, 28] on the model's device. Image i (counting from `start`) depends
    only on (seed, i): the batch size (default: what the device holds) and `compile` change speed, not the
    pictures (compiled: up to floating-point rounding)."""
    from tqdm.auto import tqdm  # imported here so that `bench` needs torch alone

    device = next(model.parameters()).device
    schedule = schedule.to(device)
    was_training = model.training
    model.eval()
    batch_size = batch_size or accel.default_sample_batch_size(device, getattr(model, "channels", 64))
    fast = accel.for_sampling(model, compile=compile, batch_size=batch_size)
    calls = samplers.network_calls(sampler, schedule.timesteps, ddim_steps)
    out = []
    with tqdm(total=num * calls, desc=desc, unit="img-step", unit_scale=True, disable=not progress,
              leave=False) as bar:
        for first in range(start, start + num, batch_size):
            count = min(batch_size, start + num - first)
            rng = samplers.StackedRandomGenerator(device, samplers.image_seeds(seed, count, first))
            with autocast(device, precision):
                x = samplers.sample(fast, schedule, rng, sampler, ddim_steps, eta,
                                    progress=lambda k: bar.update(k * count), clip_x0=clip_x0)
            out.append(to_uint8(x))
    model.train(was_training)
    return torch.cat(out)
