"""`bench` results cached per device, so `sweep` projects a study's time from this device's own rates.

One JSON file per device under `~/.cache/mnist-diff/bench/` (or `MNIST_DIFF_BENCH_CACHE`), holding one entry
per (channels, training batch, effective precision, torch version[, CPU threads]): the things a rate depends
on. `bench` writes its full result there; without one, `sweep` runs a short bench (seconds) and caches that.
Needs only torch, like `bench`.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path

import torch

from mnist_diff.util.atomic import write_json
from mnist_diff.util.paths import CACHE_ROOT

ENV = "MNIST_DIFF_BENCH_CACHE"
# Bump when what a figure measures changes: cached quick figures of another version are measured again.
# 2: every timed repeat lasts bench.MIN_SECONDS at least (1 timed one call: start-up, not a rate)
# 3: sampling at the steady state (two pass lengths: a fixed cost per pass and a rate per step), compile seconds
BENCH_VERSION = 3


def device_name(device) -> str:
    """The GPU's name, or the CPU's model (two CPUs of one architecture differ a lot in speed)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or device.type


def cache_dir() -> Path:
    return Path(os.environ.get(ENV) or CACHE_ROOT / "bench")


def cache_path(device) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{torch.device(device).type}-{device_name(device)}").strip("-")
    return cache_dir() / f"{slug}.json"


def entry_key(device, channels: int, batch_size: int, precision: str) -> str:
    """Keyed by the precision that runs ('auto' resolved): an entry measured before auto meant bf16 here is not
    taken for one."""
    from mnist_diff.runtime.device import effective_precision

    key = (
        f"channels={channels} batch={batch_size} precision={effective_precision(device, precision)} "
        f"torch={torch.__version__}"
    )
    if torch.device(device).type == "cpu":  # CPU rates scale with the threads torch uses
        key += f" threads={torch.get_num_threads()}"
    return key


def _read(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
        return doc if isinstance(doc.get("entries"), dict) else {}
    except (OSError, ValueError, AttributeError):  # missing or damaged: measure again
        return {}


def load(device, channels: int, batch_size: int, precision: str) -> dict | None:
    """The cached bench result for this device and model, or None."""
    return _read(cache_path(device)).get("entries", {}).get(entry_key(device, channels, batch_size, precision))


def save(result: dict, device, precision: str) -> Path:
    """Cache a `run_bench` result under the precision that ran (see `entry_key`)."""
    path = cache_path(device)
    doc = _read(path) or {"device": device_name(device), "entries": {}}
    doc["entries"][entry_key(device, result["channels"], result["train_batch"], precision)] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json(path, doc)


MAX_AGE_DAYS = 30  # older figures may predate driver, library or machine changes


def outdated(entry: dict, now: float | None = None) -> str | None:
    """Why a cached figure may no longer be this device's rate (another version of the bench measured it, or
    long ago), or None. Another torch version is another entry (`entry_key`)."""
    version = entry.get("bench_version", 1)
    if version != BENCH_VERSION:
        return f"measured by bench version {version}, now {BENCH_VERSION}"
    days = ((now or time.time()) - entry.get("measured_at", 0)) / 86400
    return f"measured {days:.0f} days ago" if days > MAX_AGE_DAYS else None


def busy(entry: dict) -> str | None:
    """A note when the machine was busy while the figure was measured (other work's load average over half
    its cores): its rates are then those of a shared machine, or None."""
    load, cores = entry.get("load_average"), entry.get("cores")
    if load is None or not cores or load <= cores / 2:
        return None
    return f"measured under load {load:.1f} on {cores} cores"
