"""`sweep --stop-after`: a worker starts no trial that the projection says would end after the deadline, so that a
study run in time-limited slots (a 15-minute GPU lease, a Slurm job) ends cleanly and the same command goes on.
"""

from __future__ import annotations

import time

import optuna

from mnist_diff.study.spec import Sweep
from mnist_diff.study.storage import DONE_STATES, trial_point

STOPPED = "stopped before the deadline"


def _key(params: dict) -> tuple:
    return tuple(sorted(params.items()))  # as storage.trial_point


def next_trial_seconds(study: optuna.Study, sweep: Sweep) -> float:
    """Projected seconds of the trial a worker would start now: the oldest queued point's (else the longest open
    point's), less its training when a COMPLETE trial already made it. Without a projection (the device could not
    be measured), the longest trial this study has completed; 0 when none has."""
    trials = study.get_trials(deepcopy=False)
    per_point = (sweep.projection or {}).get("trial_seconds")
    if not per_point:
        spans = [
            (t.datetime_complete - t.datetime_start).total_seconds()
            for t in trials
            if t.state == optuna.trial.TrialState.COMPLETE and t.datetime_start and t.datetime_complete
        ]
        return max(spans, default=0.0)
    points = sweep.points()
    seconds = {_key(p): s for p, s in zip(points, per_point)}
    trained = {sweep.config_for(t.params).training_key() for t in trials if t.state == optuna.trial.TrialState.COMPLETE}
    waiting = [t for t in trials if t.state == optuna.trial.TrialState.WAITING]
    if waiting:
        candidates = [trial_point(min(waiting, key=lambda t: t.number))]
    else:
        taken = {trial_point(t) for t in trials if t.state in (*DONE_STATES, optuna.trial.TrialState.RUNNING)}
        candidates = [_key(p) for p in points if _key(p) not in taken]
    by_key = {_key(p): p for p in points}
    return max(
        (
            sum(seconds[k][1:]) + (0.0 if sweep.config_for(by_key[k]).training_key() in trained else seconds[k][0])
            for k in candidates
            if k in seconds
        ),
        default=0.0,
    )


def stop_reason(study: optuna.Study, sweep: Sweep, now: float | None = None) -> str | None:
    """Why no new trial may start now (None: it may): the projected trial would end after `sweep.deadline`."""
    if sweep.deadline is None:
        return None
    now = time.time() if now is None else now
    need = next_trial_seconds(study, sweep)
    if now + need <= sweep.deadline:
        return None
    return f"{STOPPED}: the next trial is projected at {need:.0f} s and {max(0.0, sweep.deadline - now):.0f} s are left"
