"""A study's grid points and how the report names them: shared by the analysis, its text and its figures."""

from __future__ import annotations

from typing import NamedTuple

from mnist_diff.study.grid import REFERENCE_FIELDS


class Point(NamedTuple):
    """One grid point: a config plus its seed. `extra` holds the other fields the grid varies, as ((field,
    value), ...) in grid order."""

    schedule: str
    timesteps: int
    beta_end: float
    sampler: str
    seed: int
    extra: tuple = ()

    @property
    def config(self) -> tuple:
        return (*self[:4], self.extra)

    def as_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in REFERENCE_FIELDS}, **dict(self.extra), "seed": self.seed}


def fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# -- loading -------------------------------------------------------------------------------------------


def label(p) -> str:
    """A point (with its seed) or a config tuple (schedule, T, beta_end, sampler, extra)."""
    extra = p.extra if isinstance(p, Point) else (p[4] if len(p) > 4 else ())
    s = f"{p[0]}, T={p[1]}, β_end={p[2]:g}, {p[3]}" + "".join(f", {k}={fmt(v)}" for k, v in extra)
    return s + (f", seed {p.seed}" if isinstance(p, Point) else "")


def group_label(g) -> str:
    return f"T={g[0]}, β_end={g[1]:g}" if isinstance(g, (list, tuple)) else fmt(g)
