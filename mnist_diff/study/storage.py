"""The study in its Optuna storage: building the storage, opening (or resuming) the study with its grid and
settings checked, and reading its progress: points done, open, failed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from itertools import product
from pathlib import Path

import optuna

from mnist_diff.perf.workload import PROTOCOL_KNOBS
from mnist_diff.study.optuna_compat import knowingly_experimental
from mnist_diff.study.retries import WORKER_LOST, StaleTrial, queue_retry
from mnist_diff.study.spec import RESUMABLE_FIELDS, Sweep
from mnist_diff.util.locks import exclusive
from mnist_diff.util.redact import redact_text, redact_url
from mnist_diff.util.urls import in_memory_reason, in_memory_sqlite


class StorageUnavailable(ValueError):
    """The Optuna storage can't be used (in memory, a missing or read-only folder, no server): one line."""


def check_storage(url: str) -> None:
    """The Optuna storage must be reachable before any training starts. Creates nothing for SQLite."""
    if in_memory_sqlite(url):
        raise StorageUnavailable(in_memory_reason(url, "--storage"))
    if url.startswith("sqlite:///"):
        folder = Path(url[len("sqlite:///") :]).expanduser().absolute().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise StorageUnavailable(f"--storage {url}: folder {folder} does not exist or is not writable")
        return
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 5} if "postgres" in url else {})
        with engine.connect():
            pass
    except Exception as err:
        raise StorageUnavailable(
            f"--storage {redact_url(url)} is unreachable: {redact_text(str(err).splitlines()[0], url)}"
        ) from None


def make_storage(url: str, heartbeat: int | None = None, on_stale=None):
    """An RDB storage; SQLite waits up to 60 s for a lock instead of failing with 'database is locked'.
    `on_stale(study, trial)` runs for each trial Optuna fails because its heartbeat stopped."""
    # A server connection may be dropped while a trial runs for an hour: test it before use, renew it hourly;
    # a process needs few (the trial and the heartbeat thread).
    engine_kwargs = (
        {"connect_args": {"timeout": 60}}
        if url.startswith("sqlite")
        else {"pool_pre_ping": True, "pool_recycle": 3600, "pool_size": 2, "max_overflow": 4}
    )
    kwargs = {}
    if heartbeat:
        kwargs = dict(heartbeat_interval=heartbeat, grace_period=2 * heartbeat, heartbeat_stale_trial_callback=on_stale)
    # The first use of a database creates Optuna's tables: commands starting together on a new database would
    # collide on it (SQLite: INSERT INTO alembic_version; PostgreSQL: CREATE TYPE ... already exists). The
    # lock is PostgreSQL's own there, else a file in the temp folder: nothing beside the user's files.
    name = "optuna-init-" + hashlib.sha256(url.encode()).hexdigest()[:16]
    with exclusive(url, name, Path(tempfile.gettempdir()) / "mnist-diff-locks"), knowingly_experimental():
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)


def open_study(sweep: Sweep) -> optuna.Study:
    storage = make_storage(sweep.storage, sweep.heartbeat, StaleTrial(sweep.tracking_uri, sweep.max_retries))
    study = optuna.create_study(
        study_name=sweep.study_name,
        storage=storage,
        sampler=optuna.samplers.GridSampler(sweep.search_space(), seed=0),
        pruner=optuna.pruners.NopPruner(),  # MedianPruner would prune grid points that report values
        direction="minimize",
        load_if_exists=True,
    )
    known = study.user_attrs.get("grid")
    if known is not None and known != sweep.grid_description():
        raise ValueError(f"study {sweep.study_name!r} exists with another grid: {json.dumps(known)}")
    changed = changed_settings(study.user_attrs.get("fixed") or {}, sweep.fixed)
    if changed:  # its finished trials would be set against trials of other settings
        raise ValueError(
            f"study {sweep.study_name!r} exists with other settings: {changed}; give those, or another --study-name"
        )
    if known is None:
        study.set_user_attr("grid", sweep.grid_description())
        study.set_user_attr("fixed", sweep.fixed)
    return study


def budget_protocol(storage: str, study_name: str) -> dict | None:
    """The FID protocol (`workload.PROTOCOL_KNOBS`) an existing study was given by `--time-budget`, which resuming
    it keeps; None for a new study or one created without a budget."""
    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///") :]).expanduser().exists():
        return None  # no store, so no study: and a command refused after this must leave no file behind
    try:
        study = optuna.load_study(study_name=study_name, storage=make_storage(storage))
    except KeyError:
        return None
    fixed = study.user_attrs.get("fixed") or {}
    if fixed.get("time_budget") is None:
        return None
    return {k: fixed[k] for k in PROTOCOL_KNOBS if k in fixed}


def changed_settings(recorded: dict, now: dict) -> str:
    """The fixed settings of a resumed study that differ from those it was created with, e.g. 'epochs 20 (now
    5)'; '' when none. Speed settings (`RESUMABLE_FIELDS`) may change, and a field the study did not record
    (added to the code since) is taken as unchanged."""
    return ", ".join(
        f"{k} {recorded[k]} (now {v})"
        for k, v in now.items()
        if k not in RESUMABLE_FIELDS and k in recorded and recorded[k] != v
    )


def trainings_first(sweep: Sweep) -> list[dict]:
    """The grid's points, one of each training first: N workers then start N different trainings rather than
    waiting on each other's training lock (GridSampler alone picks points at random)."""
    space = sweep.search_space()
    seen: dict[str, int] = {}
    ranked = []
    for values in product(*space.values()):
        params = dict(zip(space, values))
        key = sweep.config_for(params).training_key()
        ranked.append((seen.get(key, 0), params))
        seen[key] = seen.get(key, 0) + 1
    return [params for _, params in sorted(ranked, key=lambda r: r[0])]  # stable: grid order within a rank


DONE_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED)


def trial_point(t: optuna.trial.FrozenTrial) -> tuple:
    """A trial's grid point; a queued (WAITING) trial has no params yet, only the ones it was queued with."""
    return tuple(sorted((t.params or t.system_attrs.get("fixed_params", {})).items()))


def requeue_failed(study: optuna.Study, sweep: Sweep, retry_failed: bool = False) -> int:
    """Queue again, when a sweep starts, each grid point whose last trial FAILed and has no retry queued:
    interrupted (SIGTERM, Ctrl-C: costs no retry), or failed by a retryable error or a dead worker with
    --max-retries not used up (its retry was not queued, e.g. the worker died first, or the budget was raised).
    A deterministic failure (e.g. NonFiniteLoss) stays FAIL: it would fail the same way. `retry_failed` queues
    every failed point, deterministic ones included, with a fresh retry budget."""
    by_point: dict = {}
    for t in study.get_trials(deepcopy=False):
        by_point.setdefault(trial_point(t), []).append(t)
    queued = 0
    S = optuna.trial.TrialState
    for _point, trials in by_point.items():
        if any(t.state in (S.COMPLETE, S.RUNNING, S.WAITING) for t in trials):
            continue
        last = max(trials, key=lambda t: t.number)
        if last.state != S.FAIL:
            continue
        a = last.user_attrs
        retries, errors = a.get("retries", 0), list(a.get("errors", []))
        if retry_failed:
            retries = 0
        elif a.get("interrupted"):
            pass
        elif a.get("error") is not None and not a.get("retryable"):  # deterministic (or from before retries)
            continue
        elif retries >= sweep.max_retries:
            continue
        else:
            retries += 1
            if a.get("error") is None:  # failed as stale: its error never reached the trial
                errors.append(WORKER_LOST)
        queue_retry(study, last.number, last.params, retries, errors)
        queued += 1
    return queued


def open_points(study: optuna.Study, sweep: Sweep) -> int:
    """Grid points no trial has started or finished, plus queued retries."""
    trials = study.get_trials(deepcopy=False)
    taken = {trial_point(t) for t in trials if t.state in DONE_STATES + (optuna.trial.TrialState.RUNNING,)}
    waiting = sum(t.state == optuna.trial.TrialState.WAITING for t in trials)
    return sweep.size - len(taken) + waiting


def points_done(study: optuna.Study, sweep: Sweep) -> tuple[int, str]:
    """(n, 'n/size'): how many grid points are COMPLETE."""
    n = len({trial_point(t) for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))})
    return n, f"{n}/{sweep.size}"


def failed_points(study: optuna.Study, sweep: Sweep) -> list[str]:
    """One line per grid point whose every trial FAILed (none complete, running or queued): its fields and the
    last error."""
    by_point: dict = {}
    for t in study.get_trials(deepcopy=False):  # in trial order: a point's last trial comes last
        by_point.setdefault(trial_point(t), []).append(t)
    lines = []
    for trials in by_point.values():
        if all(t.state == optuna.trial.TrialState.FAIL for t in trials):
            last = trials[-1]
            where = ", ".join(f"{k}={v}" for k, v in sweep.grid.overrides(last.params).items())
            error = last.user_attrs.get("error") or (
                "interrupted" if last.user_attrs.get("interrupted") else WORKER_LOST
            )
            lines.append(f"grid point ({where}) failed: {error.splitlines()[0]}")
    return lines
