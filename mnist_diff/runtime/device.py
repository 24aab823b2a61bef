"""The device and its numerics, decided in one place: `train`, `sample`, `evaluate`, every `sweep` worker and
`bench` pick the device, set the backend flags and choose the autocast precision through these functions,
so `bench` measures what the other commands run."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from mnist_diff.util.paths import CACHE_ROOT

BF16_MIN_CAPABILITY = (8, 0)  # Ampere: the first CUDA GPUs with native bf16 tensor cores


def resolve_device(name: str = "auto") -> torch.device:
    """auto picks CUDA, then MPS, then CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def inductor_cache_dir() -> Path:
    """Where torch.compile's compiled kernels are kept: one folder every process of every study shares, and
    later calls reuse (a worker then loads instead of compiling); torch's default is a per-user temp folder."""
    return CACHE_ROOT / "inductor"


def configure_backend(device) -> None:
    """On every device: torch.compile's cache in `inductor_cache_dir()` unless TORCHINDUCTOR_CACHE_DIR is set
    (read when compiling, so set here before any compile). On CUDA: TF32 matmuls and convolutions, and cuDNN's
    autotuner (our input shapes never change). Process-wide settings."""
    os.environ.setdefault(INDUCTOR_CACHE_ENV, str(inductor_cache_dir()))
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), which oneDNN's convolutions use."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def native_bf16(device_type: str, capability: tuple[int, int] | None) -> bool:
    """Whether bf16 autocast runs natively, and so faster than fp32 for this model: CUDA with compute capability
    8.0 or newer, or a CPU with bf16 instructions (on an AMD EPYC with AVX512-BF16, about 1.7x for sampling at
    widths 8 and 64 and for training at width 64; docs/BENCHMARKS.md). Older GPUs and other CPUs emulate bf16
    (slower than fp32); MPS autocast gains nothing for this model."""
    if device_type == "cpu":
        return cpu_has_bf16()
    return device_type == "cuda" and capability is not None and tuple(capability) >= BF16_MIN_CAPABILITY


def _capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def effective_precision(device, precision: str) -> str:
    """auto means bf16 where the device computes it natively (see `native_bf16`), fp32 elsewhere; fp32 and
    bf16 are taken as asked."""
    if precision == "auto":
        device = torch.device(device)
        return "bf16" if native_bf16(device.type, _capability(device)) else "fp32"
    return precision


def autocast(device, precision: str, graph_safe: bool = False):
    """bf16 autocast when the effective precision is bf16; a no-op otherwise. `graph_safe`: without autocast's
    cache of cast weights, which CUDA-graph capture does not allow."""
    device = torch.device(device)
    if effective_precision(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not graph_safe)
    return contextlib.nullcontext()
