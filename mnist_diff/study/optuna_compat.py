"""Every use of Optuna internals and of its experimental API, in one place. Each is pinned by a test
(`tests/test_optuna_compat.py`), so an Optuna release that changes one fails there, by name, instead of deep
inside a sweep."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import optuna


@contextmanager
def knowingly_experimental():
    """Optuna marks heartbeats and their retry helpers experimental; they are exactly what we rely on, so their
    warnings are silenced here, around each use, not for the whole process."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail the trials whose heartbeat stopped (their workers died), running the storage's stale-trial callback."""
    with knowingly_experimental():
        optuna.storages.fail_stale_trials(study)


def retried_trial_number(trial: optuna.trial.FrozenTrial) -> int | None:
    """The number of the trial a heartbeat retry was queued for, or None."""
    with knowingly_experimental():
        return optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)


def grid_point_id(sampler: optuna.samplers.GridSampler, params: dict) -> tuple[dict, int]:
    """(search space, grid id) that GridSampler itself gives the point `params`. The id is the sampler's own
    (shuffled) numbering: a queued trial without it stays "unvisited" for the sampler."""
    point = tuple(params[name] for name in sampler._param_names)
    return sampler._search_space, sampler._all_grids.index(point)


def stored_trial(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    """The running trial as its storage holds it: user attributes set when it was queued (a retry's history),
    and the system attributes that `RetryHeartbeatStaleTrialCallback.retried_trial_number` reads."""
    return trial.study._storage.get_trial(trial._trial_id)
