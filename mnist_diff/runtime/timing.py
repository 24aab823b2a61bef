"""Where a trial's time went: seconds per phase of the work done in this process since the last `reset()`.

Pure accounting, no tracking: the training loop, the samplers' callers and the checkpoint writer add to it; a
study trial resets it when it starts and logs `totals()` when it ends. Each thread that reset keeps its own
ledger, so trials that run at once in one process (`--trials-per-worker`) each count their own work.
Work overlapped with training (`--overlap`) counts in its own phase too, so the phases may sum to more than
the wall time.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

PHASES = ("training", "selection_sampling", "selection_fid", "final_sampling", "final_fid", "grids", "checkpoints")

_process: dict[str, float] = {}  # the ledger of a thread that has none of its own
_local = threading.local()  # a thread's own ledger: several trials run at once in one worker (--trials-per-worker)
_lock = threading.Lock()  # a trial's side thread (runtime/side_stream.py) adds its phases while training adds its own


def current() -> dict[str, float]:
    """This thread's ledger: its own after `reset()`, else the process's."""
    return getattr(_local, "ledger", _process)


@contextmanager
def using(ledger: dict[str, float]):
    """Add to `ledger` in this thread (a side thread's work counts in the trial that handed it over)."""
    before = getattr(_local, "ledger", None)
    _local.ledger = ledger
    try:
        yield
    finally:
        if before is None:
            del _local.ledger
        else:
            _local.ledger = before


def add(phase: str, seconds: float) -> None:
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; one of {', '.join(PHASES)}")
    with _lock:
        ledger = current()
        ledger[phase] = ledger.get(phase, 0.0) + seconds


@contextmanager
def phase(name: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        add(name, time.perf_counter() - t0)


def reset() -> None:
    """A new ledger for this thread (the trial it runs starts)."""
    _local.ledger = {}


def totals(wall_seconds: float | None = None) -> dict[str, float]:
    """Seconds per phase (every phase, 0 when none was spent); with the wall time, `other` is the rest
    (model loading, tracking, Python between phases)."""
    ledger = current()
    out = {p: ledger.get(p, 0.0) for p in PHASES}
    if wall_seconds is not None:
        out["other"] = max(0.0, wall_seconds - sum(out.values()))
    return out
