"""`cli.py sweep` end to end on CPU: real SQLite Optuna and MLflow stores in a temporary folder."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import TINY as TINY_CONFIG
from conftest import tiny_args
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

import cli
from mnist_diff.choices import REGISTERED_MODEL
from mnist_diff.config import Config
from mnist_diff.diffusion.schedules import make_schedule
from mnist_diff.fid.engine import Reference
from mnist_diff.perf import workload
from mnist_diff.runtime import checkpoint
from mnist_diff.study.objective import Objective
from mnist_diff.study.spec import Sweep
from mnist_diff.study.storage import open_study
from mnist_diff.study.sweep import parent_run
from mnist_diff.tracking.mlflow_model import register_best
from mnist_diff.training.experiment import score_model, selection_images
from mnist_diff.training.trainer import (
    Interrupted,
    StopSignals,
    load_sampling_model,
    sample_epoch,
)

# TINY's training for a sweep (whose grid sets schedule, T, beta_end and sampler), 2 epochs of 64 images
TINY = [
    *tiny_args(
        "batch_size",
        "channels",
        "warmup_steps",
        "ddim_steps",
        epochs=2,
        train_samples=64,
        fid_select_samples=8,
        fid_samples=10,
        fid_ref_samples=16,
        fid_batch_size=16,
    ),
    "--quiet",
]


def sweep_args(tmp_path, *extra):
    return [
        "sweep",
        "--study-name",
        "s",
        "--storage",
        f"sqlite:///{tmp_path}/optuna.db",
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
        "--experiment",
        "e",
        "--out",
        str(tmp_path / "out"),
        *TINY,
        *extra,
    ]


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
    points = {
        (t.params["schedule"], t.params["timesteps_beta_end"], t.params["sampler"], t.params["seed"]) for t in trials
    }
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
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "grid_search_results.json",
        "training.log",
        "study.json",
    }
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
        # every trial, trained or scoring another's training: system metrics, and the data it used as inputs
        assert "system/cpu_utilization_percentage" in child.data.metrics
        inputs = {d.dataset.name: d.dataset.digest for d in child.inputs.dataset_inputs}
        assert inputs.keys() == {"mnist-train-64", "mnist-train-16"} and all(len(d) == 32 for d in inputs.values())
    # one training set and one reference for the whole study: the same digests on every trial
    assert len({frozenset((d.dataset.name, d.dataset.digest) for d in c.inputs.dataset_inputs) for c in children}) == 1
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_optuna_dashboard_shows_the_study_and_its_fid_curves(finished_sweep):
    """`optuna-dashboard sqlite:///optuna.db` lists the study (and nothing else) and draws each trial's selection
    FID per epoch, which the trials reported as intermediate values (read through its JSON API)."""
    tmp_path, _, _ = finished_sweep
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db")
    for t in study.get_trials():  # what Optuna holds: the epochs' selection FIDs, as the result records them
        assert t.intermediate_values == {int(e): f for e, f in t.user_attrs["epoch_fids"].items()}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exe = shutil.which("optuna-dashboard", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.Popen(
        [exe, f"sqlite:///{tmp_path}/optuna.db", "--host", "127.0.0.1", "--port", str(port), "--server", "wsgiref"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        api, deadline = f"http://127.0.0.1:{port}/api/studies", time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(api, timeout=5) as r:
                    studies = json.load(r)["study_summaries"]
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.3)
        assert [x["study_name"] for x in studies] == ["s"]  # no claim marker or other helper study
        with urllib.request.urlopen(f"{api}/{studies[0]['study_id']}", timeout=30) as r:
            detail = json.load(r)
        assert detail["has_intermediate_values"] and len(detail["trials"]) == 4
        for t in detail["trials"]:
            fids = study.trials[t["number"]].user_attrs["epoch_fids"]
            assert [(v["step"], v["value"]) for v in t["intermediate_values"]] == [
                (int(e), pytest.approx(f)) for e, f in sorted(fids.items(), key=lambda kv: int(kv[0]))
            ]
    finally:
        proc.terminate()
        proc.wait(30)


def test_training_is_shared_between_samplers(finished_sweep):
    tmp_path, _, _ = finished_sweep
    trainings = [p for p in (tmp_path / "out" / "trainings").iterdir() if p.is_dir()]
    assert len(trainings) == 2  # one per seed, each trained once for both samplers
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db")
    for seed in (0, 1):
        pair = [t for t in study.get_trials() if t.params["seed"] == seed]
        trained_by = {t.user_attrs["trained_by_run_id"] for t in pair}
        assert len(trained_by) == 1 and trained_by <= {t.user_attrs["mlflow_run_id"] for t in pair}


def test_one_point_per_training_runs_first(finished_sweep):
    tmp_path, _, _ = finished_sweep
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db")
    first = sorted(study.get_trials(), key=lambda t: t.number)[:2]
    # two trainings (one per seed): their first trials start before any second trial of a training
    assert {t.params["seed"] for t in first} == {0, 1} and {t.params["sampler"] for t in first} == {"ddpm"}


def test_time_by_phase_per_trial_and_summed_on_the_parent(finished_sweep):
    tmp_path, _, _ = finished_sweep
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("e").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("mnist_diff.role") == "study")
    children = [r for r in runs if r.data.tags.get("mnist_diff.role") == "trial"]
    phases = (
        "training",
        "selection_sampling",
        "selection_fid",
        "final_sampling",
        "final_fid",
        "grids",
        "checkpoints",
        "other",
    )
    for child in children:
        m = {k: child.data.metrics[f"seconds_{k}"] for k in phases}
        trained = child.data.tags["mnist_diff.trained_by"] == child.info.run_id
        assert (m["training"] > 0) == trained and (m["checkpoints"] > 0) == trained
        assert all(m[k] > 0 for k in ("selection_sampling", "selection_fid", "final_sampling", "final_fid", "grids"))
        assert m["other"] >= 0
    for k in phases:  # the parent holds the sums over the trials
        assert parent.data.metrics[f"seconds_{k}"] == pytest.approx(
            sum(c.data.metrics[f"seconds_{k}"] for c in children)
        )


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
    assert again.exit_code == 0, again.output
    assert "4/4 grid points complete" in again.output
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert len(study.get_trials()) == 4


def test_report_from_the_finished_study(finished_sweep):
    tmp_path, _, _ = finished_sweep
    out = tmp_path / "report"
    result = CliRunner().invoke(
        cli.cli, ["report", "--study", "s", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    assert "PARTIAL" not in text
    assert f"registered as `{REGISTERED_MODEL}` version 1 (the alias `champion`)" in text
    # a cosine-only grid lacks 12 of the 16 reference configs: no claims to check
    assert "## Reference claims" not in text and "The reference claims are not checked" in text
    assert "## Where the time went" in text and "| selection sampling |" in text
    # the projection printed at the start, kept in study.json: projected and spent time side by side
    assert "Projected when the study started, serial, at the rates of cpu (" in text
    doc = json.loads((tmp_path / "out" / "grid_search_results.json").read_text())
    assert set(doc["projection"]["seconds"]) == set(workload.PHASES)


def sample_images(tmp_path, name, *args) -> np.ndarray:
    """`cli.py sample ARGS` -> its samples.npz images as [N, 28, 28]."""
    out = tmp_path / name
    result = CliRunner().invoke(cli.cli, ["sample", *args, "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return np.load(out / "samples.npz")["images"][:, 0]


def test_the_champion_is_the_best_trials_model_and_draws_what_sample_draws(finished_sweep, monkeypatch):
    tmp_path, _, result = finished_sweep
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    best = json.loads((tmp_path / "out" / "grid_search_results.json").read_text())["best"]
    results = json.loads((tmp_path / "out" / "grid_search_results.json").read_text())["results"]
    client = MlflowClient(uri, registry_uri=uri)
    champion = client.get_model_version_by_alias(REGISTERED_MODEL, "champion")
    assert [v.version for v in client.search_model_versions(f"name = '{REGISTERED_MODEL}'")] == [champion.version]
    tags = champion.tags  # the study, the trial and its params on the version
    assert tags["mnist_diff.study"] == "s" and tags["mnist_diff.trial"] == str(best["trial"])
    assert (
        float(tags["mnist_diff.best_fid"]) == best["best_fid"]
        and json.loads(tags["mnist_diff.params"]) == best["params"]
    )
    assert (
        f"'{REGISTERED_MODEL}' version {champion.version}" in result.output
        and "'champion' moved to it" in result.output
    )
    for r in results:  # every trial logged its model at its best epoch, its best_fid linked to it
        (output,) = client.get_run(r["run_id"]).outputs.model_outputs
        assert output.step == r["best_epoch"]
        linked = {m.key: m.value for m in client.get_logged_model(output.model_id).metrics}
        assert linked["best_fid"] == r["best_fid"]
        if r["trial"] == best["trial"]:
            assert champion.tags["mnist_diff.model_id"] == output.model_id

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the README's two lines
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}@champion")
    digits = model.predict({"num_samples": 6, "seed": 3})
    assert digits.shape == (6, 28, 28) and digits.dtype == np.uint8 and digits.std() > 0
    assert (model.predict(pd.DataFrame([{"num_samples": 2, "seed": 3}])) == digits[:2]).all()  # image i: (seed, i)
    # the example MLflow drew when it logged the model: one image in a few DDIM steps, not a T-step DDPM chain
    champion_uri = f"models:/{REGISTERED_MODEL}@champion"
    example = mlflow.models.Model.load(champion_uri).load_input_example(champion_uri)
    rows = example.to_dict("records") if isinstance(example, pd.DataFrame) else [example]
    assert rows == [{"num_samples": 1, "seed": 0, "sampler": "ddim", "ddim_steps": 10}]

    by_uri = sample_images(
        tmp_path,
        "by-uri",
        "--model",
        f"models:/{REGISTERED_MODEL}@champion",
        "--seed",
        "3",
        "--num-samples",
        "6",
        "--tracking-uri",
        uri,
    )
    (run,) = [client.get_run(r["run_id"]) for r in results if r["trial"] == best["trial"]]
    key = run.data.tags["mnist_diff.training_key"]
    ema = tmp_path / "out" / "trainings" / key / "checkpoints" / f"ema-epoch-{best['best_epoch']:03d}.pt"
    by_file = sample_images(
        tmp_path,
        "by-file",
        "--checkpoint",
        str(ema),
        "--sampler",
        best["params"]["sampler"],
        "--seed",
        "3",
        "--num-samples",
        "6",
    )
    np.testing.assert_array_equal(by_uri, digits)
    np.testing.assert_array_equal(by_file, digits)
    other = model.predict({"num_samples": 2, "seed": 3, "sampler": "ddim", "ddim_steps": 2, "eta": 1.0})
    assert other.shape == (2, 28, 28) and (other != digits[:2]).any()
    for bad, reason in [
        (pd.DataFrame([{"num_samples": 1, "seed": 0}] * 2), "one request row, not 2"),
        ({"num_samples": 1, "seed": 0, "sampler": "euler"}, "euler"),
        ({"num_samples": 100001, "seed": 0}, "num_samples must be 1 to"),
    ]:
        with pytest.raises(MlflowException, match=reason):
            model.predict(bad)


def test_the_champion_moves_only_to_a_lower_fid(finished_sweep):
    tmp_path, _, _ = finished_sweep
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runs = [r["run_id"] for r in json.loads((tmp_path / "out" / "grid_search_results.json").read_text())["results"]]
    first = register_best(uri, runs[0], "alias-test", 50.0, {"mnist_diff.trial": 0})
    assert (first.version, first.moved, first.previous) == ("1", True, None)
    worse = register_best(uri, runs[1], "alias-test", 60.0, {})
    assert (worse.version, worse.moved, worse.champion, worse.previous) == ("2", False, False, "1")
    assert "stays version 1" in worse.describe()
    again = register_best(uri, runs[0], "alias-test", 50.0, {})  # registered once: its version, still champion
    assert (again.version, again.moved, again.champion) == ("1", False, True)
    better = register_best(uri, runs[2], "alias-test", 40.0, {})
    assert (better.version, better.moved, better.previous, better.previous_fid) == ("3", True, "1", 50.0)
    client = MlflowClient(uri, registry_uri=uri)
    assert str(client.get_model_version_by_alias("alias-test", "champion").version) == "3"
    assert client.get_model_version("alias-test", "1").tags["mnist_diff.trial"] == "0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_the_champion_answers_over_mlflow_models_serve(finished_sweep):
    tmp_path, _, _ = finished_sweep
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    port, log_path = free_port(), tmp_path / "serve.log"
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        f"models:/{REGISTERED_MODEL}@champion",
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log_file:
        server = subprocess.Popen(
            command, env=env, cwd=tmp_path, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 150  # a loaded CPU takes over half a minute to start it
        while True:
            assert server.poll() is None, log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(base + "/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)

        def invoke(record):
            body = json.dumps({"dataframe_records": [record]}).encode()
            request = urllib.request.Request(base + "/invocations", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as r:
                return np.array(json.loads(r.read())["predictions"], dtype=np.uint8)

        served = invoke({"num_samples": 4, "seed": 0})
        with pytest.raises(urllib.error.HTTPError) as bad:
            invoke({"num_samples": 0, "seed": 0})
        assert bad.value.code == 400 and "num_samples" in bad.value.read().decode()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    expected = sample_images(
        tmp_path,
        "served",
        "--model",
        f"models:/{REGISTERED_MODEL}@champion",
        "--seed",
        "0",
        "--num-samples",
        "4",
        "--tracking-uri",
        uri,
    )
    assert served.shape == (4, 28, 28)
    np.testing.assert_array_equal(served, expected)


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--model", "models:/mnist-diff@champion", "--checkpoint", cli.__file__],
            "exactly one of --checkpoint and --model",
        ),
        ([], "exactly one of --checkpoint and --model"),
        (["--model", "models:/no-such-model@champion"], "--model models:/no-such-model@champion: "),
    ],
)
def test_sample_by_model_uri_bad_input(finished_sweep, args, message):
    tmp_path, _, _ = finished_sweep
    out = tmp_path / "bad-sample"
    result = CliRunner().invoke(
        cli.cli, ["sample", *args, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--out", str(out)]
    )
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()[-1]) < 400 and not out.exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--storage", "sqlite:////nonexistent/dir/o.db"], "--storage"),
        (["--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
        (["--ddim-steps", "500"], "cannot exceed --timesteps (200)"),
        (["--schedule", "exp"], "'exp' is not one of"),
        (["--workers", "0"], "'0' is neither auto nor a count >= 1"),
    ],
)
def test_sweep_bad_input_creates_nothing(tmp_path, extra, message):
    result = CliRunner().invoke(cli.cli, sweep_args(tmp_path, *extra))
    assert result.exit_code == 2 and message in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_study_name_with_quotes_a_backslash_and_spaces(tmp_path, monkeypatch):
    """The name goes into MLflow filter strings, which have no escapes: the sweep and the report still find
    its runs (it used to fail after creating both stores)."""
    monkeypatch.setenv("MNIST_DIFF_FID_CACHE", str(tmp_path / "fid-cache"))
    name = 'it\'s a "q" \\'
    args = sweep_args(tmp_path, "--schedule", "linear", "--timesteps", "200", "--sampler", "ddim", "--epochs", "1")
    args[args.index("--study-name") + 1] = name
    result = CliRunner().invoke(cli.cli, args)
    assert result.exit_code == 0 and "1/1 grid points complete" in result.output, result.output
    out = tmp_path / "report"
    result = CliRunner().invoke(
        cli.cli, ["report", "--study", name, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--out", str(out)]
    )
    assert result.exit_code == 0 and "logged to the study's parent run" in result.output, result.output
    assert "| linear |" in (out / "report.md").read_text()


def test_report_gives_the_seed_spread(finished_sweep):
    tmp_path, _, _ = finished_sweep
    out = tmp_path / "report-json"
    result = CliRunner().invoke(
        cli.cli, ["report", "--results", str(tmp_path / "out" / "grid_search_results.json"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["multi_seed"] is True
    by_sampler = {c["sampler"]: c for c in report["configs"]}
    for sampler in ("ddpm", "ddim"):
        values = by_sampler[sampler]["best_fid"]
        assert len(values) == 2 and by_sampler[sampler]["best_fid_std"] is not None
        assert by_sampler[sampler]["best_fid_mean"] == pytest.approx(sum(values) / 2)
    # the sampler grouping compares the worse sampler with the better one, paired on the training and seed:
    # 2 seeds give the difference, but no verdict on the seed spread
    worse = next(g["vs_best"] for g in report["means"]["sampler"]["groups"] if g["vs_best"]["text"] != "best")
    assert worse["n_seeds"] == 2 and worse["n_pairs"] == 2 and worse["shared_training"]
    assert worse["exceeds_seed_spread"] is None
    assert "not enough seeds to tell (needs 3 seeds or more)" in (out / "report.md").read_text()


def test_a_takeover_scores_every_epoch_with_its_own_sampler(tmp_path, monkeypatch, mnist_small, data_dir, fid_weights):
    """The DDPM trial is stopped by a real SIGTERM after epoch 1 of 2; the DDIM trial takes the training over
    and finishes it; the DDPM retry inherits it. Each trial's per-epoch FIDs and grids must be its own
    sampler's, and the run that finished the training is named. (Few FIDs: each costs seconds on CPU.)"""
    monkeypatch.setenv("MNIST_DIFF_FID_CACHE", str(tmp_path / "fid-cache"))
    base = Config(
        **{
            **TINY_CONFIG,
            "epochs": 2,
            "fid_select_samples": 8,
            "fid_samples": 0,
            "fid_ref_samples": 16,
            "fid_batch_size": 16,
        }
    )
    sweep = Sweep(
        study_name="takeover",
        out_dir=tmp_path / "out",
        base=base,
        schedules=("linear",),
        pairs=((20, 0.2),),
        samplers=("ddpm", "ddim"),
        storage=f"sqlite:///{tmp_path}/optuna.db",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        experiment="e",
        data_dir=data_dir,
        fid_weights=fid_weights,
        progress=False,
        heartbeat=0,
    )
    sweep.out_dir.mkdir()
    study = open_study(sweep)
    objective = Objective(sweep, parent_run(sweep, study).run_id, lambda: mnist_small[:128])
    train_dir = sweep.out_dir / "trainings" / base.training_key()
    ckpt_dir = train_dir / "checkpoints"

    def run(sampler):
        study.enqueue_trial({"schedule": "linear", "timesteps_beta_end": "20:0.2", "sampler": sampler, "seed": 0})
        study.optimize(objective, n_trials=1)
        return study.get_trials()[-1]

    done = threading.Event()

    def sigterm_after_epoch_1():  # arrives during epoch 1's FID: the loop saves and stops at the next step
        while not checkpoint.ema_path(ckpt_dir, 1).exists():
            if done.wait(0.02):
                return
        os.kill(os.getpid(), signal.SIGTERM)

    outer = signal.signal(signal.SIGTERM, lambda *_: None)  # a signal arriving too late must not end pytest
    try:
        with StopSignals():
            threading.Thread(target=sigterm_after_epoch_1, daemon=True).start()
            with pytest.raises(Interrupted):
                run("ddpm")
    finally:
        done.set()
        signal.signal(signal.SIGTERM, outer)
    assert checkpoint.load_latest(ckpt_dir)["step"] == 4  # stopped after epoch 1 of 2
    killed = study.get_trials()[-1]
    ddim = run("ddim")  # finds no training_done.json: resumes the DDPM trial's checkpoint, finishes the training
    ddpm = run("ddpm")  # the retry: inherits the finished training
    S = optuna.trial.TrialState
    assert [t.state for t in (killed, ddim, ddpm)] == [S.FAIL, S.COMPLETE, S.COMPLETE]

    # the run that finished the training is named, not the one that started it
    finisher = ddim.user_attrs["mlflow_run_id"]
    assert json.loads((train_dir / "training_done.json").read_text())["run_id"] == finisher
    client = MlflowClient(sweep.tracking_uri)
    assert "mnist_diff.trained_by" not in client.get_run(killed.user_attrs["mlflow_run_id"]).data.tags
    for t in (ddim, ddpm):
        assert t.user_attrs["trained_by_run_id"] == finisher
        assert client.get_run(t.user_attrs["mlflow_run_id"]).data.tags["mnist_diff.trained_by"] == finisher

    fids = {
        sampler: {int(e): v for e, v in t.user_attrs["epoch_fids"].items()}
        for sampler, t in (("ddim", ddim), ("ddpm", ddpm))
    }
    assert set(fids["ddim"]) == set(fids["ddpm"]) == {1, 2}
    # computed while training, by the trial of that sampler: DDPM's epoch 1, DDIM's epoch 2
    scored_by_killed = {m.step: m.value for m in client.get_metric_history(killed.user_attrs["mlflow_run_id"], "fid")}
    assert fids["ddpm"][1] == pytest.approx(scored_by_killed[1])
    # scored again from the saved EMA weights: DDIM's epoch 1 (trained by the DDPM trial), DDPM's epoch 2
    reference = Reference("train", 16, data_dir, fid_weights)
    for sampler, epoch in (("ddim", 1), ("ddpm", 2)):
        model, _, _ = load_sampling_model(checkpoint.ema_path(ckpt_dir, epoch), "cpu")
        config = base.replace(sampler=sampler)
        expected = score_model(model, config, reference, len(selection_images(config)), progress=False)["fid"]
        assert fids[sampler][epoch] == pytest.approx(expected, rel=1e-4), (sampler, epoch)
    for epoch in (1, 2):
        assert fids["ddim"][epoch] != pytest.approx(fids["ddpm"][epoch], rel=1e-3)  # the samplers' FIDs differ
    schedule = make_schedule("linear", 20, base.beta_start, 0.2)
    for sampler, t in (("ddim", ddim), ("ddpm", ddpm)):
        logged = client.get_metric_history(t.user_attrs["mlflow_run_id"], "fid")  # what `report --study` reads
        assert {m.step: m.value for m in logged} == pytest.approx(fids[sampler])
        samples = Path(t.user_attrs["samples_dir"])
        assert samples.parent.name == f"{t.number:04d}"  # the trial's own folder
        for epoch in (1, 2):
            model, _, _ = load_sampling_model(checkpoint.ema_path(ckpt_dir, epoch), "cpu")
            fresh, _, _ = sample_epoch(
                model, schedule, base.replace(sampler=sampler), tmp_path / f"{sampler}-{epoch}.png"
            )
            assert (np.asarray(Image.open(samples / f"epoch-{epoch:03d}.png")) == np.asarray(Image.open(fresh))).all()

    # a run that trains nothing is never named: as if the finisher had died before writing training_done.json
    (train_dir / "training_done.json").unlink()
    again = run("ddpm")
    assert again.user_attrs["trained_by_run_id"] == finisher
    assert json.loads((train_dir / "training_done.json").read_text())["run_id"] == finisher
    assert {int(e): v for e, v in again.user_attrs["epoch_fids"].items()} == pytest.approx(fids["ddpm"])


def test_which_failed_points_a_new_sweep_queues_again(tmp_path):
    """The retry policy at sweep start, on a real SQLite study holding one failed trial per grid point."""
    from mnist_diff.config import Config
    from mnist_diff.study.retries import WORKER_LOST
    from mnist_diff.study.spec import Sweep
    from mnist_diff.study.storage import open_study, requeue_failed
    from mnist_diff.study.sweep import parent_status

    sweep = Sweep(
        study_name="q",
        out_dir=tmp_path,
        base=Config(),
        pairs=((200, 0.08),),
        samplers=("ddpm",),
        storage=f"sqlite:///{tmp_path}/optuna.db",
        max_retries=2,
    )
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

    assert requeue_failed(study, sweep) == 2
    assert queued() == {
        "cosine": {"retry_of_trial": 1, "retries": 1, "errors": ["OSError: disk"]},
        "sigmoid": {"retry_of_trial": 3, "retries": 1, "errors": [WORKER_LOST]},
    }
    assert requeue_failed(study, sweep) == 0  # queued points are not queued twice
    assert parent_status(study, sweep, interrupted=False)[1] == "2 grid point(s) failed, 2 not run; 0/4 complete"
    assert requeue_failed(study, sweep, retry_failed=True) == 2  # the rest, deterministic too, with fresh budget
    assert {k: v["retries"] for k, v in queued().items()} == {"linear": 0, "cosine": 1, "quadratic": 0, "sigmoid": 1}


def test_one_command_claims_a_study(tmp_path):
    """However many `sweep` commands start at once, exactly one sets the study up (see the two-command test in
    test_resilience for the end-to-end version)."""
    from mnist_diff.study.sweep import claim_study

    sweep = Sweep(study_name="c", out_dir=tmp_path, base=Config(), storage=f"sqlite:///{tmp_path}/optuna.db")
    optuna.create_study(study_name="c.mnist-diff-claim", storage=sweep.storage)  # an earlier version's marker
    assert [claim_study(sweep) for _ in range(3)] == [True, False, False]
    assert claim_study(Sweep(study_name="other", out_dir=tmp_path, base=Config(), storage=sweep.storage))
    # the claim is the study's own attribute: no marker study beside it (optuna-dashboard lists them all)
    assert sorted(optuna.get_all_study_names(sweep.storage)) == ["c", "other"]


def test_a_study_resumed_with_a_time_budget_keeps_its_protocol(tmp_path, monkeypatch):
    """The budget chose (or kept) the protocol when the study was created; a rerun keeps it even where the rates
    measured since would choose another, here any: one second fits nothing."""
    monkeypatch.setenv("MNIST_DIFF_FID_CACHE", str(tmp_path / "fid-cache"))
    point = ["--schedule", "linear", "--timesteps", "200", "--sampler", "ddim"]
    first = CliRunner().invoke(cli.cli, sweep_args(tmp_path, *point, "--time-budget", "10h"))
    assert first.exit_code == 0 and "the protocol as given fits" in first.output, first.output
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert study.user_attrs["fixed"]["time_budget"] == 36000
    again = CliRunner().invoke(cli.cli, sweep_args(tmp_path, *point, "--time-budget", "1s"))
    assert again.exit_code == 0, again.output
    assert (
        "--time-budget: study 's' goes on with the protocol it was created with: selection FID on 8 images "
        "every 1 epoch(s), final FID on 10"
    ) in again.output
    assert "1/1 grid points complete" in again.output
    # a dry run opens no store: it fits afresh, and says that nothing fits
    dry = CliRunner().invoke(cli.cli, sweep_args(tmp_path, *point, "--time-budget", "1s", "--dry-run"))
    assert dry.exit_code == 2 and "even the smallest FID protocol" in dry.output, dry.output


def test_a_worker_never_runs_points_again_and_again(tmp_path, data_dir):
    """The defence against a sweep that never ends: a grid whose open points never reach 0 (two equal choices,
    which `grid` no longer makes) stops after 1 + --max-retries trials a point. Its trials fail at once
    (NonFiniteLoss at step 2, before any FID)."""
    from mnist_diff.study.grid import Dim
    from mnist_diff.study.worker import work

    base = Config(**{**TINY_CONFIG, "epochs": 2, "train_samples": 64, "lr": 1e30})
    sweep = Sweep(
        study_name="spin",
        out_dir=tmp_path,
        base=base,
        schedules=("linear",),
        pairs=((20, 0.2),),
        samplers=("ddim",),
        extra=(Dim(("eta",), ((0.0,), (0.0,))),),
        storage=f"sqlite:///{tmp_path}/o.db",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        experiment="e",
        data_dir=data_dir,
        progress=False,
        heartbeat=0,
        max_retries=0,
    )
    worker = threading.Thread(target=work, args=(sweep, None), daemon=True)
    worker.start()
    worker.join(180)
    assert not worker.is_alive(), "the worker kept running the same point"
    trials = optuna.load_study(study_name="spin", storage=sweep.storage).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL] * 2


def test_a_sweep_with_a_failed_point_exits_1_and_says_which_and_why(tmp_path, monkeypatch):
    """lr 1e30: NonFiniteLoss at step 2, before any FID; the results are written, then the command fails."""
    monkeypatch.setenv("MNIST_DIFF_FID_CACHE", str(tmp_path / "fid-cache"))
    point = ["--schedule", "linear", "--timesteps", "200", "--sampler", "ddim", "--lr", "1e30"]
    result = CliRunner().invoke(cli.cli, sweep_args(tmp_path, *point))
    assert result.exit_code == 1, result.output
    assert "0/1 grid points complete" in result.output
    assert "Error: 1 grid point(s) failed; 0/1 complete (see " in result.output
    assert (
        "\n  grid point (schedule=linear, timesteps=200, beta_end=0.08, sampler=ddim, seed=0) failed: "
        "NonFiniteLoss: non-finite training loss nan at step 2"
    ) in result.output
