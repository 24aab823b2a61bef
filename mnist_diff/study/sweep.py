"""The study: an Optuna grid over schedule x (T, beta_end) x sampler (x seed), one MLflow child run per
trial under one parent run per study.

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
import os
import socket
import tempfile
import time
from pathlib import Path

import optuna

from mnist_diff.study.deadline import STOPPED
from mnist_diff.study.optuna_compat import fail_stale_trials
from mnist_diff.study.records import grid_text, phase_sums, study_doc, write_results
from mnist_diff.study.retries import enqueue
from mnist_diff.study.spec import Sweep
from mnist_diff.study.storage import (
    failed_points,
    make_storage,
    open_points,
    open_study,
    points_done,
    requeue_failed,
    trainings_first,
    trial_point,
)
from mnist_diff.study.worker import prefetch, setup_logging, work
from mnist_diff.study.workers import run_workers
from mnist_diff.tracking.mlflow_store import Tracker, find_study_run
from mnist_diff.util.locks import exclusive
from mnist_diff.util.redact import redact_text, redact_url

log = logging.getLogger(__name__)


CLAIM_ATTR = "mnist_diff.claimed_by"
LEGACY_CLAIM_SUFFIX = ".mnist-diff-claim"  # the marker study earlier versions claimed a study with

PARENT_WAIT_S = 120.0


def claim_study(sweep: Sweep, study: optuna.Study | None = None) -> bool:
    """True for exactly one `sweep` command per study, however many start at the same instant, on however many
    machines: whoever first sets the study's user attribute `mnist_diff.claimed_by`, checked and set under one
    lock (PostgreSQL's advisory lock, which every machine shares; SQLite's file lives on one machine: a file
    lock there), sets the study up (queues its points, creates its parent run) and the others wait for that.
    Nothing but the study itself shows in the storage (optuna-dashboard lists its studies)."""
    study = study or open_study(sweep)
    name = "claim-" + hashlib.sha256(f"{sweep.storage}\n{sweep.study_name}".encode()).hexdigest()[:16]
    with exclusive(sweep.storage, name, Path(tempfile.gettempdir()) / "mnist-diff-locks"):
        if study.user_attrs.get(CLAIM_ATTR):  # read from the storage, inside the lock
            return False
        study.set_user_attr(CLAIM_ATTR, {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()})
    try:  # a study claimed by an earlier version: its marker study goes
        optuna.delete_study(study_name=sweep.study_name + LEGACY_CLAIM_SUFFIX, storage=make_storage(sweep.storage))
    except KeyError:
        pass
    return True


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
            log.warning(
                "study %s: the command that claimed it made no parent run in %.0f s; making one",
                sweep.study_name,
                PARENT_WAIT_S,
            )
            return None
        time.sleep(0.5)


def parent_run(sweep: Sweep, study: optuna.Study, claimed: bool = True) -> Tracker:
    """The study's one parent MLflow run: found again when the sweep resumes or another command made it,
    else created (by the command that `claim_study` chose)."""
    known = _parent_id(sweep, study, claimed)
    tracker = Tracker(
        sweep.tracking_uri,
        sweep.experiment,
        run_name=sweep.study_name,
        tags={"mnist_diff.role": "study", "mnist_diff.study": sweep.study_name},
    )
    existing = (
        tracker.client.get_run(known)
        if known
        # else one made before studies were claimed
        else find_study_run(tracker.client, tracker.uri, sweep.experiment, sweep.study_name)
    )
    if existing is not None:
        tracker.run_id, tracker.experiment_id = existing.info.run_id, existing.info.experiment_id
        tracker.client.update_run(tracker.run_id, status="RUNNING")
    else:
        tracker.start()
        tracker.log_params(
            {
                **sweep.fixed,
                "study_name": sweep.study_name,
                "grid_size": sweep.size,
                "grid": grid_text(sweep.grid),
                "storage": redact_url(sweep.storage),
            }
        )
        tracker.log_dict(study_doc(sweep), "study.json")
    study.set_user_attr("mlflow_parent_run_id", tracker.run_id)
    return tracker


class SweepFailed(RuntimeError):
    """Worker processes exited with an error, or grid points failed or were left unrun; the results were
    written all the same (`doc`)."""

    def __init__(self, message: str, doc: dict):
        super().__init__(message)
        self.doc = doc


def parent_status(
    study: optuna.Study, sweep: Sweep, interrupted: bool, stopped: bool = False
) -> tuple[str, str | None, str]:
    """(status, reason, 'done/size') of the study's parent run: FINISHED only when every grid point is COMPLETE;
    RUNNING while a trial still runs (another command's worker, or a dead one not yet found stale); KILLED
    when this command was interrupted, or `stopped` before the --stop-after deadline with no point failed;
    FAILED otherwise, saying how many points failed or never ran."""
    S = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    complete, done = points_done(study, sweep)
    running = any(t.state == S.RUNNING for t in trials)
    failed = {trial_point(t) for t in trials if t.state == S.FAIL} - {
        trial_point(t) for t in trials if t.state != S.FAIL
    }
    if complete == sweep.size:
        return "FINISHED", None, done
    if running:
        return "RUNNING", None, done
    if interrupted:
        return "KILLED", f"interrupted with {done} grid points complete", done
    if stopped and not failed:
        return "KILLED", f"{STOPPED} with {done} grid points complete; the same command goes on", done
    reason = f"{len(failed)} grid point(s) failed" if failed else ""
    unrun = sweep.size - complete - len(failed)
    if unrun:
        reason += (", " if reason else "") + f"{unrun} not run"
    return "FAILED", f"{reason}; {done} complete", done


def run_sweep(sweep: Sweep, workers: int = 1, retry_failed: bool = False) -> dict:
    """Create or resume the study, run `workers` worker processes (1: this process), write the results and
    close the parent run. Raises SweepFailed (after writing the results) when a worker exited non-zero or the
    study ended FAILED (`parent_status`), naming each failed point."""
    from mnist_diff.tracking.mlflow_store import reconcile_orphans

    study = open_study(sweep)  # first: a study with another grid is refused before anything is written
    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    prefetch(sweep)
    fail_stale_trials(study)  # workers killed -9: StaleTrial marks their runs KILLED, retries
    requeue_failed(study, sweep, retry_failed)
    claimed = claim_study(sweep, study)
    if claimed and not study.get_trials(deepcopy=False):  # a new study: its points, one of each training first
        for params in trainings_first(sweep):
            enqueue(study, params)
    parent = parent_run(sweep, study, claimed)
    live = {
        t.user_attrs.get("mlflow_run_id")
        for t in study.get_trials(deepcopy=False)
        if t.state == optuna.trial.TrialState.RUNNING
    }
    reconciled = reconcile_orphans(parent.client, parent.uri, sweep.experiment, sweep.study_name, live)
    if reconciled:
        log.warning("marked %d orphaned MLflow run(s) KILLED: %s", len(reconciled), ", ".join(reconciled))
    codes, interrupted, error, stopped, handler = [], False, None, False, None
    try:
        if workers <= 1:
            handler = setup_logging(sweep.out_dir)
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
        if sweep.deadline is not None and not interrupted and error is None:  # workers stopped with points open
            stopped = open_points(study, sweep) > 0
        status, reason, _ = parent_status(study, sweep, interrupted, stopped)
        doc = write_results(study, sweep, stopped=reason if status == "KILLED" and stopped else None)
        _log_parent(parent, sweep, study, doc, interrupted, error, codes, stopped)
        if handler is not None:  # a later sweep in this process (tests) logs into its own --out only
            logging.getLogger().removeHandler(handler)
            handler.close()
    bad = [f"worker {i} exited with code {c}" for i, c in enumerate(codes) if c != 0]
    status, reason, _ = parent_status(study, sweep, interrupted=False, stopped=stopped)
    if status == "FINISHED" and doc.get("best"):
        doc["registered_model"] = register_champion(parent, sweep, doc["best"])
    if status == "FAILED":
        bad.append(reason)
    if bad:
        raise SweepFailed(
            "; ".join(bad)
            + f" (see {sweep.out_dir / 'training.log'})"
            + "".join(f"\n  {line}" for line in failed_points(study, sweep)),
            doc,
        )
    return doc


def register_champion(parent: Tracker, sweep: Sweep, best: dict) -> dict | None:
    """Register the finished study's best trial's model under `sweep.registered_model`, its study, trial and
    params as version tags; the alias `champion` moves to it only when its FID beats the current champion's
    (`mlflow_model.register_best`). The outcome is tagged on the parent run (for `report`) and returned as a
    dict; None when it could not register (logged: the study's results stand without it)."""
    from mnist_diff.tracking.mlflow_model import register_best

    tags = {
        "mnist_diff.study": sweep.study_name,
        "mnist_diff.trial": best["trial"],
        "mnist_diff.best_epoch": best["best_epoch"],
        "mnist_diff.params": json.dumps(best["params"], sort_keys=True),
        **{f"mnist_diff.param.{k}": v for k, v in best["params"].items()},
    }
    try:  # two commands of one study finish together: one registers, the other finds it registered
        with exclusive(sweep.storage, f"register-{sweep.registered_model}", sweep.out_dir):
            registered = register_best(parent.uri, best["run_id"], sweep.registered_model, best["best_fid"], tags)
    except Exception as err:
        log.warning("registering the best model failed (%s: %s)", type(err).__name__, redact_text(str(err)))
        return None
    if registered is None:
        log.warning("the best trial's run %s logged no model: nothing registered", best["run_id"])
        return None
    log.info("%s", registered.describe())
    parent.set_tags(
        {
            "mnist_diff.registered_model": registered.name,
            "mnist_diff.registered_version": registered.version,
            "mnist_diff.champion": str(registered.champion).lower(),
        }
    )
    return {**registered.to_dict(), "text": registered.describe()}


def _log_parent(
    parent: Tracker,
    sweep: Sweep,
    study: optuna.Study,
    doc: dict,
    interrupted: bool,
    error: Exception | None,
    codes: list,
    stopped: bool = False,
) -> None:
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
    status, reason, done = parent_status(study, sweep, interrupted, stopped)
    tags = {"mnist_diff.points_done": done}
    if any(c != 0 for c in codes):
        tags["mnist_diff.worker_exit_codes"] = json.dumps(codes)
    parent.set_tags(tags)
    error_type = "Interrupted" if interrupted else "StoppedBeforeDeadline" if stopped else "IncompleteGrid"
    if error is not None and status == "FAILED":  # this command itself failed (e.g. the storage went away)
        reason, error_type = f"{type(error).__name__}: {error}; {reason}", type(error).__name__
    parent.set_status(status, reason, error_type)
