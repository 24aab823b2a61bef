"""One trial: train (or reuse a shared training), select the epoch, score it, tracked as an MLflow child run."""

from __future__ import annotations

import json
import logging
import math
import time

import optuna

from mnist_diff.fid.engine import Reference
from mnist_diff.runtime import timing
from mnist_diff.runtime.data import mnist_dataset
from mnist_diff.study.optuna_compat import retried_trial_number, stored_trial
from mnist_diff.study.retries import retry_tags
from mnist_diff.study.shared_trainings import DONE_MARKER, Uploader, mark_done, restore
from mnist_diff.study.spec import Sweep
from mnist_diff.tracking.mlflow_store import Tracker, is_server
from mnist_diff.training.experiment import run_experiment, score_saved_training
from mnist_diff.util.atomic import write_json
from mnist_diff.util.locks import exclusive

log = logging.getLogger(__name__)


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
        tags = {
            "mnist_diff.role": "trial",
            "mnist_diff.study": s.study_name,
            "mnist_diff.trial": trial.number,
            "mnist_diff.training_key": key,
        }
        frozen = stored_trial(trial)
        retried_from = frozen.user_attrs.get("retry_of_trial", retried_trial_number(frozen))
        if retried_from is not None:
            tags["mnist_diff.retry_of_trial"] = retried_from
            tags.update(retry_tags(frozen.user_attrs.get("retries", 0), frozen.user_attrs.get("errors", [])))
        tracker = Tracker(
            s.tracking_uri,
            s.experiment,
            tags=tags,
            run_name=f"{trial.number:03d}-{config.short_name()}-s{config.seed}",
            parent_run_id=self.parent_run_id,
            system_metrics=s.system_metrics,
        )
        reference = Reference(config.fid_ref, config.fid_ref_samples, s.data_dir, s.fid_weights)
        log.info("trial %d: %s", trial.number, params)
        samples_dir = trial_dir / "samples"  # this trial's own grids, whoever trained
        timing.reset()
        t0 = time.perf_counter()

        def report(epoch: int, fid: float) -> None:  # optuna-dashboard's curves; NopPruner prunes nothing
            trial.report(fid, step=epoch)

        with tracker.run():
            trial.set_user_attr("mlflow_run_id", tracker.run_id)
            tracker.set_tags({"mnist_diff.samples_dir": samples_dir})
            train_set = mnist_dataset(s.data_dir, train=True, limit=config.train_samples, context="training")
            tracker.log_datasets([train_set, reference.dataset()])
            # two workers, on this machine or (with PostgreSQL) any other, never train one model at once
            with exclusive(s.storage, f"training-{key}", s.out_dir / "trainings"):
                index = StoredTrainingIndex(trial.study, key) if is_server(s.tracking_uri) else None
                if index is not None:  # no shared disk: the training's files come through the tracking server
                    restore(train_dir, index, tracker)
                done_marker = train_dir / DONE_MARKER
                if done_marker.exists():
                    trained_by = json.loads(done_marker.read_text())["run_id"]
                    result = score_saved_training(
                        config,
                        train_dir,
                        trial_dir,
                        reference=reference,
                        device=self.images_loader().device,
                        tracker=tracker,
                        progress=s.progress,
                        on_fid=report,
                    )
                else:  # train, or finish what an interrupted trial (of either sampler) left
                    uploads = [Uploader(tracker, index)] if index is not None else []
                    result = run_experiment(
                        config,
                        self.images_loader(),
                        train_dir,
                        out_dir=trial_dir,
                        reference=reference,
                        tracker=tracker,
                        resume=True,
                        progress=s.progress,
                        callbacks=uploads,
                        on_fid=report,
                    )
                    trained_by = result.trained_by  # whoever made the last optimizer step
                    write_json(done_marker, {"run_id": trained_by})
                    if index is not None:
                        mark_done(index, trained_by)
            if trained_by is not None:
                tracker.set_tags({"mnist_diff.trained_by": trained_by})
            attrs = {
                "best_fid": result.best_fid,
                "best_epoch": result.best_epoch,
                "best_fid_select": result.best_fid_select,
                "epoch_fids": result.epoch_fids,
                "trained_by_run_id": trained_by,
                "train_seconds": result.train_seconds,
                "final_sampling_seconds": result.final_sampling_seconds,
                "samples_dir": str(samples_dir),
            }
            for k, v in attrs.items():
                trial.set_user_attr(k, v)
            seconds = timing.totals(wall_seconds=time.perf_counter() - t0)  # this trial's own work only
            trial.set_user_attr("phase_seconds", seconds)
            tracker.log_metrics({f"seconds_{k}": v for k, v in seconds.items()})
        log.info("trial %d done: best_fid %s (epoch %s)", trial.number, result.best_fid, result.best_epoch)
        scores = (result.best_fid, result.best_fid_select)
        value = next((v for v in scores if v is not None and math.isfinite(v)), None)
        if value is None:  # else Optuna fails the trial with no error of ours on it: say why; retry nothing
            raise NoScore(f"the trial ended with no finite score (best_fid {scores[0]}, best_fid_select {scores[1]})")
        return value
