"""What a sweep runs: the `Sweep` (study name, grid, fixed settings, stores, retry budget), handed from the
CLI to the parent and to every worker process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from itertools import product
from pathlib import Path

from mnist_diff.choices import REGISTERED_MODEL
from mnist_diff.config import RUNTIME_FIELDS, Config
from mnist_diff.presets import STUDY_PAIRS, STUDY_SAMPLERS, STUDY_SCHEDULES
from mnist_diff.study.grid import Grid, reference_dims

DEFAULT_STORAGE = "sqlite:///optuna.db"

# Fixed settings a resumed study may change: how fast it runs, not what it computes (the Inception batch changes
# no feature; the preset and the time budget only choose settings, which are compared themselves).
RESUMABLE_FIELDS = RUNTIME_FIELDS + ("fid_batch_size", "preset", "time_budget")


@dataclass
class Sweep:
    study_name: str
    out_dir: Path
    base: Config  # the fixed settings; grid params are overridden per trial
    schedules: tuple = STUDY_SCHEDULES  # the reference dimensions (the shorthands --schedule/--timesteps/...)
    pairs: tuple = STUDY_PAIRS
    samplers: tuple = STUDY_SAMPLERS
    seeds: tuple = (0,)
    extra: tuple = ()  # more grid.Dim dimensions (--grid, --grid-file); may replace the above
    storage: str = DEFAULT_STORAGE
    tracking_uri: str | None = None
    experiment: str = "mnist-diff"
    system_metrics: bool = True  # each trial run logs MLflow's system/... metrics
    registered_model: str = REGISTERED_MODEL  # where the finished study registers its best trial's model
    data_dir: str | None = None
    fid_weights: str | None = None
    device: str = "auto"
    progress: bool = True
    heartbeat: int = 60
    max_retries: int = 2  # automatic retries per grid point after a failure that may pass
    fixed: dict = field(default_factory=dict)
    projection: dict | None = None  # projection.study_projection's record, kept in study.json for the report
    deadline: float | None = None  # --stop-after: wall-clock time (time.time()) by which every trial must end
    trials_per_worker: int = 1  # trials a worker runs at once (study/lanes.py)

    @cached_property
    def grid(self) -> Grid:
        return Grid.build(reference_dims(self.schedules, self.pairs, self.samplers), list(self.extra), self.seeds)

    def search_space(self) -> dict:
        return self.grid.search_space()

    def grid_description(self) -> dict:
        return self.grid.description()

    @property
    def size(self) -> int:
        return self.grid.size

    def config_for(self, params: dict) -> Config:
        return self.base.replace(**self.grid.overrides(params))

    def points(self) -> list[dict]:
        """Every grid point's Optuna params, in grid order (the order of `configs`)."""
        space = self.search_space()
        return [dict(zip(space, values)) for values in product(*space.values())]

    def configs(self) -> list[Config]:
        """Every grid point's config, in grid order, whatever a resumed study has done."""
        return [self.config_for(params) for params in self.points()]
