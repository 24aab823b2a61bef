"""Several trials at once in one worker process (`sweep --trials-per-worker N`): N threads, "lanes", each
taking grid points from the study in turn, on CUDA each on a CUDA stream of its own.

Why threads in one process: separate processes' kernels take turns on a GPU (without MPS), so N workers train
at the rate of one; streams of one process overlap, and the process compiles each graph once. A trial in a
lane is the same trial as in a worker of its own: one Optuna trial, one MLflow run, its own model, optimizer,
generators, captured step graph and sampling twin; the same seeds give the same results.

A stop signal reaches the main thread, which only waits for the lanes: each lane's training saves at its next
step and stops, a lane that is scoring finishes its trial, no lane starts another; then the signal is raised
as `Interrupted` where a single trial would have raised it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import torch

from mnist_diff.runtime.side_stream import use_threads
from mnist_diff.training.trainer import Interrupted, StopSignals

JOIN_POLL_SECONDS = 0.2  # how often the waiting main thread wakes: Python runs signal handlers between waits


def stopping() -> bool:
    """Whether a stop signal came that a lane should act on before taking another trial."""
    stop = StopSignals.active
    return stop is not None and stop.received is not None


def run_lanes(count: int, lane: Callable[[], None], device) -> None:
    """`lane()` in `count` threads at once; returns when all have returned. The first error (a stop first)
    is raised once all lanes are done."""
    device = torch.device(device)
    errors: list[BaseException] = []
    threads = torch.get_num_threads()

    def run() -> None:
        use_threads(threads)
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                lane()
        except BaseException as err:  # collected: the main thread raises it
            errors.append(err)

    stop = StopSignals.active
    workers = [threading.Thread(target=run, name=f"lane-{i + 1}", daemon=True) for i in range(count)]
    with stop.deferring() if stop is not None else contextlib.nullcontext():
        for w in workers:
            w.start()
        for w in workers:
            while w.is_alive():
                w.join(JOIN_POLL_SECONDS)
    if stop is not None and stop.received is not None:
        raise Interrupted(f"{stop.received}: the running trials saved and stopped", stop.received_signum)
    stops = [e for e in errors if isinstance(e, KeyboardInterrupt)]
    if stops or errors:
        raise (stops or errors)[0]
