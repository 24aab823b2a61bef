"""The queue of grid points and the retry policy: a failure that may pass (OOM, disk, network, a dead worker)
queues its point again, resuming from its checkpoint, up to `max_retries`; a deterministic one does not.
"""

from __future__ import annotations

import json
import logging

import optuna

from mnist_diff.study.optuna_compat import grid_point_id
from mnist_diff.study.spec import Sweep
from mnist_diff.tracking.mlflow_store import kill_run, tag_run
from mnist_diff.training.trainer import NonFiniteLoss
from mnist_diff.util.redact import redact_text

log = logging.getLogger(__name__)


# Failures that the same config reproduces: retrying them would only spend the GPU again (a ValueError is an
# invalid config). Any other exception (CUDA OOM, a full disk, a tracking or storage blip) may pass on a retry.
DETERMINISTIC_ERRORS = (NonFiniteLoss, ValueError)

WORKER_LOST = "WorkerLost: the worker stopped sending heartbeats (killed, OOM-killed, or its machine went down)"


def enqueue(study: optuna.Study, params: dict, user_attrs: dict | None = None) -> None:
    """`study.enqueue_trial`, plus the grid id GridSampler itself would give the point. GridSampler counts a
    point as started or done only by that id: without it a queued point stays "unvisited" for the sampler, and
    its `after_trial` raises KeyError('grid_id') on such a trial when one unvisited point is left."""
    attrs = {"fixed_params": params}
    sampler = study.sampler
    if isinstance(sampler, optuna.samplers.GridSampler):  # its own (shuffled) numbering of the points
        search_space, grid_id = grid_point_id(sampler, params)
        attrs.update(search_space=search_space, grid_id=grid_id)
    study.add_trial(
        optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING, system_attrs=attrs, user_attrs=user_attrs)
    )


def queue_retry(study: optuna.Study, number: int, params: dict, retries: int, errors: list) -> None:
    enqueue(study, params, {"retry_of_trial": number, "retries": retries, "errors": errors})


def retry_tags(retries: int, errors: list, outcome: str | None = None) -> dict:
    cut = [e[:500] for e in errors]
    while len(json.dumps(cut)) > 7000:  # an MLflow tag holds 8,000 characters: keep the latest errors
        cut = cut[1:]
    tags = {"mnist_diff.retries": retries, "mnist_diff.errors": json.dumps(cut)}
    return {**tags, "mnist_diff.retry": outcome} if outcome else tags


def tag_trial_run(tracking_uri: str | None, run_id: str | None, tags: dict, kill: bool = False) -> None:
    """Best effort: the tracking store may be the very thing that failed."""
    if not run_id:
        return
    try:
        (kill_run if kill else tag_run)(tracking_uri, run_id, tags)
    except Exception as err:
        log.warning("could not tag MLflow run %s: %s: %s", run_id, type(err).__name__, err)


def record_failure(trial: optuna.Trial, err: Exception, sweep: Sweep) -> None:
    """Keep the error on the trial and its MLflow run; queue the grid point again unless the error is
    deterministic or the point has used its --max-retries. Runs while the trial is still RUNNING, so no worker
    sees the point done before its retry is queued."""
    error = redact_text(f"{type(err).__name__}: {err}")  # kept in the study, the results and MLflow
    attrs = trial.user_attrs
    retries, errors = attrs.get("retries", 0), [*attrs.get("errors", []), error]
    retryable = not isinstance(err, DETERMINISTIC_ERRORS)
    for key, value in (("error", error), ("errors", errors), ("retryable", retryable)):
        trial.set_user_attr(key, value)
    if not retryable:
        outcome = f"not retried: a {type(err).__name__} would happen again"
    elif retries >= sweep.max_retries:
        outcome = f"not retried: --max-retries {sweep.max_retries} used up"
    else:
        queue_retry(trial.study, trial.number, trial.params, retries + 1, errors)
        outcome = f"retry {retries + 1} of {sweep.max_retries} queued"
    log.error("trial %d failed: %s (%s)", trial.number, error, outcome)
    tag_trial_run(sweep.tracking_uri, attrs.get("mlflow_run_id"), retry_tags(retries, errors, outcome))


class StaleTrial:
    """Optuna's heartbeat-stale callback. Optuna runs it wherever a stale trial gets failed: when a sweep starts
    and inside `optimize` before each trial. So whenever a dead worker's trial is found, at any moment of a sweep,
    its MLflow run becomes KILLED and its grid point is queued again (within --max-retries: a worker that the OOM
    killer stops every time must not loop forever)."""

    def __init__(self, tracking_uri: str | None, max_retries: int):
        self.tracking_uri, self.max_retries = tracking_uri, max_retries

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        retries, errors = trial.user_attrs.get("retries", 0), [*trial.user_attrs.get("errors", []), WORKER_LOST]
        if retries < self.max_retries:
            queue_retry(study, trial.number, trial.params, retries + 1, errors)
            outcome = f"retry {retries + 1} of {self.max_retries} queued"
        else:
            outcome = f"not retried: --max-retries {self.max_retries} used up"
        log.warning("trial %d: %s (%s)", trial.number, WORKER_LOST, outcome)
        tag_trial_run(
            self.tracking_uri,
            trial.user_attrs.get("mlflow_run_id"),
            {"error_type": "WorkerLost", "error_message": WORKER_LOST, **retry_tags(retries, errors, outcome)},
            kill=True,
        )
