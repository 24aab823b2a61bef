"""Study grids over the run configuration; the reference study's grid is the default one.

A grid is a product of dimensions. A dimension varies one `Config` field (`ddim_steps=10,50,100`) or several
coupled ones as one categorical (`timesteps:beta_end=200:0.08,1000:0.02`: two points, not four). Its Optuna
parameter is named by its fields joined with "_" and a coupled value is written "200:0.08", so the reference
grid keeps the names it always had: schedule, timesteps_beta_end, sampler, seed.

Pure (no optuna, mlflow or click): `study` builds its Optuna grid from a `Grid`, `cli` parses `--grid` and
`--grid-file` with it, `bench` and `sweep --dry-run` project its cost, `report` reads the fields back.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from itertools import product
from pathlib import Path

from mnist_diff.config import Config
from mnist_diff.presets import STUDY_PAIRS, STUDY_SAMPLERS, STUDY_SCHEDULES

MAX_POINTS = 256
# The fields every grid point has, varied or not: the reference study's dimensions (a point adds its seed).
REFERENCE_FIELDS = ("schedule", "timesteps", "beta_end", "sampler")
# The protocol a study's claims are checked on: the reference study's (20 epochs, batch 128, beta_start 1e-4, an
# FID after every epoch) with this project's FID set sizes, all of them `Config`'s defaults. `report` names
# every one a study changed.
PROTOCOL_FIELDS = ("epochs", "batch_size", "beta_start", "fid_every", "fid_select_samples", "fid_samples")
_TYPES = {f.name: str(f.type) for f in dataclasses.fields(Config)}


class GridError(ValueError):
    """A grid that can't be run, with a one-line reason."""


def parse_value(name: str, text: str):
    """A field's value from text, typed as the field is (int, float, bool, str; 'none' where optional)."""
    kind = _TYPES[name]
    text = text.strip()
    if "None" in kind and text.lower() in ("none", "null"):
        return None
    try:
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
    except ValueError:
        raise GridError(f"{name}: {text!r} is not {'an integer' if kind.startswith('int') else 'a number'}") from None
    if kind.startswith("bool"):
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise GridError(f"{name}: {text!r} is not true or false")
    return text


def _check(name: str, value):
    """A value read from a file (already typed by TOML) must have the field's type; ints count as floats."""
    kind = _TYPES[name]
    if value is None and "None" in kind:
        return None
    if isinstance(value, str) and not kind.startswith("str"):
        return parse_value(name, value)
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }[kind.split()[0]]
    if not ok:
        raise GridError(f"{name}: {value!r} is not of type {kind}")
    return float(value) if kind.startswith("float") else value


def _fmt(value) -> str:
    """A value as text that reads back as the same value: '0.08' (six digits, as ever) where that is exact, else
    the float's repr ('0.08000001'), so two values never share one text (one Optuna choice)."""
    if not isinstance(value, float):
        return str(value)
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


@dataclass(frozen=True)
class Dim:
    """One dimension: `fields` (one, or several coupled) and its values, each a tuple with one entry per field."""

    fields: tuple
    values: tuple

    @property
    def name(self) -> str:
        """The Optuna parameter: e.g. 'ddim_steps', 'timesteps_beta_end'."""
        return "_".join(self.fields)

    @property
    def label(self) -> str:
        return ":".join(self.fields)

    def encode(self, value: tuple):
        """The Optuna categorical choice of a value: the value itself, or 'v1:v2' when coupled."""
        return value[0] if len(self.fields) == 1 else ":".join(_fmt(v) for v in value)

    def decode(self, choice) -> dict:
        if len(self.fields) == 1:
            return {self.fields[0]: choice}
        return {f: parse_value(f, part) for f, part in zip(self.fields, str(choice).split(":"))}

    def describe(self) -> list:
        """For the study record: values, or [v1, v2] lists when coupled."""
        return [v[0] if len(self.fields) == 1 else list(v) for v in self.values]


def make_dim(label: str, values) -> Dim:
    """A dimension from 'field' or 'f1:f2' and its values (text to parse, or typed values from a file; for
    coupled fields each value a 'v1:v2' string or a [v1, v2] list). Checks names, types, emptiness, repeats."""
    fields = tuple(f.strip() for f in label.split(":"))
    for f in fields:
        if f not in _TYPES:
            raise GridError(f"unknown config field {f!r} in grid dimension {label!r}")
    if len(set(fields)) != len(fields):
        raise GridError(f"grid dimension {label!r} names a field twice")
    values = list(values)
    if not values:
        raise GridError(f"grid dimension {label!r} has no values")
    typed = []
    for v in values:
        parts = v.split(":") if isinstance(v, str) and len(fields) > 1 else v if len(fields) > 1 else [v]
        if not isinstance(parts, (list, tuple)) or len(parts) != len(fields):
            raise GridError(f"grid dimension {label!r}: {v!r} needs {len(fields)} values, one per field")
        typed.append(tuple((parse_value(f, p) if isinstance(p, str) else _check(f, p)) for f, p in zip(fields, parts)))
    repeated = [v for i, v in enumerate(typed) if v in typed[:i]]
    if repeated:
        raise GridError(f"grid dimension {label!r} repeats {':'.join(map(_fmt, repeated[0]))}")
    dim = Dim(fields, tuple(typed))
    for v in typed:  # a point is known by its Optuna choice: it must give back this value, and no other's
        if dim.decode(dim.encode(v)) != dict(zip(fields, v)):
            raise GridError(f"grid dimension {label!r}: {dim.encode(v)!r} does not read back as the same value")
    return dim


def parse_option(text: str) -> Dim:
    """`--grid NAME=V1,V2,...` (NAME may be 'f1:f2' with values 'a:b')."""
    label, sep, values = text.partition("=")
    if not sep or not label.strip():
        raise GridError(f"--grid {text!r}: expected NAME=V1,V2,... (e.g. ddim_steps=10,50,100)")
    return make_dim(label, [v for v in values.split(",") if v.strip()] if values.strip() else [])


def load_file(path) -> list[Dim]:
    """Dimensions from a TOML file: a [grid] table (or top-level keys) of `field = [values]` and
    `"f1:f2" = [[a, b], ...]` entries, in file order."""
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise GridError(f"--grid-file {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise GridError(f"--grid-file {path}: not a TOML grid file ({err})") from None
    table = doc.get("grid", doc)
    if not isinstance(table, dict) or not table:
        raise GridError(f"--grid-file {path}: no grid dimensions (expected a [grid] table of field = [values])")
    dims = []
    for label, values in table.items():
        if not isinstance(values, list):
            raise GridError(f"--grid-file {path}: {label} must be a list of values")
        dims.append(make_dim(label, values))
    return dims


def reference_dims(schedules=STUDY_SCHEDULES, pairs=STUDY_PAIRS, samplers=STUDY_SAMPLERS) -> list[Dim]:
    return [
        Dim(("schedule",), tuple((s,) for s in schedules)),
        Dim(("timesteps", "beta_end"), tuple((int(t), float(b)) for t, b in pairs)),
        Dim(("sampler",), tuple((m,) for m in samplers)),
    ]


@dataclass(frozen=True)
class Grid:
    dims: tuple

    @classmethod
    def build(cls, base_dims: list[Dim], extra: list[Dim], seeds=(0,)) -> Grid:
        """The base dimensions (the reference ones, narrowed by the shorthands) with `extra` ones: an extra
        dimension that shares a field with a base one takes its place; the others follow; the seeds last."""
        seen: dict[str, str] = {}
        for d in extra:
            for f in d.fields:
                if f in seen:
                    raise GridError(f"field {f!r} is in two grid dimensions ({seen[f]} and {d.label})")
                seen[f] = d.label
        dims, placed = [], set()
        for b in [*base_dims, Dim(("seed",), tuple((int(s),) for s in seeds))]:
            over = [d for d in extra if set(d.fields) & set(b.fields)]
            for d in over:
                if d.label not in placed:
                    dims.append(d)
                    placed.add(d.label)
            if not over:
                if b.fields == ("seed",):  # extra dimensions before the seeds
                    dims += [d for d in extra if d.label not in placed]
                    placed.update(d.label for d in extra)
                dims.append(b)
        if any(f == "seed" for d in extra for f in d.fields):  # the seeds were replaced: the rest goes last
            dims += [d for d in extra if d.label not in placed]
        return cls(tuple(dims))

    @property
    def size(self) -> int:
        n = 1
        for d in self.dims:
            n *= len(d.values)
        return n

    def search_space(self) -> dict:
        return {d.name: [d.encode(v) for v in d.values] for d in self.dims}

    def description(self) -> dict:
        return {d.name: d.describe() for d in self.dims}

    def fields(self) -> dict:
        """Optuna parameter -> the config fields it sets."""
        return {d.name: list(d.fields) for d in self.dims}

    def varied(self) -> list[str]:
        """The fields that take more than one value, in grid order (the seed included)."""
        return [f for d in self.dims if len(d.values) > 1 for f in d.fields]

    def overrides(self, params: dict) -> dict:
        """Config fields of one point, from its Optuna params."""
        out = {}
        for d in self.dims:
            out.update(d.decode(params[d.name]))
        return out

    def points(self) -> list[dict]:
        """Every point's config fields, in grid order."""
        return [
            self.overrides({d.name: d.encode(v) for d, v in zip(self.dims, combo)})
            for combo in product(*(d.values for d in self.dims))
        ]

    def configs(self, base: Config, max_points: int = MAX_POINTS, check=None) -> list[Config]:
        """Every point as a validated Config; GridError names the first invalid point, or a grid too big.
        `check(config)` may refuse a point too: it returns why, or None."""
        if self.size > max_points:
            raise GridError(f"the grid has {self.size} points, more than --max-points {max_points}")
        out = []
        for point in self.points():
            try:
                config = base.replace(**point)
                reason = check(config) if check is not None else None
                if reason:
                    raise ValueError(reason)
                out.append(config)
            except (ValueError, TypeError) as err:
                where = ", ".join(f"{k}={_fmt(v)}" for k, v in point.items() if k != "seed")
                raise GridError(f"grid point ({where}): {err}") from None
        return out


def reference_grid(seeds=(0,)) -> Grid:
    return Grid.build(reference_dims(), [], seeds)


def reference_configs(base: Config | None = None) -> list[Config]:
    """The reference study's 16 grid points as configs, everything else from `base` (default: the study's)."""
    return reference_grid().configs(base or Config())
