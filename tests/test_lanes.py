"""`sweep --trials-per-worker N`: N trials at once in one worker process give the results the same trials give
one at a time, each its own Optuna trial and MLflow run; a SIGTERM saves and stops every running trial."""

import json
import signal

import optuna
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service import utils as mlflow_uri
from test_resilience import STATE, finish, start_and_wait_for_epoch, sweep_cmd
from test_study import TINY

import cli

TWO_POINTS = ["--schedule", "linear,cosine", "--timesteps", "200", "--sampler", "ddim"]


def _sweep(folder, lanes):
    folder.mkdir()
    args = [
        "sweep",
        "--study-name",
        "s",
        "--storage",
        f"sqlite:///{folder}/optuna.db",
        "--tracking-uri",
        f"sqlite:///{folder}/mlflow.db",
        "--experiment",
        "e",
        "--out",
        str(folder),
        "--workers",
        "1",
        "--trials-per-worker",
        str(lanes),
        *TWO_POINTS,
        *TINY,
    ]
    result = CliRunner().invoke(cli.cli, args)
    assert result.exit_code == 0, result.output
    doc = json.loads((folder / "grid_search_results.json").read_text())
    return {r["params"]["schedule"]: r for r in doc["results"]}


def test_two_trials_at_once_give_what_they_give_in_turn(tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_DIFF_FID_CACHE", str(tmp_path / "fid-cache"))
    uri_before = mlflow_uri._tracking_uri
    serial, lanes = _sweep(tmp_path / "serial", 1), _sweep(tmp_path / "lanes", 2)
    assert mlflow_uri._tracking_uri == uri_before  # MLflow's process-wide URI: lanes logging models at once restore it
    assert sorted(lanes) == ["cosine", "linear"]
    for schedule, r in serial.items():
        assert r["state"] == lanes[schedule]["state"] == "COMPLETE"
        for key in ("epoch_fids", "best_fid", "best_epoch", "best_fid_select"):
            assert lanes[schedule][key] == r[key], (schedule, key)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/lanes/optuna.db")
    first, second = sorted(study.get_trials(), key=lambda t: t.datetime_start)
    assert second.datetime_start < first.datetime_complete  # they ran at once
    client = MlflowClient(f"sqlite:///{tmp_path}/lanes/mlflow.db")
    runs = {t.user_attrs["mlflow_run_id"] for t in (first, second)}
    assert len(runs) == 2 and all(client.get_run(r).info.status == "FINISHED" for r in runs)


def test_sigterm_to_a_worker_running_two_trials_at_once_saves_and_stops_both(tmp_path):
    cmd = sweep_cmd(tmp_path, "--schedule", "cosine", "--trials-per-worker", "2", "--workers", "1")
    proc, env = start_and_wait_for_epoch(tmp_path, cmd, trainings=2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode != 0, out
    study = optuna.load_study(study_name="r", storage=f"sqlite:///{tmp_path}/optuna.db")
    trials = study.get_trials()
    assert len(trials) == 2 and all(t.state == STATE.FAIL and t.user_attrs.get("interrupted") for t in trials), out
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert {client.get_run(t.user_attrs["mlflow_run_id"]).info.status for t in trials} == {"KILLED"}
    study, client = finish(tmp_path, env, cmd)
    done = [t for t in study.get_trials() if t.state == STATE.COMPLETE]
    assert len(done) == 2 and {t.params["schedule"] for t in done} == {"linear", "cosine"}
    for t in done:  # each resumed its own training from the checkpoint the stop saved
        assert int(client.get_run(t.user_attrs["mlflow_run_id"]).data.params["resumed_from_step"]) > 0
