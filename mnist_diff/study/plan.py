"""A sweep planned from its options before anything runs: the grid (the reference one narrowed by the
shorthands, then the user's dimensions) and how many worker processes. Errors are `GridError`s: one line."""

from __future__ import annotations

import os

from mnist_diff.presets import STUDY_PAIRS
from mnist_diff.study.grid import Grid, GridError, load_file, parse_option, reference_dims


def pairs_of(steps: tuple) -> tuple:
    """The reference (T, beta_end) settings named by `--timesteps` (200, 1000)."""
    return tuple(p for p in STUDY_PAIRS if str(p[0]) in steps)


def study_grid(schedules, steps, samplers, seeds: int, grid_options, grid_file, max_points: int):
    """(Grid, extra dimensions) of a sweep: the reference grid narrowed by the shorthands, then --grid and
    --grid-file dimensions."""
    extra = [parse_option(part) for text in grid_options for part in text.split(";") if part.strip()]
    if grid_file:
        extra += load_file(grid_file)
    if seeds != 1 and any("seed" in d.fields for d in extra):  # the grid's seeds would replace them
        raise GridError(f"--seeds {seeds} and the grid dimension 'seed' both set the seeds: give them in one place")
    grid = Grid.build(reference_dims(schedules, pairs_of(steps), samplers), extra, range(seeds))
    if grid.size > max_points:
        raise GridError(f"the grid has {grid.size} points, more than --max-points {max_points}")
    return grid, extra


def auto_workers(device, preset: str, configs) -> int:
    """`--workers auto`: one per visible GPU. On a CPU, 1, except for the smoke preset: its width-8 model gains
    little from PyTorch's threads, so one single-threaded worker per core (at most one per training) is
    faster (docs/BENCHMARKS.md, smoke study)."""
    if device.type == "cuda":
        import torch

        return max(1, torch.cuda.device_count())
    if preset == "smoke" and device.type == "cpu":
        return max(1, min(os.cpu_count() or 1, len({c.training_key() for c in configs})))
    return 1
