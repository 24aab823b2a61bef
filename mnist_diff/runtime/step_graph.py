"""The whole training step (forward, backward, gradient clipping, fused AdamW, EMA) replayed as one CUDA graph.

Why: at batch 128 the small UNet is launch-bound on a big GPU. On an H100 the compiled model still left the step
at 7.6 ms of wall time for 4.1 ms of GPU work, the host launching the clipping, optimizer and EMA kernels one by
one (docs/BENCHMARKS.md). One replay launches the step at once.

How, after PyTorch's whole-network capture recipe (CUDA semantics notes): a static input batch; the learning
rate and the EMA weight as device tensors, written before each replay; fused AdamW with `capturable`; the
trainer's noise generator registered with the graph, so each replay draws the next noise as an eager step
would; warm-up steps on a side stream; autocast without its weight cache. The model inside is compiled without
CUDA graphs of its own (a graph can't be captured inside another).

Safety: warm-up, capture and check start from a snapshot of the training state and restore it, so a run's
result does not depend on whether the graph is used. Before use, CHECKED_STEPS replays are compared with as
many eager steps from the same state; an exception or a disagreement gives one `CompileFallbackWarning`, and
the process takes eager steps from then on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from mnist_diff.runtime import accel

KIND = "training-graph"  # its name in accel.fell_back()
WARMUP_STEPS = 3  # eager steps before capture (compilation, cuDNN's autotuner, the optimizer's state)
CHECKED_STEPS = 2  # the second checks that each replay draws new noise
TOLERANCE = 0.05  # |graph update - eager update| / |eager update|: bf16 and atomic adds differ by far less


def portable_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict as an eager step would leave it (a float learning rate, not capturable), so
    that a checkpoint resumes anywhere, on a CPU too; the graph sets its own values again when it is built."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        group["lr"] = float(group["lr"])
        group["capturable"] = False
    return state


def weights(trainer) -> list[torch.Tensor]:
    """The tensors a step trains: the model's parameters and the EMA's."""
    return [*trainer.model.parameters(), *(trainer.ema.parameters() if trainer.ema is not None else ())]


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]


class Snapshot:
    """The training state a step changes (weights, EMA, optimizer state, noise generator), to put back in place:
    the same tensors, so addresses a graph captured stay valid. `weights` holds the copies of `weights()`."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.fresh = not trainer.optimizer.state  # before the first step: AdamW creates its state lazily
        live = weights(trainer)
        self.weights = [w.detach().clone() for w in live]
        others = [*(trainer.ema.buffers() if trainer.ema is not None else ()), *_optimizer_tensors(trainer.optimizer)]
        self.saved = [*zip(live, self.weights), *((t, t.detach().clone()) for t in others)]
        self.generator = trainer.noise_gen.get_state()

    @torch.no_grad()
    def restore(self) -> None:
        for live, saved in self.saved:
            live.copy_(saved)
        if self.fresh:  # what AdamW's lazy initialisation would create: zero moments, step 0
            for v in _optimizer_tensors(self.trainer.optimizer):
                v.zero_()
        self.trainer.noise_gen.set_state(self.generator)


def update_error(start: list[torch.Tensor], reference: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """|got - reference| / |reference - start| over all tensors: how far one way of taking steps from `start`
    strays from another, relative to how far the steps moved the weights."""
    moved = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(torch._foreach_sub(reference, start))))
    stray = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(torch._foreach_sub(got, reference))))
    return float(stray / moved.clamp_min(1e-30))


class CudaCapture:
    """Capture with `torch.cuda.CUDAGraph`; warm-up on a side stream, as capture requires."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    @contextlib.contextmanager
    def warmup(self):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            yield
        torch.cuda.current_stream().wait_stream(stream)

    def capture(self, body: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.generator)
        # thread_local: work of a side thread (runtime/side_stream.py) during the capture is not an error
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = body()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay


class RerunCapture:
    """Stands in for the graph where CUDA is absent (tests): a "replay" runs the body again. Everything around
    the graph (snapshot, check, static inputs, the scalars written before each replay) runs for real."""

    def warmup(self):
        return contextlib.nullcontext()

    def capture(self, body: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        return body


class StepGraph:
    """`step(x0, lr, ema_weight)` takes one training step by replaying the graph and returns the loss (a fresh
    tensor: no host sync), or None when the graph is not in use; then the caller takes the eager step. The graph
    is built on the first call, from that step's batch."""

    def __init__(self, trainer, model: torch.nn.Module | None = None, capture=None):
        self.trainer = trainer
        self.model = model
        self.capture = capture
        self.replay: Callable[[], torch.Tensor] | None = None

    def step(self, x0: torch.Tensor, lr: float, ema_weight: float) -> torch.Tensor | None:
        if self.replay is None:
            if KIND in accel.fell_back():  # failed once in this process: each try costs warm-up steps
                return None
            try:
                self._build(x0)
            except Exception as err:
                accel.fall_back(KIND, err, what="CUDA-graph capture")
                return None
        self.x0.copy_(x0)
        self._write(lr, ema_weight)
        return self.replay().clone()

    def _write(self, lr: float, ema_weight: float) -> None:
        """The step's scalars into the tensors the graph reads."""
        self.lr.fill_(lr)
        self.ema_weight.fill_(ema_weight)

    def _body(self) -> torch.Tensor:
        t = self.trainer
        loss = t.forward_backward(self.model, self.x0, graph_safe=True)
        t.apply_update(self.ema_weight)
        return loss

    def _build(self, x0: torch.Tensor) -> None:
        t = self.trainer
        device = x0.device
        if self.model is None:  # compiled, but without CUDA graphs of its own
            self.model = torch.compile(t.model, dynamic=False)
        capture = self.capture if self.capture is not None else CudaCapture(t.noise_gen)
        self.x0 = x0.detach().clone()
        self.lr = torch.zeros((), device=device)
        self.ema_weight = torch.zeros((), device=device)
        for group in t.optimizer.param_groups:
            group["lr"] = self.lr
            group["capturable"] = device.type == "cuda"
        scalars = [t.step_scalars(t.step + i) for i in range(max(WARMUP_STEPS, CHECKED_STEPS))]
        snapshot = Snapshot(t)
        try:
            reference = []
            with capture.warmup():
                for i in range(WARMUP_STEPS):
                    self._write(*scalars[i])
                    self._body()
                    if i < CHECKED_STEPS:
                        reference.append([w.detach().clone() for w in weights(t)])
            snapshot.restore()
            replay = capture.capture(self._body)
            snapshot.restore()
            for i in range(CHECKED_STEPS):
                self._write(*scalars[i])
                replay()
                error = update_error(snapshot.weights, reference[i], [w.detach() for w in weights(t)])
                if not error <= TOLERANCE:
                    raise RuntimeError(
                        f"replay {i + 1} strays from the eager step by {error:.3g} of its update "
                        f"(tolerance {TOLERANCE})"
                    )
        finally:
            snapshot.restore()
        self.replay = replay
