"""Make the model fast on this device: channels-last on CUDA, `torch.compile` of the UNet (with CUDA graphs on
CUDA) for sampling and training, and a sampling batch the device can hold.

Nothing here changes what is computed beyond floating-point rounding, and nothing here may fail a run: when
compiling or graph capture fails, one `CompileFallbackWarning` and the rest of the process runs eagerly.
"""

from __future__ import annotations

import copy
import threading
import warnings
from collections.abc import Callable

import torch

from mnist_diff.choices import COMPILE_CHOICES

MIN_BUCKET = 16  # smallest padded batch shape: fewer distinct shapes, fewer compilations
CPU_SAMPLE_BATCH = 64
MAX_SAMPLE_BATCH = 2000  # the GPU is saturated long before; 2000 divides the FID counts (2,000 and 10,000)
SAMPLE_BYTES_PER_IMAGE = 2 << 20  # inference memory per image at width 64 (activations, per-image noise), generous

_failed: set[str] = set()  # "sampling" / "training" / "training-graph" / "fused": failed once in this process


class CompileFallbackWarning(RuntimeWarning):
    """torch.compile or CUDA-graph capture failed; the process goes on eagerly."""


def on_for_cuda(setting: str, device) -> bool:
    """An auto|on|off speed setting resolved for `device`: auto is on for CUDA only."""
    if setting not in COMPILE_CHOICES:
        raise ValueError(f"unknown setting {setting!r}; choose one of {', '.join(COMPILE_CHOICES)}")
    if setting == "auto":
        return torch.device(device).type == "cuda"
    return setting == "on"


def compile_enabled(setting: str, device) -> bool:
    """auto: on for CUDA (launch overhead dominates there), off elsewhere (compiling costs minutes on a CPU)."""
    return on_for_cuda(setting, device)


def fused_enabled(setting: str, device) -> bool:
    """auto: on for CUDA (where the bytes it saves are the time), off elsewhere (the eager forward is the
    reference, and a CPU gains nothing from tensor-core shapes)."""
    return on_for_cuda(setting, device)


def use_fused(model: torch.nn.Module, setting: str, precision: str = "auto") -> torch.nn.Module:
    """Switch `model` (a UNet) to its fused forward where `setting` asks for it, once that forward and its
    backward have run on a 2-image batch at this precision; where they cannot (e.g. no attention kernel here),
    one `CompileFallbackWarning` ("fused") and the eager forward, for this model and every later one of the
    process. Failures of compiling the fused model are the compile fallbacks' (it then runs eagerly, fused)."""
    from mnist_diff.runtime.device import autocast

    device = next(model.parameters()).device
    model.fused = fused_enabled(setting, device) and "fused" not in _failed
    if not model.fused:
        return model
    x = torch.zeros(2, 1, 28, 28, device=device)
    t = torch.zeros(2, dtype=torch.long, device=device)
    try:
        with autocast(device, precision):
            out = model(x, t)
        if torch.is_grad_enabled() and out.requires_grad:
            torch.autograd.grad(out.float().sum(), [p for p in model.parameters() if p.requires_grad])
    except Exception as err:
        model.fused = False
        fall_back("fused", err, what="the fused UNet forward")
    return model


def default_sample_batch_size(device, channels: int = 64) -> int:
    """What the device holds: on CUDA up to MAX_SAMPLE_BATCH images within a quarter of its memory, in steps
    of 250 (so that 2,000 and 10,000 split into whole batches); CPU_SAMPLE_BATCH elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_SAMPLE_BATCH
    total = torch.cuda.get_device_properties(device).total_memory
    fits = int(total / 4 / (SAMPLE_BYTES_PER_IMAGE * max(channels, 8) / 64))
    return max(CPU_SAMPLE_BATCH, min(MAX_SAMPLE_BATCH, fits // 250 * 250))


def device_layout(model: torch.nn.Module) -> torch.nn.Module:
    """Channels-last on CUDA, where cuDNN's NHWC convolutions use the tensor cores, and cuDNN picks its
    fastest convolutions by timing them (results on a GPU are not bit-reproducible anyway, see docs/fid-protocol.md).
    Unchanged elsewhere: on the CPU it would change the rounding of the bit-exact runs."""
    if next(model.parameters()).device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        model = model.to(memory_format=torch.channels_last)
    return model


def fell_back() -> list[str]:
    """What failed to compile or capture in this process and runs eagerly: "sampling", "training",
    "training-graph" (step_graph.py), "fused" (`use_fused`)."""
    return sorted(_failed)


def _compile(module: torch.nn.Module, device: torch.device):
    """The module compiled for its fixed shapes; reduce-overhead replays each shape as one CUDA graph.
    (Not `freezing`: it would bake the weights in, and the weights change under a compiled model.)"""
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    return torch.compile(module, mode=mode, dynamic=False)


def fall_back(kind: str, err: BaseException, what: str = "torch.compile") -> None:
    """Remember that `kind` failed in this process and say so in one warning."""
    _failed.add(kind)
    first = (str(err).strip().splitlines() or [""])[0][:300]
    warnings.warn(
        f"{what} failed for {kind} ({type(err).__name__}: {first}); running eagerly",
        CompileFallbackWarning,
        stacklevel=3,
    )


def _bucket(n: int, batch: int) -> int:
    """The batch shape a call of n images runs at: the sampling batch, or a power of two below it."""
    if n >= batch:
        return n
    size = MIN_BUCKET
    while size < n:
        size *= 2
    return min(size, batch)


# -- sampling ------------------------------------------------------------------------------------------


class _SamplingTwin:
    """A private eval copy of a model: compiled once per process, fixed parameter addresses (which CUDA graphs
    need), the caller's model untouched. `for_sampling` copies the current weights in before each use."""

    def __init__(self, model: torch.nn.Module, compiled: bool):
        self.device = next(model.parameters()).device
        self.module = device_layout(copy.deepcopy(model)).eval().requires_grad_(False)
        self.compiled = None
        if compiled:
            try:
                self.compiled = _compile(self.module, self.device)
            except Exception as err:  # e.g. an unknown backend: raised before the first call
                fall_back("sampling", err)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, batch: int) -> torch.Tensor:
        if x.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        if self.compiled is not None and "sampling" not in _failed:
            try:
                return self._compiled(x, t, batch)
            except Exception as err:  # the call has no side effects: running it again eagerly is safe
                fall_back("sampling", err)
        return self.module(x, t)

    def _compiled(self, x: torch.Tensor, t: torch.Tensor, batch: int) -> torch.Tensor:
        # Pad a partial batch to a fixed shape: one compilation and one graph per shape. Rows never mix in the
        # UNet (GroupNorm and attention are per image), so the padding rows change no image.
        n = x.shape[0]
        size = _bucket(n, batch)
        if size > n:
            x = torch.cat([x, x.new_zeros((size - n, *x.shape[1:]))])
            t = torch.cat([t, t.new_zeros(size - n)])
        cuda_graphs = x.device.type == "cuda"
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # each call is a new step: earlier outputs may be reused
        out = self.compiled(x, t)
        # a CUDA graph's output is overwritten by its next replay: hand out a copy
        return out[:n].clone() if cuda_graphs or size > n else out


_twins: dict = {}


def for_sampling(
    model: torch.nn.Module, *, compile: str = "auto", batch_size: int
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """eps_theta(x, t) for the samplers, as fast as this device allows, computing what `model` computes.
    Eager on the CPU: the model itself. Otherwise a twin of it holding its current weights."""
    device = next(model.parameters()).device
    compiled = compile_enabled(compile, device) and "sampling" not in _failed
    if not compiled and device.type != "cuda":
        return model
    state = model.state_dict()
    # a twin per thread (trials sampling at once in one process, --trials-per-worker, each load their own
    # weights) and per forward (a twin copies the fused flag too)
    shapes = tuple((k, tuple(v.shape), v.dtype) for k, v in state.items())
    key = (threading.get_ident(), type(model), device, compiled, getattr(model, "fused", False), shapes)
    twin = _twins.get(key)
    if twin is None:
        twin = _twins[key] = _SamplingTwin(model, compiled)
    twin.module.load_state_dict(state)  # copies in place: the addresses the graphs captured stay valid
    return lambda x, t: twin(x, t, batch_size)


# -- training ------------------------------------------------------------------------------------------


class TrainingModel:
    """The training model's forward, compiled when asked (on CUDA: forward and backward each replayed as a
    CUDA graph). `step` runs one forward+backward and, when the compiled one fails, warns once, restores the
    random generator and runs it again eagerly: that step, and every later one, is then the eager step."""

    def __init__(self, model: torch.nn.Module, compile: str = "auto"):
        self.model = model
        self.compiled = None
        device = next(model.parameters()).device
        if compile_enabled(compile, device) and "training" not in _failed:
            try:
                self.compiled = _compile(model, device)
            except Exception as err:
                fall_back("training", err)

    @property
    def active(self) -> bool:
        return self.compiled is not None and "training" not in _failed

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (self.compiled if self.active else self.model)(x, t)

    def step(self, forward_backward: Callable[[], torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """`forward_backward()` must call this object for the model and set the gradients from scratch
        (zero_grad before backward), so that running it twice is the same as running it once."""
        if not self.active:
            return forward_backward()
        state = generator.get_state()  # host-side copy; no device sync
        try:
            return forward_backward()
        except Exception as err:
            fall_back("training", err)
        generator.set_state(state)
        return forward_backward()
