"""`cli.py bench`: training images/s and sampler image-steps/s for the default model on one device.
Needs only torch: it runs on a bare GPU machine."""
from __future__ import annotations

import platform
import statistics
import time

import torch

from .config import Config
from .diffusion import training_loss
from .device import autocast, configure_backend, effective_precision
from .model import UNet, count_parameters
from .samplers import StackedRandomGenerator, ddim_sample, ddpm_sample, image_seeds
from .schedules import make_schedule


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_rate(fn, work: float, repeats: int, device) -> tuple[float, list[float]]:
    """Run `fn` once to warm up, then `repeats` times; the median of work/second."""
    fn()
    rates = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        rates.append(work / (time.perf_counter() - t0))
    return statistics.median(rates), rates


def run_bench(device: torch.device, *, channels: int = 64, batch_size: int = 128, train_steps: int = 20,
              sample_batch: int = 500, sample_steps: int = 20, repeats: int = 5, precision: str = "auto") -> dict:
    torch.manual_seed(0)
    configure_backend(device)  # the flags every command sets, so the numbers are the ones users get
    config = Config(channels=channels, batch_size=batch_size, precision=precision)
    model = UNet(channels=channels).to(device)
    schedule = make_schedule("linear", 1000).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, fused=(device.type == "cuda") or None)
    gen = torch.Generator(device).manual_seed(0)
    data = torch.rand(batch_size, 1, 28, 28, device=device) * 2 - 1

    def train_burst():
        for _ in range(train_steps):
            with autocast(device, precision):
                loss = training_loss(model, schedule, data, gen).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

    train_ips, train_runs = _median_rate(train_burst, train_steps * batch_size, repeats, device)

    model.eval()
    short = make_schedule("linear", sample_steps, 1e-4, 0.2).to(device)  # only the step count matters here
    results = {}
    for name, fn in (("ddpm", lambda rng: ddpm_sample(model, short, rng)),
                     ("ddim", lambda rng: ddim_sample(model, short, rng, steps=sample_steps, eta=0.0))):
        def burst():
            rng = StackedRandomGenerator(device, image_seeds(0, sample_batch))
            with autocast(device, precision):
                fn(rng)
        results[name], _ = _median_rate(burst, sample_batch * sample_steps, repeats, device)

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "precision": effective_precision(device, precision),
        "channels": channels,
        "parameters": count_parameters(model),
        "train_batch": batch_size,
        "train_images_per_s": train_ips,
        "train_images_per_s_runs": train_runs,
        "sample_batch": sample_batch,
        "ddpm_image_steps_per_s": results["ddpm"],
        "ddim_image_steps_per_s": results["ddim"],
        "repeats": repeats,
    }


def format_table(r: dict) -> str:
    rows = [
        ("device", f"{r['device']} ({r['device_type']}, {r['precision']}, torch {r['torch']})"),
        ("model", f"UNet channels={r['channels']}, {r['parameters'] / 1e6:.2f}M parameters"),
        ("train images/s", f"{r['train_images_per_s']:,.0f}  (batch {r['train_batch']}, median of {r['repeats']})"),
        ("DDPM image-steps/s", f"{r['ddpm_image_steps_per_s']:,.0f}  (batch {r['sample_batch']})"),
        ("DDIM image-steps/s", f"{r['ddim_image_steps_per_s']:,.0f}  (batch {r['sample_batch']})"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
