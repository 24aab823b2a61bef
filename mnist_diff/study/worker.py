"""A worker's loop: claim open grid points from the study and run them until none is left."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import optuna

from mnist_diff.fid.engine import Reference
from mnist_diff.study.deadline import stop_reason
from mnist_diff.study.lanes import run_lanes, stopping
from mnist_diff.study.objective import Objective
from mnist_diff.study.optuna_compat import fail_stale_trials
from mnist_diff.study.records import write_results
from mnist_diff.study.retries import record_failure, tag_trial_run
from mnist_diff.study.spec import Sweep
from mnist_diff.study.storage import open_points, open_study, points_done
from mnist_diff.util.locks import file_lock
from mnist_diff.util.redact import RedactingFormatter

log = logging.getLogger(__name__)
RESULTS = threading.Lock()  # grid_search_results.json: one writer at a time in this process


def work(sweep: Sweep, parent_run_id: str) -> None:
    """One worker: take open grid points until none is open and no trial runs anywhere, or until the next would
    end after `sweep.deadline` (`--stop-after`); `sweep.trials_per_worker` of them at once (study/lanes.py)."""
    from mnist_diff.runtime.data import load_mnist
    from mnist_diff.runtime.device import configure_backend, resolve_device

    device = resolve_device(sweep.device)
    configure_backend(device)
    cache, loading = {}, threading.Lock()

    def images():
        with loading:  # lanes load the training set once
            if "images" not in cache:
                cache["images"] = load_mnist(sweep.data_dir, train=True, limit=sweep.base.train_samples, device=device)
        return cache["images"]

    if sweep.trials_per_worker == 1:
        take_points(sweep, parent_run_id, images)
    else:
        run_lanes(sweep.trials_per_worker, lambda: take_points(sweep, parent_run_id, images), device)


def take_points(sweep: Sweep, parent_run_id: str, images) -> None:
    """Run open grid points, one at a time, until none is left (or a stop or the deadline says end)."""
    study = open_study(sweep)
    objective = Objective(sweep, parent_run_id, images)

    def guarded(trial: optuna.Trial) -> float:
        try:
            return objective(trial)
        except KeyboardInterrupt:  # includes Interrupted (SIGTERM): retried on the next run
            trial.set_user_attr("interrupted", True)
            raise
        except Exception as err:
            record_failure(trial, err, sweep)
            raise

    running = (optuna.trial.TrialState.RUNNING,)
    # Every point's trials, retries included, are at most 1 + --max-retries: a worker that has run more than that
    # for each point is re-running points (a count that never reaches 0), so it stops instead of spinning.
    bound, started = sweep.size * (sweep.max_retries + 1), 0
    while not stopping():
        if started >= bound:
            log.error(
                "worker stops after %d trials for a grid of %d points: open points never reached 0 (%d left)",
                started,
                sweep.size,
                open_points(study, sweep),
            )
            return
        if open_points(study, sweep) > 0:
            stop = stop_reason(study, sweep)
            if stop:  # --stop-after: the trials running elsewhere finish; the same command goes on
                log.info("worker stops: %s", stop)
                return
            started += 1
            study.optimize(guarded, n_trials=1, catch=(Exception,), gc_after_trial=True)
            with RESULTS:  # lanes finish trials at once
                write_results(study, sweep)
            tag_trial_run(sweep.tracking_uri, parent_run_id, {"mnist_diff.points_done": points_done(study, sweep)[1]})
        elif study.get_trials(deepcopy=False, states=running) and not stop_reason(study, sweep):
            # Other workers' trials are running, or a dead worker's trial is not stale yet (kill -9, then the
            # same command again at once): wait, so that a trial found stale is retried here, not left behind.
            time.sleep(min(5, sweep.heartbeat))
            fail_stale_trials(study)
        else:
            return


def setup_logging(out_dir: Path) -> logging.Handler:
    """Log to OUT/training.log; the handler is returned so that a sweep run in-process can remove it after."""
    handler = logging.FileHandler(out_dir / "training.log")
    line = f"%(asctime)s [pid {os.getpid()}] [%(threadName)s] %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(RedactingFormatter(line))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    optuna.logging.enable_propagation()
    optuna.logging.disable_default_handler()
    return handler


def prefetch(sweep: Sweep) -> None:
    """Fetch MNIST and the Inception weights and compute the FID reference statistics, once, before any trial:
    no trial downloads anything, and N workers never race to write the same file. A lock keeps several sweep
    commands on one --out from doing it at once."""
    from mnist_diff.fid.engine import ensure_reference_stats
    from mnist_diff.runtime.data import load_mnist
    from mnist_diff.runtime.device import resolve_device

    with file_lock(sweep.out_dir / "prefetch.lock"):
        load_mnist(sweep.data_dir, train=True, limit=1)
        reference = Reference(sweep.base.fid_ref, sweep.base.fid_ref_samples, sweep.data_dir, sweep.fid_weights)
        ensure_reference_stats(reference, device=resolve_device(sweep.device))
