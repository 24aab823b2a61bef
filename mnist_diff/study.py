"""The study: an Optuna grid over schedule x (T, beta_end) x sampler (x seed), one MLflow child run per
trial under one parent run per study. The only module that imports optuna.

Training is shared: a DDPM and a DDIM trial of the same training config (same `Config.training_key()`)
train one model in `OUT/trainings/<key>/`, keeping every epoch's EMA weights. Whichever trial holds the
training's lock and finds no `training_done.json` trains (resuming what an interrupted trial of either
sampler left); once it is done the other only samples and scores. Per-epoch FIDs are never shared: each
trial scores every epoch with its own sampler (see `experiment`), and draws its grids and writes its
`result.json` in its own folder `OUT/trials/<number>/`. `training_done.json` and the `mnist_diff.trained_by`
tags name the run that made the training's last optimizer step.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import warnings

import optuna

# heartbeats and their retry callback are marked experimental; they are exactly what we rely on, knowingly
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

from .config import Config
from .evaluate import Reference
from .experiment import run_experiment, score_saved_training, write_json
from .tracking import Tracker, find_study_run

log = logging.getLogger(__name__)

STUDY_SCHEDULES = ("linear", "cosine", "quadratic", "sigmoid")
STUDY_PAIRS = ((200, 0.08), (1000, 0.02))
STUDY_SAMPLERS = ("ddpm", "ddim")
DEFAULT_STORAGE = "sqlite:///optuna.db"


def pair_key(timesteps: int, beta_end: float) -> str:
    """(T, beta_end) as ONE categorical value, so the grid stays a product of 16, not 32."""
    return f"{int(timesteps)}:{beta_end:g}"


def parse_pair(key: str) -> tuple[int, float]:
    t, b = key.split(":")
    return int(t), float(b)


@dataclass
class Sweep:
    study_name: str
    out_dir: Path
    base: Config                          # the fixed settings; grid params are overridden per trial
    schedules: tuple = STUDY_SCHEDULES
    pairs: tuple = STUDY_PAIRS
    samplers: tuple = STUDY_SAMPLERS
    seeds: tuple = (0,)
    storage: str = DEFAULT_STORAGE
    tracking_uri: str | None = None
    experiment: str = "mnist-diff"
    data_dir: str | None = None
    fid_weights: str | None = None
    device: str = "auto"
    progress: bool = True
    heartbeat: int = 60
    fixed: dict = field(default_factory=dict)

    def search_space(self) -> dict:
        return {"schedule": list(self.schedules), "timesteps_beta_end": [pair_key(*p) for p in self.pairs],
                "sampler": list(self.samplers), "seed": [int(s) for s in self.seeds]}

    def grid_description(self) -> dict:
        return {"schedule": list(self.schedules), "timesteps_beta_end": [list(p) for p in self.pairs],
                "sampler": list(self.samplers), "seed": [int(s) for s in self.seeds]}

    @property
    def size(self) -> int:
        return len(self.schedules) * len(self.pairs) * len(self.samplers) * len(self.seeds)

    def config_for(self, params: dict) -> Config:
        timesteps, beta_end = parse_pair(params["timesteps_beta_end"])
        return self.base.replace(schedule=params["schedule"], timesteps=timesteps, beta_end=beta_end,
                                 sampler=params["sampler"], seed=int(params["seed"]))


def make_storage(url: str, heartbeat: int | None = None):
    """An RDB storage; SQLite waits up to 60 s for a lock instead of failing with 'database is locked'."""
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    kwargs = {}
    if heartbeat:
        kwargs = dict(heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                      heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback())
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)


def open_study(sweep: Sweep) -> optuna.Study:
    study = optuna.create_study(
        study_name=sweep.study_name, storage=make_storage(sweep.storage, sweep.heartbeat),
        sampler=optuna.samplers.GridSampler(sweep.search_space(), seed=0),
        pruner=optuna.pruners.NopPruner(),  # MedianPruner would prune grid points that report values
        direction="minimize", load_if_exists=True)
    known = study.user_attrs.get("grid")
    if known is not None and known != sweep.grid_description():
        raise ValueError(f"study {sweep.study_name!r} exists with another grid: {json.dumps(known)}")
    if known is None:
        study.set_user_attr("grid", sweep.grid_description())
        study.set_user_attr("fixed", sweep.fixed)
    return study


DONE_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED)


def remaining(study: optuna.Study, sweep: Sweep) -> int:
    """Grid points no trial has finished (GridSampler counts FAIL and PRUNED as done, and so do we)."""
    done = {tuple(sorted(t.params.items())) for t in study.get_trials(deepcopy=False) if t.state in DONE_STATES}
    return sweep.size - len(done)


@contextmanager
def training_lock(path: Path):
    """Exclusive lock on one training config: two workers never train the same model at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
        tracker = Tracker(s.tracking_uri, s.experiment, tags=tags,
                          run_name=f"{trial.number:03d}-{config.short_name()}-s{config.seed}", parent_run_id=self.parent_run_id)
        reference = Reference(config.fid_ref, config.fid_ref_samples, s.data_dir, s.fid_weights)
        log.info("trial %d: %s", trial.number, params)
        samples_dir = trial_dir / "samples"  # this trial's own grids, whoever trained
        with tracker.run():
            trial.set_user_attr("mlflow_run_id", tracker.run_id)
            tracker.set_tags({"mnist_diff.samples_dir": samples_dir})
            with training_lock(s.out_dir / "trainings" / f"{key}.lock"):
                done_marker = train_dir / "training_done.json"
                if done_marker.exists():
                    trained_by = json.loads(done_marker.read_text())["run_id"]
                    result = score_saved_training(config, train_dir, trial_dir, reference=reference,
                                                  device=self.images_loader().device, tracker=tracker,
                                                  progress=s.progress)
                else:  # train, or finish what an interrupted trial (of either sampler) left
                    result = run_experiment(config, self.images_loader(), train_dir, out_dir=trial_dir,
                                            reference=reference, tracker=tracker, resume=True, progress=s.progress)
                    trained_by = result["trained_by"]  # whoever made the last optimizer step
                    write_json(done_marker, {"run_id": trained_by})
            if trained_by is not None:
                tracker.set_tags({"mnist_diff.trained_by": trained_by})
            attrs = {"best_fid": result.get("best_fid"), "best_epoch": result.get("best_epoch"),
                     "best_fid_select": result.get("best_fid_select"), "epoch_fids": result["epoch_fids"],
                     "trained_by_run_id": trained_by, "train_seconds": result.get("train_seconds"),
                     "final_sampling_seconds": result.get("final_sampling_seconds"),
                     "samples_dir": str(samples_dir)}
            for k, v in attrs.items():
                trial.set_user_attr(k, v)
        log.info("trial %d done: best_fid %s (epoch %s)", trial.number, result.get("best_fid"),
                 result.get("best_epoch"))
        value = result.get("best_fid")
        return value if value is not None else result.get("best_fid_select", float("nan"))


def parent_run(sweep: Sweep, study: optuna.Study) -> Tracker:
    """The study's parent MLflow run: found again by tag when the sweep resumes, else created."""
    tracker = Tracker(sweep.tracking_uri, sweep.experiment, run_name=sweep.study_name,
                      tags={"mnist_diff.role": "study", "mnist_diff.study": sweep.study_name})
    known = study.user_attrs.get("mlflow_parent_run_id")  # set by whichever sweep command came first
    existing = (tracker.client.get_run(known) if known else
                find_study_run(tracker.client, tracker.uri, sweep.experiment, sweep.study_name))
    if existing is not None:
        tracker.run_id, tracker.experiment_id = existing.info.run_id, existing.info.experiment_id
        tracker.client.update_run(tracker.run_id, status="RUNNING")
    else:
        tracker.start()
        tracker.log_params({**sweep.fixed, "study_name": sweep.study_name, "grid_size": sweep.size,
                            "storage": sweep.storage})
        tracker.log_dict({"study_name": sweep.study_name, "grid": sweep.grid_description(), "fixed": sweep.fixed},
                         "study.json")
    study.set_user_attr("mlflow_parent_run_id", tracker.run_id)
    return tracker


def records(study: optuna.Study, sweep: Sweep) -> list[dict]:
    """One record per trial, in the format of grid_search_results.json."""
    out = []
    for t in study.get_trials(deepcopy=False):
        if not t.params:
            continue
        T, beta_end = parse_pair(t.params["timesteps_beta_end"])
        a = t.user_attrs
        out.append({"trial": t.number, "state": t.state.name,
                    "params": {"schedule": t.params["schedule"], "timesteps": T, "beta_end": beta_end,
                               "sampler": t.params["sampler"], "seed": int(t.params["seed"])},
                    "best_fid": a.get("best_fid"), "best_epoch": a.get("best_epoch"),
                    "best_fid_select": a.get("best_fid_select"), "epoch_fids": a.get("epoch_fids", {}),
                    "run_id": a.get("mlflow_run_id"), "trained_by_run_id": a.get("trained_by_run_id"),
                    "train_seconds": a.get("train_seconds"),
                    "final_sampling_seconds": a.get("final_sampling_seconds"),
                    "samples_dir": a.get("samples_dir"), "error": a.get("error")})
    return out


def write_results(study: optuna.Study, sweep: Sweep) -> dict:
    recs = records(study, sweep)
    complete = [r for r in recs if r["state"] == "COMPLETE" and r["best_fid"] is not None]
    doc = {"study_name": sweep.study_name, "grid": sweep.grid_description(), "fixed": sweep.fixed,
           "complete": len(complete), "grid_size": sweep.size, "results": recs,
           "best": min(complete, key=lambda r: r["best_fid"]) if complete else None}
    write_json(sweep.out_dir / "grid_search_results.json", doc)
    return doc


def _retry_interrupted(study: optuna.Study) -> int:
    """Grid points whose last trial FAILed because its worker was stopped (SIGTERM, Ctrl-C) are queued
    again (stale heartbeats, i.e. kill -9, are re-queued by Optuna's callback). A point with a trial that
    failed by its own error (e.g. NonFiniteLoss) is not: running it again would fail the same way."""
    by_point: dict = {}
    for t in study.get_trials(deepcopy=False):
        by_point.setdefault(tuple(sorted(t.params.items())), []).append(t)
    queued = 0
    S = optuna.trial.TrialState
    for point, trials in by_point.items():
        if any(t.state in (S.COMPLETE, S.RUNNING, S.WAITING) for t in trials):
            continue
        if any(t.state == S.FAIL and t.user_attrs.get("error") for t in trials):
            continue
        last = max(trials, key=lambda t: t.number)
        if last.state == S.FAIL:
            study.enqueue_trial(last.params, user_attrs={"retry_of_trial": last.number})
            queued += 1
    return queued


def open_points(study: optuna.Study, sweep: Sweep) -> int:
    """Grid points no trial has started or finished, plus queued retries."""
    trials = study.get_trials(deepcopy=False)
    taken = {tuple(sorted(t.params.items())) for t in trials
             if t.state in DONE_STATES + (optuna.trial.TrialState.RUNNING,)}
    waiting = sum(t.state == optuna.trial.TrialState.WAITING for t in trials)
    return sweep.size - len(taken) + waiting


def work(sweep: Sweep, parent_run_id: str) -> None:
    """One worker: take open grid points until there are none."""
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
            trial.set_user_attr("error", f"{type(err).__name__}: {err}")
            log.error("trial %d failed: %s: %s", trial.number, type(err).__name__, err)
            raise

    while open_points(study, sweep) > 0:
        study.optimize(guarded, n_trials=1, catch=(Exception,), gc_after_trial=True)
        write_results(study, sweep)


def _worker_process(sweep: Sweep, parent_run_id: str, gpu: int | None, workers: int) -> None:
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    import torch
    # Share the CPU cores: N workers each using every core oversubscribe them (OpenMP threads spin).
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    _setup_logging(sweep.out_dir)
    from .train import StopSignals
    with StopSignals():
        work(sweep, parent_run_id)


def _setup_logging(out_dir: Path) -> None:
    handler = logging.FileHandler(out_dir / "training.log")
    handler.setFormatter(logging.Formatter(f"%(asctime)s [pid {os.getpid()}] %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    optuna.logging.enable_propagation()
    optuna.logging.disable_default_handler()


def run_sweep(sweep: Sweep, workers: int = 1) -> dict:
    """Create or resume the study, run `workers` worker processes (1: this process), and write the results."""
    import multiprocessing as mp

    from .tracking import reconcile_orphans

    study = open_study(sweep)  # first: a study with another grid is refused before anything is written
    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    optuna.storages.fail_stale_trials(study)  # workers killed -9: their heartbeats stopped
    _retry_interrupted(study)
    parent = parent_run(sweep, study)
    live = {t.user_attrs.get("mlflow_run_id") for t in study.get_trials(deepcopy=False)
            if t.state == optuna.trial.TrialState.RUNNING}
    reconciled = reconcile_orphans(parent.client, parent.uri, sweep.experiment, sweep.study_name, live)
    if reconciled:
        log.warning("marked %d orphaned MLflow run(s) KILLED: %s", len(reconciled), ", ".join(reconciled))
    status = "FINISHED"
    try:
        if workers <= 1:
            _setup_logging(sweep.out_dir)
            work(sweep, parent.run_id)
        else:
            import torch
            gpus = torch.cuda.device_count()
            ctx = mp.get_context("spawn")
            procs = [ctx.Process(target=_worker_process,
                                 args=(sweep, parent.run_id, i % gpus if gpus > 1 else None, workers))
                     for i in range(workers)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
    except KeyboardInterrupt as err:
        status = "KILLED"
        parent.set_tags({"error_type": type(err).__name__, "error_message": str(err) or "interrupted"})
        raise
    finally:
        study = open_study(sweep)
        doc = write_results(study, sweep)
        _log_parent(parent, sweep, doc, status)
    return doc


def _log_parent(parent: Tracker, sweep: Sweep, doc: dict, status: str) -> None:
    best = doc.get("best")
    if best:
        parent.log_metrics({"best_fid": best["best_fid"], "complete_trials": doc["complete"]})
        parent.set_tags({"best_config": json.dumps(best["params"])})
    parent.log_artifact(sweep.out_dir / "grid_search_results.json")
    if (sweep.out_dir / "training.log").exists():
        parent.log_artifact(sweep.out_dir / "training.log")
    parent.client.set_terminated(parent.run_id, status=status)
