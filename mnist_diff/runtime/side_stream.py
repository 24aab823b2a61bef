"""Work that runs beside the training loop: one job at a time on a thread of its own and, on CUDA, on a CUDA
stream of its own, so that a finished epoch is sampled and scored while the next one trains.

Turned off, a job runs at once in the caller's thread: the same code path, in turn. Turned on, the results
are the same: the job sees only what the caller handed it (a snapshot of the weights), its kernels wait for
the caller's stream up to the moment of submission, and it computes on the CPU with the caller's number of
threads (a CPU kernel's rounding may depend on it).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

from mnist_diff.runtime import timing

T = TypeVar("T")


def use_threads(count: int) -> None:
    """Compute on the CPU with `count` threads in this thread: a new thread starts with the machine's count, not
    the one its creator set (a worker's share of the cores), and a kernel's rounding may depend on it."""
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)


class SideStream:
    def __init__(self, device, enabled: bool):
        self.device = torch.device(device)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mnist-diff-side") if enabled else None
        self._stream = torch.cuda.Stream(self.device) if enabled and self.device.type == "cuda" else None

    def submit(self, job: Callable[[], T], beside: bool = True) -> Future[T]:
        """Run `job()` beside the caller (at once when off or not `beside`); its result or exception comes
        from the Future."""
        if self._pool is None or not beside:
            done: Future = Future()
            try:
                done.set_result(job())
            except BaseException as err:  # handed to whoever collects it, as from a thread
                done.set_exception(err)
            return done
        threads = torch.get_num_threads()
        ready = None
        if self._stream is not None:  # the job's inputs were written on the caller's stream
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        return self._pool.submit(self._run, job, threads, ready, timing.current())

    def _run(self, job: Callable[[], T], threads: int, ready, ledger: dict) -> T:
        use_threads(threads)
        with timing.using(ledger):  # the time counts in the caller's trial
            if self._stream is None:
                return job()
            self._stream.wait_event(ready)
            with torch.cuda.stream(self._stream):
                out = job()
            self._stream.synchronize()  # the results are complete before the caller reads them on its stream
            return out

    def close(self, wait: bool = True) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=not wait)
