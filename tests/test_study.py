"""`cli.py sweep` end to end on CPU: real SQLite Optuna and MLflow stores in a temporary folder."""
import json
import os
import subprocess
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "2", "--batch-size", "32", "--train-samples", "64", "--channels", "8", "--warmup-steps", "2",
        "--fid-select-samples", "8", "--fid-samples", "10", "--fid-ref-samples", "16", "--fid-batch-size", "16",
        "--ddim-steps", "5", "--quiet"]


def sweep_args(tmp_path, *extra):
    return ["sweep", "--study-name", "s", "--storage", f"sqlite:///{tmp_path}/optuna.db",
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--experiment", "e", "--out", str(tmp_path / "out"),
            *TINY, *extra]


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sweep")
    os.environ["MNIST_DIFF_FID_CACHE"] = str(tmp_path / "fid-cache")
    # 1 schedule x 1 (T, beta_end) x 2 samplers x 2 seeds: 4 grid points, 2 trainings
    args = sweep_args(tmp_path, "--schedule", "cosine", "--timesteps", "200", "--seeds", "2")
    result = CliRunner().invoke(cli.cli, args)
    assert result.exit_code == 0, result.output
    return tmp_path, args, result


def test_every_grid_point_completes_once(finished_sweep):
    tmp_path, _, result = finished_sweep
    assert "4/4 grid points complete" in result.output
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db")
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
    points = {(t.params["schedule"], t.params["timesteps_beta_end"], t.params["sampler"], t.params["seed"])
              for t in trials}
    assert points == {("cosine", "200:0.08", m, seed) for m in ("ddpm", "ddim") for seed in (0, 1)}
    assert all(t.value == t.user_attrs["best_fid"] for t in trials)


def test_mlflow_parent_and_children(finished_sweep):
    tmp_path, _, _ = finished_sweep
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("e")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("mnist_diff.role") == "study"]
    children = [r for r in runs if r.data.tags.get("mnist_diff.role") == "trial"]
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.params["epochs"] == "2"
    assert parent.data.tags["mnist_diff.points_done"] == "4/4"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"grid_search_results.json",
                                                                           "training.log", "study.json"}
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db")
    by_run = {t.user_attrs["mlflow_run_id"]: t for t in study.get_trials()}
    for child in children:
        tags, params = child.data.tags, child.data.params
        assert child.info.status == "FINISHED" and tags["mlflow.parentRunId"] == parent.info.run_id
        trial = by_run[child.info.run_id]  # trial -> run and run -> trial agree
        assert tags["mnist_diff.trial"] == str(trial.number) and tags["mnist_diff.study"] == "s"
        assert params["schedule"] == trial.params["schedule"] and params["sampler"] == trial.params["sampler"]
        assert params["seed"] == str(trial.params["seed"])
        assert params["timesteps"] == "200" and params["beta_end"] == "0.08"
        assert [m.step for m in client.get_metric_history(child.info.run_id, "fid")] == [1, 2]
        assert child.data.metrics["best_fid"] > 0


def test_training_is_shared_between_samplers(finished_sweep):
    tmp_path, _, _ = finished_sweep
    trainings = [p for p in (tmp_path / "out" / "trainings").iterdir() if p.is_dir()]
    assert len(trainings) == 2  # one per seed, each trained once for both samplers
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db")
    for seed in (0, 1):
        pair = [t for t in study.get_trials() if t.params["seed"] == seed]
        trained_by = {t.user_attrs["trained_by_run_id"] for t in pair}
        assert len(trained_by) == 1 and trained_by <= {t.user_attrs["mlflow_run_id"] for t in pair}


def test_results_json(finished_sweep):
    tmp_path, _, _ = finished_sweep
    doc = json.loads((tmp_path / "out" / "grid_search_results.json").read_text())
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert doc["study_name"] == "s" and doc["complete"] == doc["grid_size"] == 4
    assert doc["grid"]["timesteps_beta_end"] == [[200, 0.08]]
    by_trial = {t.number: t for t in study.get_trials()}
    for rec in doc["results"]:
        t = by_trial[rec["trial"]]
        assert rec["best_fid"] == t.value and rec["run_id"] == t.user_attrs["mlflow_run_id"]
        assert set(rec["epoch_fids"]) == {"1", "2"} and rec["best_epoch"] in (1, 2)
        assert rec["params"]["timesteps"] == 200 and rec["params"]["beta_end"] == 0.08
        assert rec["params"]["seed"] == t.params["seed"]
    assert doc["best"]["best_fid"] == min(r["best_fid"] for r in doc["results"])
    assert (tmp_path / "out" / "training.log").read_text().count("done: best_fid") == 4


def test_rerun_starts_no_new_trial(finished_sweep):
    tmp_path, args, _ = finished_sweep
    again = CliRunner().invoke(cli.cli, args)
    assert again.exit_code == 0, again.output and "4/4" in again.output
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert len(study.get_trials()) == 4


def test_report_from_the_finished_study(finished_sweep):
    tmp_path, _, _ = finished_sweep
    out = tmp_path / "report"
    result = CliRunner().invoke(cli.cli, ["report", "--study", "s", "--tracking-uri",
                                          f"sqlite:///{tmp_path}/mlflow.db", "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    assert "PARTIAL" not in text and "## Reference claims" in text


@pytest.mark.parametrize("extra,message", [
    (["--storage", "sqlite:////nonexistent/dir/o.db"], "--storage"),
    (["--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
    (["--ddim-steps", "500"], "cannot exceed --timesteps (200)"),
    (["--schedule", "exp"], "'exp' is not one of"),
])
def test_sweep_bad_input_creates_nothing(tmp_path, extra, message):
    result = CliRunner().invoke(cli.cli, sweep_args(tmp_path, *extra))
    assert result.exit_code == 2 and message in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_mlflow_run_local(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "MNIST_DIFF_FID_CACHE": str(tmp_path / "fid-cache")}
    cmd = ["mlflow", "run", str(ROOT), "--env-manager", "local", "-e", "main", "-P", "preset=smoke",
           "-P", "sampler=ddim", "-P", "schedule=linear", "-P", "timesteps=200", "-P", "epochs=1",
           "-P", f"storage=sqlite:///{tmp_path}/optuna.db", "-P", f"out={tmp_path}/out",
           "-P", "fid-select-samples=8", "-P", "fid-samples=10"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "grid_search_results.json").read_text())
    assert doc["complete"] == 1 and doc["results"][0]["params"]["sampler"] == "ddim"
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {r.info.status for r in runs} == {"FINISHED"}
    parent = [r for r in runs if r.data.tags.get("mnist_diff.role") == "study"]
    assert len(parent) == 1  # the run `mlflow run` made is adopted as the study's parent run


def test_report_gives_the_seed_spread(finished_sweep):
    tmp_path, _, _ = finished_sweep
    out = tmp_path / "report-json"
    result = CliRunner().invoke(cli.cli, ["report", "--results", str(tmp_path / "out" / "grid_search_results.json"),
                                          "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["multi_seed"] is True
    by_sampler = {c["sampler"]: c for c in report["configs"]}
    for sampler in ("ddpm", "ddim"):
        values = by_sampler[sampler]["best_fid"]
        assert len(values) == 2 and by_sampler[sampler]["best_fid_std"] is not None
        assert by_sampler[sampler]["best_fid_mean"] == pytest.approx(sum(values) / 2)
    assert "bootstrap" in (out / "report.md").read_text()


def test_which_failed_points_a_new_sweep_queues_again(tmp_path):
    """The retry policy at sweep start, on a real SQLite study holding one failed trial per grid point."""
    from mnist_diff.config import Config
    from mnist_diff.study import WORKER_LOST, Sweep, _requeue_failed, open_study, parent_status

    sweep = Sweep(study_name="q", out_dir=tmp_path, base=Config(), pairs=((200, 0.08),), samplers=("ddpm",),
                  storage=f"sqlite:///{tmp_path}/optuna.db", max_retries=2)
    study = open_study(sweep)
    dists = {k: optuna.distributions.CategoricalDistribution(v) for k, v in sweep.search_space().items()}
    S = optuna.trial.TrialState

    def fail(schedule, **attrs):
        params = {"schedule": schedule, "timesteps_beta_end": "200:0.08", "sampler": "ddpm", "seed": 0}
        study.add_trial(optuna.trial.create_trial(state=S.FAIL, params=params, distributions=dists, user_attrs=attrs))

    fail("linear", error="NonFiniteLoss: nan", retryable=False, errors=["NonFiniteLoss: nan"])  # deterministic
    fail("cosine", interrupted=True, retries=1, errors=["OSError: disk"])  # SIGTERM: spends no retry
    fail("quadratic", error="OSError: disk", retryable=True, retries=2, errors=["a", "b", "OSError: disk"])
    fail("sigmoid", retries=0)  # failed as stale (its worker died) before its retry was queued
    assert parent_status(study, sweep, interrupted=False) == ("FAILED", "4 grid point(s) failed; 0/4 complete", "0/4")
    assert parent_status(study, sweep, interrupted=True)[0] == "KILLED"

    def queued():
        return {t.system_attrs["fixed_params"]["schedule"]: t.user_attrs for t in study.get_trials(states=(S.WAITING,))}

    assert _requeue_failed(study, sweep) == 2
    assert queued() == {"cosine": {"retry_of_trial": 1, "retries": 1, "errors": ["OSError: disk"]},
                        "sigmoid": {"retry_of_trial": 3, "retries": 1, "errors": [WORKER_LOST]}}
    assert _requeue_failed(study, sweep) == 0  # queued points are not queued twice
    assert parent_status(study, sweep, interrupted=False)[1] == "2 grid point(s) failed, 2 not run; 0/4 complete"
    assert _requeue_failed(study, sweep, retry_failed=True) == 2  # the rest, deterministic too, with fresh budget
    assert {k: v["retries"] for k, v in queued().items()} == {"linear": 0, "cosine": 1, "quadratic": 0, "sigmoid": 1}
