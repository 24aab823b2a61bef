"""Where a trial's time went: seconds per phase of the work done in this process since the last `reset()`.

Pure accounting, no tracking: the training loop, the samplers' callers and the checkpoint writer add to it; a
study trial resets it when it starts and logs `totals()` when it ends (a process runs one trial at a time).
Work overlapped with training (`--overlap`) counts in its own phase too, so the phases may sum to more than
the wall time.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

PHASES = ("training", "selection_sampling", "selection_fid", "final_sampling", "final_fid", "grids", "checkpoints")

_totals: dict[str, float] = {}
_lock = threading.Lock()  # a trial's side thread (runtime/side_stream.py) adds its phases while training adds its own


def add(phase: str, seconds: float) -> None:
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; one of {', '.join(PHASES)}")
    with _lock:
        _totals[phase] = _totals.get(phase, 0.0) + seconds


@contextmanager
def phase(name: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        add(name, time.perf_counter() - t0)


def reset() -> None:
    _totals.clear()


def totals(wall_seconds: float | None = None) -> dict[str, float]:
    """Seconds per phase (every phase, 0 when none was spent); with the wall time, `other` is the rest
    (model loading, tracking, Python between phases)."""
    out = {p: _totals.get(p, 0.0) for p in PHASES}
    if wall_seconds is not None:
        out["other"] = max(0.0, wall_seconds - sum(out.values()))
    return out
