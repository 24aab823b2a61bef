"""torch.profiler over a few training steps (eager and compiled) and a few sampling steps: where a step's
time goes on this device. Prints the top operators by device time and by host time, and ms per step."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mnist_diff.config import Config  # noqa: E402
from mnist_diff.diffusion.schedules import make_schedule  # noqa: E402
from mnist_diff.runtime.data import to_model_range  # noqa: E402
from mnist_diff.runtime.device import configure_backend  # noqa: E402
from mnist_diff.runtime.generate import generate  # noqa: E402
from mnist_diff.training.trainer import Trainer  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def table(prof, key, n=18):
    return prof.key_averages().table(sort_by=key, row_limit=n, max_name_column_width=60)


def main(modes=("on", "off"), steps=10):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configure_backend(device)
    dev_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    images = torch.randint(0, 256, (128, 1, 28, 28), dtype=torch.uint8).to(device)
    for mode in modes:
        config = Config(compile=mode, warmup_steps=10**9)
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(config, images, tmp, progress=False)
            x0 = to_model_range(images)
            trainer.model.train()
            t0 = time.perf_counter()
            for _ in range(3):
                trainer._train_step(x0)
            sync()
            print(f"== train compile={mode}: first 3 steps {time.perf_counter() - t0:.1f} s", flush=True)
            for _ in range(10):
                trainer._train_step(x0)
            sync()
            t0 = time.perf_counter()
            with profile(activities=acts) as prof:
                for _ in range(steps):
                    trainer._train_step(x0)
                sync()
            print(f"== train compile={mode}: {(time.perf_counter() - t0) / steps * 1000:.2f} ms/step (profiled)")
            t0 = time.perf_counter()
            for _ in range(steps):
                trainer._train_step(x0)
            sync()
            print(f"== train compile={mode}: {(time.perf_counter() - t0) / steps * 1000:.2f} ms/step (unprofiled)")
            print(table(prof, dev_key))
            print(table(prof, "self_cpu_time_total"))
            model = trainer.sampling_model
        if mode == "on":
            sched = make_schedule("linear", 20, 1e-4, 0.2)
            batch = 2000 if device.type == "cuda" else 64
            generate(model, sched, num=batch, seed=0, sampler="ddpm", batch_size=batch, progress=False, compile=mode)
            sync()
            t0 = time.perf_counter()
            with profile(activities=acts) as prof:
                generate(
                    model, sched, num=batch, seed=0, sampler="ddpm", batch_size=batch, progress=False, compile=mode
                )
                sync()
            print(
                f"== sample ddpm compile={mode} batch {batch}: {(time.perf_counter() - t0) / 20 * 1000:.2f} "
                f"ms/step (profiled)"
            )
            print(table(prof, dev_key))
            print(table(prof, "self_cpu_time_total", 12))


if __name__ == "__main__":
    main(steps=int(sys.argv[1]) if len(sys.argv) > 1 else 10)
