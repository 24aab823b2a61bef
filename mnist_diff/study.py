"""The study: an Optuna grid over schedule x (T, beta_end) x sampler (x seed), one MLflow child run per
trial under one parent run per study. The only module that imports optuna.

Training is shared: a DDPM and a DDIM trial of the same training config (same `Config.training_key()`)
train one model in `OUT/trainings/<key>/`, keeping every epoch's EMA weights. Whichever trial holds the
training's lock and finds no `training_done.json` trains (resuming what an interrupted trial of either
sampler left); once it is done the other only samples and scores. Per-epoch FIDs are never shared: each
trial scores every epoch with its own sampler (see `experiment`), and draws its grids and writes its
`result.json` in its own folder `OUT/trials/<number>/`. `training_done.json` and the `mnist_diff.trained_by`
tags name the run that made the training's last optimizer step. With a tracking server, machines share no
disk: the training's files travel through the server (`shared_trainings`), indexed in the study's storage.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from functools import cached_property
from itertools import product
from pathlib import Path

import warnings

import optuna

# heartbeats and their retry callback are marked experimental; they are exactly what we rely on, knowingly
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

from . import timing
from .config import RUNTIME_FIELDS, Config
from .locks import exclusive, file_lock
from .redact import RedactingFormatter, redact_text, redact_url
from .grid import STUDY_PAIRS, STUDY_SAMPLERS, STUDY_SCHEDULES, Grid, reference_dims
from .evaluate import Reference
from .atomic import write_json
from .experiment import run_experiment, score_saved_training
from .shared_trainings import DONE_MARKER, Uploader, mark_done, restore
from .tracking import Tracker, find_study_run, is_server, kill_run, tag_run
from .workload import PROTOCOL_KNOBS
from .workers import run_workers
from .train import NonFiniteLoss

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "sqlite:///optuna.db"
# Failures that the same config reproduces: retrying them would only spend the GPU again (a ValueError is an
# invalid config). Any other exception (CUDA OOM, a full disk, a tracking or storage blip) may pass on a retry.
DETERMINISTIC_ERRORS = (NonFiniteLoss, ValueError)
# Fixed settings a resumed study may change: how fast it runs, not what it computes (the Inception batch changes
# no feature; the preset and the time budget only choose settings, which are compared themselves).
RESUMABLE_FIELDS = RUNTIME_FIELDS + ("fid_batch_size", "preset", "time_budget")
WORKER_LOST = "WorkerLost: the worker stopped sending heartbeats (killed, OOM-killed, or its machine went down)"


@dataclass
class Sweep:
    study_name: str
    out_dir: Path
    base: Config                          # the fixed settings; grid params are overridden per trial
    schedules: tuple = STUDY_SCHEDULES    # the reference dimensions (the shorthands --schedule/--timesteps/...)
    pairs: tuple = STUDY_PAIRS
    samplers: tuple = STUDY_SAMPLERS
    seeds: tuple = (0,)
    extra: tuple = ()                     # more grid.Dim dimensions (--grid, --grid-file); may replace the above
    storage: str = DEFAULT_STORAGE
    tracking_uri: str | None = None
    experiment: str = "mnist-diff"
    data_dir: str | None = None
    fid_weights: str | None = None
    device: str = "auto"
    progress: bool = True
    heartbeat: int = 60
    max_retries: int = 2                  # automatic retries per grid point after a failure that may pass
    fixed: dict = field(default_factory=dict)
    projection: dict | None = None        # projection.study_projection's record, kept in study.json for the report

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


def make_storage(url: str, heartbeat: int | None = None, on_stale=None):
    """An RDB storage; SQLite waits up to 60 s for a lock instead of failing with 'database is locked'.
    `on_stale(study, trial)` runs for each trial Optuna fails because its heartbeat stopped."""
    # A server connection may be dropped while a trial runs for an hour: test it before use, renew it hourly;
    # a process needs few (the trial and the heartbeat thread).
    engine_kwargs = ({"connect_args": {"timeout": 60}} if url.startswith("sqlite") else
                     {"pool_pre_ping": True, "pool_recycle": 3600, "pool_size": 2, "max_overflow": 4})
    kwargs = {}
    if heartbeat:
        kwargs = dict(heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                      heartbeat_stale_trial_callback=on_stale)
    # The first use of a database creates Optuna's tables: commands starting together on a new database would
    # collide on it (SQLite: INSERT INTO alembic_version; PostgreSQL: CREATE TYPE ... already exists). The
    # lock is PostgreSQL's own there, else a file in the temp folder: nothing beside the user's files.
    name = "optuna-init-" + hashlib.sha256(url.encode()).hexdigest()[:16]
    with exclusive(url, name, Path(tempfile.gettempdir()) / "mnist-diff-locks"):
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)


def open_study(sweep: Sweep) -> optuna.Study:
    storage = make_storage(sweep.storage, sweep.heartbeat, StaleTrial(sweep.tracking_uri, sweep.max_retries))
    study = optuna.create_study(
        study_name=sweep.study_name, storage=storage,
        sampler=optuna.samplers.GridSampler(sweep.search_space(), seed=0),
        pruner=optuna.pruners.NopPruner(),  # MedianPruner would prune grid points that report values
        direction="minimize", load_if_exists=True)
    known = study.user_attrs.get("grid")
    if known is not None and known != sweep.grid_description():
        raise ValueError(f"study {sweep.study_name!r} exists with another grid: {json.dumps(known)}")
    changed = changed_settings(study.user_attrs.get("fixed") or {}, sweep.fixed)
    if changed:  # its finished trials would be set against trials of other settings
        raise ValueError(f"study {sweep.study_name!r} exists with other settings: {changed}; give those, or "
                         "another --study-name")
    if known is None:
        study.set_user_attr("grid", sweep.grid_description())
        study.set_user_attr("fixed", sweep.fixed)
    return study


def budget_protocol(storage: str, study_name: str) -> dict | None:
    """The FID protocol (`workload.PROTOCOL_KNOBS`) an existing study was given by `--time-budget`, which resuming
    it keeps; None for a new study or one created without a budget."""
    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///"):]).expanduser().exists():
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
    return ", ".join(f"{k} {recorded[k]} (now {v})" for k, v in now.items()
                     if k not in RESUMABLE_FIELDS and k in recorded and recorded[k] != v)


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


def point_of(t: optuna.trial.FrozenTrial) -> tuple:
    """A trial's grid point; a queued (WAITING) trial has no params yet, only the ones it was queued with."""
    return tuple(sorted((t.params or t.system_attrs.get("fixed_params", {})).items()))


def remaining(study: optuna.Study, sweep: Sweep) -> int:
    """Grid points no trial has finished (GridSampler counts FAIL and PRUNED as done, and so do we)."""
    done = {tuple(sorted(t.params.items())) for t in study.get_trials(deepcopy=False) if t.state in DONE_STATES}
    return sweep.size - len(done)


# -- failures and retries -------------------------------------------------------------------------------------
# A grid point's trials carry user attributes `retries` (automatic retries before this trial) and `errors` (every
# error of the point so far); a failed trial adds `error` (its own) and `retryable`. A retry is a new trial of the
# same point: it resumes the training from its last checkpoint (trainings live in OUT/trainings/<key>/).

def enqueue(study: optuna.Study, params: dict, user_attrs: dict | None = None) -> None:
    """`study.enqueue_trial`, plus the grid id GridSampler itself would give the point. GridSampler counts a
    point as started or done only by that id: without it a queued point stays "unvisited" for the sampler, and
    its `after_trial` raises KeyError('grid_id') on such a trial when one unvisited point is left."""
    attrs = {"fixed_params": params}
    sampler = study.sampler
    if isinstance(sampler, optuna.samplers.GridSampler):  # its own (shuffled) numbering of the points
        point = tuple(params[name] for name in sampler._param_names)
        attrs.update(search_space=sampler._search_space, grid_id=sampler._all_grids.index(point))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING, system_attrs=attrs,
                                              user_attrs=user_attrs))


def _queue_retry(study: optuna.Study, number: int, params: dict, retries: int, errors: list) -> None:
    enqueue(study, params, {"retry_of_trial": number, "retries": retries, "errors": errors})


def _retry_tags(retries: int, errors: list, outcome: str | None = None) -> dict:
    cut = [e[:500] for e in errors]
    while len(json.dumps(cut)) > 7000:  # an MLflow tag holds 8,000 characters: keep the latest errors
        cut = cut[1:]
    tags = {"mnist_diff.retries": retries, "mnist_diff.errors": json.dumps(cut)}
    return {**tags, "mnist_diff.retry": outcome} if outcome else tags


def _tag_run(tracking_uri: str | None, run_id: str | None, tags: dict, kill: bool = False) -> None:
    """Best effort: the tracking store may be the very thing that failed."""
    if not run_id:
        return
    try:
        (kill_run if kill else tag_run)(tracking_uri, run_id, tags)
    except Exception as err:
        log.warning("could not tag MLflow run %s: %s: %s", run_id, type(err).__name__, err)


def _record_failure(trial: optuna.Trial, err: Exception, sweep: Sweep) -> None:
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
        _queue_retry(trial.study, trial.number, trial.params, retries + 1, errors)
        outcome = f"retry {retries + 1} of {sweep.max_retries} queued"
    log.error("trial %d failed: %s (%s)", trial.number, error, outcome)
    _tag_run(sweep.tracking_uri, attrs.get("mlflow_run_id"), _retry_tags(retries, errors, outcome))


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
            _queue_retry(study, trial.number, trial.params, retries + 1, errors)
            outcome = f"retry {retries + 1} of {self.max_retries} queued"
        else:
            outcome = f"not retried: --max-retries {self.max_retries} used up"
        log.warning("trial %d: %s (%s)", trial.number, WORKER_LOST, outcome)
        _tag_run(self.tracking_uri, trial.user_attrs.get("mlflow_run_id"),
                 {"error_type": "WorkerLost", "error_message": WORKER_LOST, **_retry_tags(retries, errors, outcome)},
                 kill=True)


class StoredTrainingIndex:
    """Where a training's files are on the tracking server (`shared_trainings`): a user attribute of the study,
    so every machine reads the same one. Only the holder of the training's lock writes it."""

    def __init__(self, study: optuna.Study, key: str):
        self.study, self.attr = study, f"training:{key}"

    def read(self) -> dict:
        return self.study.user_attrs.get(self.attr, {})  # read from the storage each time

    def write(self, entry: dict) -> None:
        self.study.set_user_attr(self.attr, entry)


class NoScore(ValueError):
    """A trial that ended without a score (deterministic: the same config scores nothing again)."""


class Objective:
    def __init__(self, sweep: Sweep, parent_run_id: str, images_loader):
        self.sweep, self.parent_run_id, self.images_loader = sweep, parent_run_id, images_loader

    def __call__(self, trial: optuna.Trial) -> float:
        s = self.sweep
        params = {name: trial.suggest_categorical(name, values) for name, values in s.search_space().items()}
        config = s.config_for(params)
        key = config.training_key()
        train_dir = s.out_dir / "trainings" / key
        trial_dir = s.out_dir / "trials" / f"{trial.number:04d}"
        tags = {"mnist_diff.role": "trial", "mnist_diff.study": s.study_name, "mnist_diff.trial": trial.number,
                "mnist_diff.training_key": key}
        frozen = trial.study._storage.get_trial(trial._trial_id)
        retried_from = frozen.user_attrs.get(
            "retry_of_trial", optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen))
        if retried_from is not None:
            tags["mnist_diff.retry_of_trial"] = retried_from
            tags.update(_retry_tags(frozen.user_attrs.get("retries", 0), frozen.user_attrs.get("errors", [])))
        tracker = Tracker(s.tracking_uri, s.experiment, tags=tags,
                          run_name=f"{trial.number:03d}-{config.short_name()}-s{config.seed}", parent_run_id=self.parent_run_id)
        reference = Reference(config.fid_ref, config.fid_ref_samples, s.data_dir, s.fid_weights)
        log.info("trial %d: %s", trial.number, params)
        samples_dir = trial_dir / "samples"  # this trial's own grids, whoever trained
        timing.reset()
        t0 = time.perf_counter()
        with tracker.run():
            trial.set_user_attr("mlflow_run_id", tracker.run_id)
            tracker.set_tags({"mnist_diff.samples_dir": samples_dir})
            # two workers, on this machine or (with PostgreSQL) any other, never train one model at once
            with exclusive(s.storage, f"training-{key}", s.out_dir / "trainings"):
                index = StoredTrainingIndex(trial.study, key) if is_server(s.tracking_uri) else None
                if index is not None:  # no shared disk: the training's files come through the tracking server
                    restore(train_dir, index, tracker)
                done_marker = train_dir / DONE_MARKER
                if done_marker.exists():
                    trained_by = json.loads(done_marker.read_text())["run_id"]
                    result = score_saved_training(config, train_dir, trial_dir, reference=reference,
                                                  device=self.images_loader().device, tracker=tracker,
                                                  progress=s.progress)
                else:  # train, or finish what an interrupted trial (of either sampler) left
                    uploads = [Uploader(tracker, index)] if index is not None else []
                    result = run_experiment(config, self.images_loader(), train_dir, out_dir=trial_dir,
                                            reference=reference, tracker=tracker, resume=True, progress=s.progress,
                                            callbacks=uploads)
                    trained_by = result["trained_by"]  # whoever made the last optimizer step
                    write_json(done_marker, {"run_id": trained_by})
                    if index is not None:
                        mark_done(index, trained_by)
            if trained_by is not None:
                tracker.set_tags({"mnist_diff.trained_by": trained_by})
            attrs = {"best_fid": result.get("best_fid"), "best_epoch": result.get("best_epoch"),
                     "best_fid_select": result.get("best_fid_select"), "epoch_fids": result["epoch_fids"],
                     "trained_by_run_id": trained_by, "train_seconds": result.get("train_seconds"),
                     "final_sampling_seconds": result.get("final_sampling_seconds"),
                     "samples_dir": str(samples_dir)}
            for k, v in attrs.items():
                trial.set_user_attr(k, v)
            seconds = timing.totals(wall_seconds=time.perf_counter() - t0)  # this trial's own work only
            trial.set_user_attr("phase_seconds", seconds)
            tracker.log_metrics({f"seconds_{k}": v for k, v in seconds.items()})
        log.info("trial %d done: best_fid %s (epoch %s)", trial.number, result.get("best_fid"),
                 result.get("best_epoch"))
        scores = (result.get("best_fid"), result.get("best_fid_select"))
        value = next((v for v in scores if v is not None and math.isfinite(v)), None)
        if value is None:  # else Optuna fails the trial with no error of ours on it: say why; retry nothing
            raise NoScore(f"the trial ended with no finite score (best_fid {scores[0]}, "
                          f"best_fid_select {scores[1]})")
        return value


CLAIM_SUFFIX = ".mnist-diff-claim"
PARENT_WAIT_S = 120.0


def claim_study(sweep: Sweep) -> bool:
    """True for exactly one `sweep` command per study, however many start at the same instant, on however many
    machines: creating an Optuna study is atomic in the shared storage (study names are unique), so whoever
    creates the marker study `<name>.mnist-diff-claim` sets the study up (queues its points, creates its
    parent run) and the others wait for that."""
    try:
        optuna.create_study(study_name=sweep.study_name + CLAIM_SUFFIX, storage=make_storage(sweep.storage))
        return True
    except optuna.exceptions.DuplicatedStudyError:
        return False


def _parent_id(sweep: Sweep, study: optuna.Study, claimed: bool) -> str | None:
    """The parent run id another command recorded in the study, waiting for it while the claimant creates it;
    None when this command holds the claim (or the claimant died first). Reads Optuna only: until the
    claimant has made the MLflow store, touching it too would collide (SQLite's migrations do)."""
    deadline = time.monotonic() + PARENT_WAIT_S
    while True:
        known = study.user_attrs.get("mlflow_parent_run_id")  # read from the storage each time
        if known or claimed:
            return known
        if time.monotonic() > deadline:
            log.warning("study %s: the command that claimed it made no parent run in %.0f s; making one",
                        sweep.study_name, PARENT_WAIT_S)
            return None
        time.sleep(0.5)


def parent_run(sweep: Sweep, study: optuna.Study, claimed: bool = True) -> Tracker:
    """The study's one parent MLflow run: found again when the sweep resumes or another command made it,
    else created (by the command that `claim_study` chose)."""
    known = _parent_id(sweep, study, claimed)
    tracker = Tracker(sweep.tracking_uri, sweep.experiment, run_name=sweep.study_name,
                      tags={"mnist_diff.role": "study", "mnist_diff.study": sweep.study_name})
    existing = (tracker.client.get_run(known) if known else  # else one made before studies were claimed
                find_study_run(tracker.client, tracker.uri, sweep.experiment, sweep.study_name))
    if existing is not None:
        tracker.run_id, tracker.experiment_id = existing.info.run_id, existing.info.experiment_id
        tracker.client.update_run(tracker.run_id, status="RUNNING")
    else:
        tracker.start()
        tracker.log_params({**sweep.fixed, "study_name": sweep.study_name, "grid_size": sweep.size,
                            "grid": grid_text(sweep.grid), "storage": redact_url(sweep.storage)})
        tracker.log_dict(study_doc(sweep), "study.json")
    study.set_user_attr("mlflow_parent_run_id", tracker.run_id)
    return tracker


def grid_text(grid: Grid) -> str:
    """The grid as one line, e.g. 'schedule=linear,cosine; timesteps:beta_end=200:0.08,1000:0.02; seed=0'."""
    return "; ".join(f"{d.label}={','.join(str(d.encode(v)) for v in d.values)}" for d in grid.dims)


def study_doc(sweep: Sweep) -> dict:
    """What a reader needs to know of the study besides its trials (study.json, grid_search_results.json)."""
    return {"study_name": sweep.study_name, "grid": sweep.grid_description(), "grid_fields": sweep.grid.fields(),
            "fixed": sweep.fixed, "projection": sweep.projection}


REFERENCE_FIELDS = ("schedule", "timesteps", "beta_end", "sampler", "seed")  # in every record, varied or not


def records(study: optuna.Study, sweep: Sweep) -> list[dict]:
    """One record per trial, in the format of grid_search_results.json: its params are the reference fields
    and every field the grid sets."""
    out = []
    grid = sweep.grid
    for t in study.get_trials(deepcopy=False):
        if not t.params:
            continue
        fields = grid.overrides(t.params)
        config = sweep.base.replace(**fields)
        a = t.user_attrs
        out.append({"trial": t.number, "state": t.state.name,
                    "params": {**{k: getattr(config, k) for k in REFERENCE_FIELDS}, **fields},
                    "best_fid": a.get("best_fid"), "best_epoch": a.get("best_epoch"),
                    "best_fid_select": a.get("best_fid_select"), "epoch_fids": a.get("epoch_fids", {}),
                    "run_id": a.get("mlflow_run_id"), "trained_by_run_id": a.get("trained_by_run_id"),
                    "train_seconds": a.get("train_seconds"),
                    "final_sampling_seconds": a.get("final_sampling_seconds"),
                    "samples_dir": a.get("samples_dir"), "phase_seconds": a.get("phase_seconds"),
                    "retries": a.get("retries", 0), "error": a.get("error")})
    return out


def write_results(study: optuna.Study, sweep: Sweep) -> dict:
    recs = records(study, sweep)
    complete = [r for r in recs if r["state"] == "COMPLETE" and r["best_fid"] is not None]
    doc = {**study_doc(sweep), "complete": len(complete), "grid_size": sweep.size, "results": recs,
           "best": min(complete, key=lambda r: r["best_fid"]) if complete else None}
    write_json(sweep.out_dir / "grid_search_results.json", doc)
    return doc


def _requeue_failed(study: optuna.Study, sweep: Sweep, retry_failed: bool = False) -> int:
    """Queue again, when a sweep starts, each grid point whose last trial FAILed and has no retry queued:
    interrupted (SIGTERM, Ctrl-C: costs no retry), or failed by a retryable error or a dead worker with
    --max-retries not used up (its retry was not queued, e.g. the worker died first, or the budget was raised).
    A deterministic failure (e.g. NonFiniteLoss) stays FAIL: it would fail the same way. `retry_failed` queues
    every failed point, deterministic ones included, with a fresh retry budget."""
    by_point: dict = {}
    for t in study.get_trials(deepcopy=False):
        by_point.setdefault(point_of(t), []).append(t)
    queued = 0
    S = optuna.trial.TrialState
    for point, trials in by_point.items():
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
        _queue_retry(study, last.number, last.params, retries, errors)
        queued += 1
    return queued


def open_points(study: optuna.Study, sweep: Sweep) -> int:
    """Grid points no trial has started or finished, plus queued retries."""
    trials = study.get_trials(deepcopy=False)
    taken = {point_of(t) for t in trials
             if t.state in DONE_STATES + (optuna.trial.TrialState.RUNNING,)}
    waiting = sum(t.state == optuna.trial.TrialState.WAITING for t in trials)
    return sweep.size - len(taken) + waiting


def work(sweep: Sweep, parent_run_id: str) -> None:
    """One worker: take open grid points until none is open and no trial runs anywhere."""
    from .data import load_mnist
    from .device import configure_backend, resolve_device

    device = resolve_device(sweep.device)
    configure_backend(device)
    study = open_study(sweep)
    cache = {}

    def images():
        if "images" not in cache:
            cache["images"] = load_mnist(sweep.data_dir, train=True, limit=sweep.base.train_samples, device=device)
        return cache["images"]

    objective = Objective(sweep, parent_run_id, images)

    def guarded(trial: optuna.Trial) -> float:
        try:
            return objective(trial)
        except KeyboardInterrupt:  # includes Interrupted (SIGTERM): retried on the next run
            trial.set_user_attr("interrupted", True)
            raise
        except Exception as err:
            _record_failure(trial, err, sweep)
            raise

    running = (optuna.trial.TrialState.RUNNING,)
    # Every point's trials, retries included, are at most 1 + --max-retries: a worker that has run more than that
    # for each point is re-running points (a count that never reaches 0), so it stops instead of spinning.
    bound, started = sweep.size * (sweep.max_retries + 1), 0
    while True:
        if started >= bound:
            log.error("worker stops after %d trials for a grid of %d points: open points never reached 0 (%d left)",
                      started, sweep.size, open_points(study, sweep))
            return
        if open_points(study, sweep) > 0:
            started += 1
            study.optimize(guarded, n_trials=1, catch=(Exception,), gc_after_trial=True)
            write_results(study, sweep)
            _tag_run(sweep.tracking_uri, parent_run_id, {"mnist_diff.points_done": points_done(study, sweep)[1]})
        elif study.get_trials(deepcopy=False, states=running):
            # Other workers' trials are running, or a dead worker's trial is not stale yet (kill -9, then the
            # same command again at once): wait, so that a trial found stale is retried here, not left behind.
            time.sleep(min(5, sweep.heartbeat))
            optuna.storages.fail_stale_trials(study)
        else:
            return


def setup_logging(out_dir: Path) -> None:
    handler = logging.FileHandler(out_dir / "training.log")
    handler.setFormatter(RedactingFormatter(
        f"%(asctime)s [pid {os.getpid()}] %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    optuna.logging.enable_propagation()
    optuna.logging.disable_default_handler()


class SweepFailed(RuntimeError):
    """Worker processes exited with an error, or grid points failed or were left unrun; the results were
    written all the same (`doc`)."""

    def __init__(self, message: str, doc: dict):
        super().__init__(message)
        self.doc = doc


def prefetch(sweep: Sweep) -> None:
    """Fetch MNIST and the Inception weights and compute the FID reference statistics, once, before any trial:
    no trial downloads anything, and N workers never race to write the same file. A lock keeps several sweep
    commands on one --out from doing it at once."""
    from .data import load_mnist
    from .evaluate import ensure_reference_stats
    from .device import resolve_device

    with file_lock(sweep.out_dir / "prefetch.lock"):
        load_mnist(sweep.data_dir, train=True, limit=1)
        reference = Reference(sweep.base.fid_ref, sweep.base.fid_ref_samples, sweep.data_dir, sweep.fid_weights)
        ensure_reference_stats(reference, device=resolve_device(sweep.device))


def points_done(study: optuna.Study, sweep: Sweep) -> tuple[int, str]:
    """(n, 'n/size'): how many grid points are COMPLETE."""
    n = len({point_of(t) for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))})
    return n, f"{n}/{sweep.size}"


def failed_points(study: optuna.Study, sweep: Sweep) -> list[str]:
    """One line per grid point whose every trial FAILed (none complete, running or queued): its fields and the
    last error."""
    by_point: dict = {}
    for t in study.get_trials(deepcopy=False):  # in trial order: a point's last trial comes last
        by_point.setdefault(point_of(t), []).append(t)
    lines = []
    for trials in by_point.values():
        if all(t.state == optuna.trial.TrialState.FAIL for t in trials):
            last = trials[-1]
            where = ", ".join(f"{k}={v}" for k, v in sweep.grid.overrides(last.params).items())
            error = last.user_attrs.get("error") or ("interrupted" if last.user_attrs.get("interrupted")
                                                     else WORKER_LOST)
            lines.append(f"grid point ({where}) failed: {error.splitlines()[0]}")
    return lines


def parent_status(study: optuna.Study, sweep: Sweep, interrupted: bool) -> tuple[str, str | None, str]:
    """(status, reason, 'done/size') of the study's parent run: FINISHED only when every grid point is COMPLETE;
    RUNNING while a trial still runs (another command's worker, or a dead one not yet found stale); KILLED
    when this command was interrupted; FAILED otherwise, saying how many points failed or never ran."""
    S = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    complete, done = points_done(study, sweep)
    running = any(t.state == S.RUNNING for t in trials)
    failed = {point_of(t) for t in trials if t.state == S.FAIL} - {point_of(t) for t in trials if t.state != S.FAIL}
    if complete == sweep.size:
        return "FINISHED", None, done
    if running:
        return "RUNNING", None, done
    if interrupted:
        return "KILLED", f"interrupted with {done} grid points complete", done
    reason = f"{len(failed)} grid point(s) failed" if failed else ""
    unrun = sweep.size - complete - len(failed)
    if unrun:
        reason += (", " if reason else "") + f"{unrun} not run"
    return "FAILED", f"{reason}; {done} complete", done


def run_sweep(sweep: Sweep, workers: int = 1, retry_failed: bool = False) -> dict:
    """Create or resume the study, run `workers` worker processes (1: this process), write the results and
    close the parent run. Raises SweepFailed (after writing the results) when a worker exited non-zero or the
    study ended FAILED (`parent_status`), naming each failed point."""
    from .tracking import reconcile_orphans

    study = open_study(sweep)  # first: a study with another grid is refused before anything is written
    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    prefetch(sweep)
    optuna.storages.fail_stale_trials(study)  # workers killed -9: StaleTrial marks their runs KILLED, retries
    _requeue_failed(study, sweep, retry_failed)
    claimed = claim_study(sweep)
    if claimed and not study.get_trials(deepcopy=False):  # a new study: its points, one of each training first
        for params in trainings_first(sweep):
            enqueue(study, params)
    parent = parent_run(sweep, study, claimed)
    live = {t.user_attrs.get("mlflow_run_id") for t in study.get_trials(deepcopy=False)
            if t.state == optuna.trial.TrialState.RUNNING}
    reconciled = reconcile_orphans(parent.client, parent.uri, sweep.experiment, sweep.study_name, live)
    if reconciled:
        log.warning("marked %d orphaned MLflow run(s) KILLED: %s", len(reconciled), ", ".join(reconciled))
    codes, interrupted, error = [], False, None
    try:
        if workers <= 1:
            setup_logging(sweep.out_dir)
            work(sweep, parent.run_id)
        else:
            codes = run_workers(sweep, parent.run_id, workers)
    except KeyboardInterrupt:
        interrupted = True
        raise
    except Exception as err:
        error = err
        raise
    finally:
        study = open_study(sweep)
        doc = write_results(study, sweep)
        _log_parent(parent, sweep, study, doc, interrupted, error, codes)
    bad = [f"worker {i} exited with code {c}" for i, c in enumerate(codes) if c != 0]
    status, reason, _ = parent_status(study, sweep, interrupted=False)
    if status == "FAILED":
        bad.append(reason)
    if bad:
        raise SweepFailed("; ".join(bad) + f" (see {sweep.out_dir / 'training.log'})"
                          + "".join(f"\n  {line}" for line in failed_points(study, sweep)), doc)
    return doc


def phase_sums(results: list[dict]) -> dict[str, float]:
    """Seconds per phase summed over the trials that recorded them (see `timing`)."""
    sums: dict[str, float] = {}
    for r in results:
        for k, v in (r.get("phase_seconds") or {}).items():
            sums[k] = sums.get(k, 0.0) + v
    return sums


def _log_parent(parent: Tracker, sweep: Sweep, study: optuna.Study, doc: dict, interrupted: bool,
                error: Exception | None, codes: list) -> None:
    best = doc.get("best")
    if best:
        parent.log_metrics({"best_fid": best["best_fid"], "complete_trials": doc["complete"]})
        parent.set_tags({"best_config": json.dumps(best["params"])})
    spent = phase_sums(doc["results"])
    if spent:  # where the study's time went, summed over every trial that recorded it (workers overlap)
        parent.log_metrics({f"seconds_{k}": v for k, v in spent.items()})
    parent.log_artifact(sweep.out_dir / "grid_search_results.json")
    if (sweep.out_dir / "training.log").exists():
        parent.log_artifact(sweep.out_dir / "training.log")
    status, reason, done = parent_status(study, sweep, interrupted)
    tags = {"mnist_diff.points_done": done}
    if any(c != 0 for c in codes):
        tags["mnist_diff.worker_exit_codes"] = json.dumps(codes)
    parent.set_tags(tags)
    error_type = "Interrupted" if status == "KILLED" else "IncompleteGrid"
    if error is not None and status == "FAILED":  # this command itself failed (e.g. the storage went away)
        reason, error_type = f"{type(error).__name__}: {error}; {reason}", type(error).__name__
    parent.set_status(status, reason, error_type)
