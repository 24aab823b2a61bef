"""A study read back from MLflow as report records (the `results` of `grid_search_results.json`)."""

from __future__ import annotations

from mnist_diff.report.analysis import extra_fields, normalize_record, sort_records
from mnist_diff.report.points import REFERENCE_FIELDS
from mnist_diff.study.grid import parse_value
from mnist_diff.tracking.mlflow_store import read_study

# MLflow run status -> the study's trial state (the vocabulary of grid_search_results.json).
RUN_STATE = {
    "FINISHED": "COMPLETE",
    "FAILED": "FAIL",
    "KILLED": "FAIL(KILLED)",
    "RUNNING": "RUNNING",
    "SCHEDULED": "WAITING",
}


def load_study_from_mlflow(tracking_uri: str, study_name: str) -> tuple[list[dict], dict, str]:
    """(records, study, parent_run_id) for a study logged as a parent run with one child run per trial.

    Records are normalized as `analysis.normalize_record`; every child run is returned, retries included:
    the report picks the COMPLETE one per grid point."""
    runs = read_study(tracking_uri, study_name)
    grid_fields = [*REFERENCE_FIELDS, "seed", *extra_fields(runs.study)]
    records = []
    for run in runs.trials:
        tags, params, metrics = run.tags, run.params, run.metrics
        if not all(k in params for k in REFERENCE_FIELDS):  # stopped (SIGTERM, kill) before it logged its
            continue  # parameters: no grid point to report it under
        records.append(
            normalize_record(
                {
                    "trial": tags.get("mnist_diff.trial"),
                    "state": RUN_STATE.get(run.status, run.status),
                    "params": {k: parse_value(k, params[k]) for k in grid_fields if k in params},  # MLflow keeps text
                    **{
                        k: metrics.get(k)
                        for k in (
                            "best_fid",
                            "best_epoch",
                            "best_fid_select",
                            "train_seconds",
                            "final_sampling_seconds",
                        )
                    },
                    "epoch_fids": dict(run.fid_history),
                    "run_id": run.run_id,
                    "trained_by_run_id": tags.get("mnist_diff.trained_by"),
                    "samples_dir": tags.get("mnist_diff.samples_dir"),
                    "phase_seconds": {k[len("seconds_") :]: v for k, v in metrics.items() if k.startswith("seconds_")},
                    "error": tags.get("error_type") and f"{tags['error_type']}: {tags.get('error_message', '')}",
                }
            )
        )
    study = {**runs.study, "registered_model": runs.registered_model()}
    return sort_records(records), study, runs.parent_run_id
