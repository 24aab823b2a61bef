"""Drawing many images from a trained model: batching, autocast and a progress bar around `samplers`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mnist_diff.diffusion import samplers
from mnist_diff.diffusion.schedules import Schedule
from mnist_diff.runtime import accel
from mnist_diff.runtime.data import to_uint8
from mnist_diff.runtime.device import autocast


def batch_sizes(total: int, batch: int) -> list[int]:
    """How `total` images are split into batches of `batch`: a tail of at most an eighth of a batch joins the
    last full one (on a GPU a small batch costs about as long as a full one; the memory a batch may use has
    far more margin than 1/8, see accel.default_sample_batch_size)."""
    sizes = [batch] * (total // batch)
    tail = total % batch
    if tail and sizes and tail <= batch // 8:
        sizes[-1] += tail
    elif tail:
        sizes.append(tail)
    return sizes


@torch.no_grad()
def generate(model, schedule: Schedule, *, num: int, seed: int, start: int = 0, **options) -> torch.Tensor:
    """`num` images as uint8 [num, 1, 28, 28] on the model's device: images start..start+num-1 of `seed`.
    Image i depends only on (seed, i): the batch size (default: what the device holds) and `compile` change
    speed, not the pictures (compiled: up to floating-point rounding). `options`: those of `generate_seeds`."""
    return generate_seeds(model, schedule, samplers.image_seeds(seed, num, start), **options)


@torch.no_grad()
def generate_seeds(
    model,
    schedule: Schedule,
    seeds: Sequence[int],
    *,
    sampler: str = "ddpm",
    ddim_steps: int = 50,
    eta: float = 0.0,
    clip_x0: bool = True,
    batch_size: int | None = None,
    precision: str = "auto",
    progress: bool = True,
    desc: str = "sampling",
    compile: str = "auto",
) -> torch.Tensor:
    """One image per seed (see `samplers.image_seeds`), in their order, drawn together in as few batches as
    the device holds: seeds of different sets (a grid's and a FID set's) may share a pass."""
    from tqdm.auto import tqdm  # imported here so that `bench` needs torch alone

    device = next(model.parameters()).device
    schedule = schedule.to(device)
    was_training = model.training
    model.eval()
    batch_size = batch_size or accel.default_sample_batch_size(device, getattr(model, "channels", 64))
    fast = accel.for_sampling(model, compile=compile, batch_size=batch_size)
    calls = samplers.network_calls(sampler, schedule.timesteps, ddim_steps)
    out, first = [], 0
    with tqdm(
        total=len(seeds) * calls, desc=desc, unit="img-step", unit_scale=True, disable=not progress, leave=False
    ) as bar:
        for count in batch_sizes(len(seeds), batch_size):
            rng = samplers.StackedRandomGenerator(device, seeds[first : first + count])
            with autocast(device, precision):
                x = samplers.sample(
                    fast,
                    schedule,
                    rng,
                    sampler,
                    ddim_steps,
                    eta,
                    progress=lambda k: bar.update(k * count),
                    clip_x0=clip_x0,
                )
            out.append(to_uint8(x))
            first += count
    model.train(was_training)
    return torch.cat(out)
