"""Every use of Optuna internals, in one place. Each is pinned by a test (`tests/test_optuna_compat.py`), so an
Optuna release that changes one fails there, by name, instead of deep inside a sweep."""
from __future__ import annotations

import optuna


def grid_point_id(sampler: optuna.samplers.GridSampler, params: dict) -> tuple[dict, int]:
    """(search space, grid id) that GridSampler itself gives the point `params`. The id is the sampler's own
    (shuffled) numbering: a queued trial without it stays "unvisited" for the sampler."""
    point = tuple(params[name] for name in sampler._param_names)
    return sampler._search_space, sampler._all_grids.index(point)


def stored_trial(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    """The running trial as its storage holds it: user attributes set when it was queued (a retry's history),
    and the system attributes that `RetryHeartbeatStaleTrialCallback.retried_trial_number` reads."""
    return trial.study._storage.get_trial(trial._trial_id)
