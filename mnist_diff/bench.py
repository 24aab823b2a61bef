"""`cli.py bench`: training images/s and sampling image-evaluations/s of the default model on one device, eager
and compiled side by side. Runs the real training step and the real sampling path (`Trainer`, `generate`);
needs nothing from the tracking stack, so it runs on a bare GPU machine."""
from __future__ import annotations

import platform
import statistics
import tempfile
import time

import torch

from . import accel
from .config import Config
from .device import configure_backend, effective_precision
from .generate import generate
from .model import UNet, count_parameters
from .schedules import make_schedule


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_rate(fn, work: float, repeats: int, device) -> tuple[float, list[float], float]:
    """Run `fn` once to warm up (compilation, graph capture), then `repeats` times: the median of work/second,
    every rate, and the seconds of the first call."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    rates = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        rates.append(work / (time.perf_counter() - t0))
    return statistics.median(rates), rates, first


def _bench_mode(device, compile: str, *, channels, batch_size, train_steps, sample_batch, sample_steps, repeats,
                precision) -> dict:
    from .data import to_model_range
    from .train import Trainer

    config = Config(channels=channels, batch_size=batch_size, precision=precision, compile=compile,
                    warmup_steps=10 ** 9)  # a tiny, constant-ish lr: the weights stay sane over many steps
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 1, 28, 28), dtype=torch.uint8, generator=gen).to(device)
    with tempfile.TemporaryDirectory() as tmp:  # the trainer writes nothing until fit(); a folder it may own
        trainer = Trainer(config, images, tmp, progress=False)
        x0 = to_model_range(images)
        trainer.model.train()

        def train_burst():
            for _ in range(train_steps):
                trainer._train_step(x0)  # the real step: forward, backward, clipping, AdamW, EMA

        train_ips, train_runs, train_first = _median_rate(train_burst, train_steps * batch_size, repeats, device)
        model = trainer.sampling_model
        out = {"train_images_per_s": train_ips, "train_images_per_s_runs": train_runs,
               "train_first_call_s": train_first}
        schedules = {"ddpm": make_schedule("linear", sample_steps, 1e-4, 0.2),  # only the step count matters
                     "ddim": make_schedule("linear", 1000)}
        for name, schedule in schedules.items():
            def burst():
                generate(model, schedule, num=sample_batch, seed=0, sampler=name, ddim_steps=sample_steps,
                         batch_size=sample_batch, precision=precision, progress=False, compile=compile)
            rate, _, first = _median_rate(burst, sample_batch * sample_steps, repeats, device)
            out[f"{name}_image_steps_per_s"], out[f"{name}_first_call_s"] = rate, first
    return out


def run_bench(device: torch.device, *, channels: int = 64, batch_size: int = 128, train_steps: int = 20,
              sample_batch: int | None = None, sample_steps: int = 20, repeats: int = 5, precision: str = "auto",
              compile: str = "auto") -> dict:
    """Eager always; compiled too when `compile` is on (auto: on CUDA). The top-level rates are those a run
    with this `compile` setting gets (compiled if it was measured and did not fall back)."""
    torch.manual_seed(0)
    configure_backend(device)  # the flags every command sets, so the numbers are the ones users get
    sample_batch = sample_batch or accel.default_sample_batch_size(device, channels)
    kwargs = dict(channels=channels, batch_size=batch_size, train_steps=train_steps, sample_batch=sample_batch,
                  sample_steps=sample_steps, repeats=repeats, precision=precision)
    modes = {"eager": _bench_mode(device, "off", **kwargs)}
    if accel.compile_enabled(compile, device):
        modes["compiled"] = _bench_mode(device, "on", **kwargs)
        modes["compiled"]["fell_back"] = accel.fell_back()
    used = modes.get("compiled", modes["eager"])
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "precision": effective_precision(device, precision),
        "channels": channels,
        "parameters": count_parameters(UNet(channels=channels)),
        "train_batch": batch_size,
        "sample_batch": sample_batch,
        "sample_steps": sample_steps,
        "repeats": repeats,
        **{k: used[k] for k in ("train_images_per_s", "ddpm_image_steps_per_s", "ddim_image_steps_per_s")},
        "modes": modes,
    }


def format_table(r: dict) -> str:
    modes = r["modes"]
    head = [("device", f"{r['device']} ({r['device_type']}, {r['precision']}, torch {r['torch']})"),
            ("model", f"UNet channels={r['channels']}, {r['parameters'] / 1e6:.2f}M parameters")]
    width = max(len(k) for k, _ in head)
    lines = [f"{k:<{width}}  {v}" for k, v in head]
    rows = [("train images/s", "train_images_per_s", f"batch {r['train_batch']}"),
            ("DDPM image-evaluations/s", "ddpm_image_steps_per_s", f"batch {r['sample_batch']}"),
            ("DDIM image-evaluations/s", "ddim_image_steps_per_s", f"batch {r['sample_batch']}")]
    names = list(modes)
    lines.append(f"{'measure':<26}" + "".join(f"{n:>14}" for n in names) + "   (first call s: "
                 + ", ".join(names) + f"; median of {r['repeats']})")
    for label, key, note in rows:
        first = key.replace("image_steps_per_s", "first_call_s").replace("images_per_s", "first_call_s")
        lines.append(f"{label:<26}" + "".join(f"{modes[n][key]:>14,.0f}" for n in names)
                     + f"   {note}; " + ", ".join(f"{modes[n][first]:.1f}" for n in names))
    failed = modes.get("compiled", {}).get("fell_back")
    if failed:
        lines.append(f"compiled fell back to eager for: {', '.join(failed)} (see the warning above)")
    return "\n".join(lines)
