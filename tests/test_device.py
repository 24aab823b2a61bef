"""Device numerics: bf16 autocast only where the device has it natively, and the backend flags every command sets."""

import os
from pathlib import Path

import pytest
import torch

from mnist_diff.runtime.device import (
    autocast,
    configure_backend,
    cpu_has_bf16,
    effective_precision,
    native_bf16,
)


@pytest.mark.parametrize(
    "device_type,capability,native",
    [
        ("cuda", (8, 0), True),  # A100
        ("cuda", (8, 6), True),  # RTX 30xx
        ("cuda", (9, 0), True),  # H100
        ("cuda", (12, 0), True),
        ("cuda", (7, 5), False),  # T4, RTX 20xx: bf16 is emulated, slower than fp32
        ("cuda", (7, 0), False),  # V100
        ("cuda", (6, 1), False),
        ("cuda", None, False),
        ("mps", None, False),
    ],
)
def test_bf16_only_where_native(device_type, capability, native):
    assert native_bf16(device_type, capability) is native


def test_precision_on_cpu_follows_its_instructions():
    cpu = torch.device("cpu")
    flags = Path("/proc/cpuinfo").read_text().split()  # what the kernel says this CPU has
    assert cpu_has_bf16() is ("avx512_bf16" in flags or "amx_bf16" in flags or "amx_tile" in flags)
    assert native_bf16("cpu", None) is cpu_has_bf16()
    auto = "bf16" if cpu_has_bf16() else "fp32"
    assert effective_precision(cpu, "auto") == auto
    assert effective_precision(cpu, "bf16") == "bf16" and effective_precision(cpu, "fp32") == "fp32"
    x = torch.ones(2, 2)
    with autocast(cpu, "auto"):
        assert (x @ x).dtype == (torch.bfloat16 if auto == "bf16" else torch.float32)
    with autocast(cpu, "fp32"):
        assert (x @ x).dtype == torch.float32
    with autocast(cpu, "bf16"):
        assert (x @ x).dtype == torch.bfloat16


def test_configure_backend_sets_the_cuda_flags_and_leaves_cpu_alone():
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = False
        configure_backend(torch.device("cpu"))
        assert not (
            torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32 or torch.backends.cudnn.benchmark
        )
        configure_backend("cuda")  # only sets process flags: runs without a GPU too
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.benchmark
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark) = flags


def test_configure_backend_shares_one_inductor_cache_and_keeps_a_users(monkeypatch, tmp_path):
    from mnist_diff.runtime.device import INDUCTOR_CACHE_ENV, inductor_cache_dir
    from mnist_diff.util.paths import CACHE_ROOT

    assert INDUCTOR_CACHE_ENV == "TORCHINDUCTOR_CACHE_DIR"  # the variable torch._inductor reads when compiling
    assert inductor_cache_dir() == CACHE_ROOT / "inductor"  # under $XDG_CACHE_HOME/mnist-diff, as the bench cache
    monkeypatch.delenv(INDUCTOR_CACHE_ENV, raising=False)
    configure_backend(torch.device("cpu"))
    assert Path(os.environ[INDUCTOR_CACHE_ENV]) == inductor_cache_dir()
    monkeypatch.setenv(INDUCTOR_CACHE_ENV, str(tmp_path / "mine"))
    configure_backend("cuda")
    assert os.environ[INDUCTOR_CACHE_ENV] == str(tmp_path / "mine")
