"""A study shared through a real PostgreSQL server (`.ci/postgres.sh` starts one and exports
MNIST_DIFF_TEST_PG): the study claim, the training lock across processes, two `sweep` commands at once, and
no password in any record. Skipped, saying why, where no server can be reached; under CI they must run."""

import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import optuna
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

import cli
from mnist_diff.cli.checks import checked_tracking_uri
from mnist_diff.config import Config
from mnist_diff.study.spec import Sweep
from mnist_diff.study.sweep import claim_study
from mnist_diff.tracking.mlflow_store import Tracker
from mnist_diff.util.locks import exclusive

ROOT = Path(__file__).resolve().parents[1]
SERVER = os.environ.get("MNIST_DIFF_TEST_PG")  # postgresql://user:password@host:port, no database


@contextmanager
def _database():
    """A fresh database on the test server, dropped afterwards."""
    reason = "no PostgreSQL server for the tests: set MNIST_DIFF_TEST_PG (.ci/postgres.sh starts one)"
    try:
        import psycopg  # psycopg 3: SQLAlchemy 2's default driver for postgresql:// URLs

        conn = psycopg.connect(f"{SERVER}/postgres", connect_timeout=5, autocommit=True) if SERVER else None
    except Exception as err:  # noqa: BLE001 - any failure to reach it is the reason
        conn, reason = None, f"PostgreSQL at {SERVER} unreachable: {err}"
    if conn is None:
        if os.environ.get("CI"):
            pytest.fail(reason)  # CI starts a server: these tests must run there
        pytest.skip(reason)
    name = f"t_{uuid.uuid4().hex[:12]}"
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{SERVER}/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.close()


@pytest.fixture
def pg_url():
    with _database() as url:
        yield url


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1: runs in PostgreSQL, artifacts proxied into a temp folder."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    with _database() as db, socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        log = open(folder / "server.log", "w")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                db,
                "--artifacts-destination",
                str(folder / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )  # GenAI jobs
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    with urllib.request.urlopen(url + "/health", timeout=2):
                        break
                except OSError:
                    assert proc.poll() is None and time.monotonic() < deadline, (folder / "server.log").read_text()
                    time.sleep(0.5)
            yield url
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
            log.close()


def test_one_claim_per_study(pg_url, tmp_path):
    sweep = Sweep(study_name="c", out_dir=tmp_path, base=Config(), storage=pg_url)
    assert [claim_study(sweep) for _ in range(3)] == [True, False, False]


def _hold(url, name, seconds, started):
    with exclusive(url, name, Path("/nonexistent")):  # PostgreSQL: no file
        started.set()
        time.sleep(seconds)


def test_the_training_lock_holds_across_processes_and_dies_with_its_holder(pg_url):
    ctx = mp.get_context("spawn")
    started = ctx.Event()
    holder = ctx.Process(target=_hold, args=(pg_url, "training-abc", 3.0, started))
    holder.start()
    assert started.wait(60)
    t0 = time.monotonic()
    with exclusive(pg_url, "training-abc", Path("/nonexistent")):
        waited = time.monotonic() - t0
    holder.join()
    assert waited > 1.5  # blocked until the holder let go
    with exclusive(pg_url, "training-other", Path("/nonexistent")):  # another name is free meanwhile
        pass
    # a holder killed with -9 holds nothing: the server drops its session, and its lock with it
    started = ctx.Event()
    holder = ctx.Process(target=_hold, args=(pg_url, "training-abc", 600.0, started))
    holder.start()
    assert started.wait(60)
    holder.kill()
    holder.join()
    t0 = time.monotonic()
    with exclusive(pg_url, "training-abc", Path("/nonexistent")):
        assert time.monotonic() - t0 < 30


def test_two_sweeps_at_once_on_postgresql(pg_url, tmp_path):
    """Two commands started together on one PostgreSQL study (shared --out): each grid point once, each
    training once, one parent run, and the storage URL in MLflow without its password."""
    env = {**os.environ, "MNIST_DIFF_FID_CACHE": str(tmp_path / "fid-cache")}
    cmd = [
        sys.executable,
        str(ROOT / "cli.py"),
        "sweep",
        "--study-name",
        "pg",
        "--storage",
        pg_url,
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
        "--experiment",
        "e",
        "--out",
        str(tmp_path / "out"),
        "--schedule",
        "linear,cosine",
        "--timesteps",
        "200",
        "--sampler",
        "ddim",
        "--ddim-steps",
        "5",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--train-samples",
        "64",
        "--channels",
        "8",
        "--warmup-steps",
        "2",
        "--fid-every",
        "0",
        "--fid-samples",
        "8",
        "--fid-ref-samples",
        "16",
        "--fid-batch-size",
        "16",
        "--quiet",
    ]
    procs = [
        subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    password = pg_url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    assert not any(password in o for o in outputs)
    study = optuna.load_study(study_name="pg", storage=pg_url)
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert {t.params["schedule"] for t in trials} == {"linear", "cosine"}
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (parent,) = [r for r in runs if r.data.tags.get("mnist_diff.role") == "study"]
    assert parent.info.status == "FINISHED" and parent.data.tags["mnist_diff.points_done"] == "2/2"
    assert parent.data.params["storage"] == pg_url.replace(f":{password}@", ":***@")
    # both commands saw the study finish; its best model was registered once
    assert any("registered model 'mnist-diff' version 1" in o for o in outputs)
    registry = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (version,) = registry.search_model_versions("name = 'mnist-diff'")
    assert version.tags["mnist_diff.study"] == "pg"
    assert registry.get_model_version_by_alias("mnist-diff", "champion").version == version.version


def _machine_cmd(study, storage, server, machine: Path, *options) -> list:
    """One machine's `sweep`: its own working directory and --out (no shared disk), the shared servers."""
    return [
        sys.executable,
        str(ROOT / "cli.py"),
        "sweep",
        "--study-name",
        study,
        "--storage",
        storage,
        "--tracking-uri",
        server,
        "--experiment",
        study,
        "--out",
        str(machine / "out"),
        "--schedule",
        "cosine",
        "--timesteps",
        "200",
        "--ddim-steps",
        "5",
        "--batch-size",
        "32",
        "--train-samples",
        "64",
        "--channels",
        "8",
        "--warmup-steps",
        "2",
        "--fid-select-samples",
        "4",
        "--fid-samples",
        "8",
        "--fid-ref-samples",
        "16",
        "--fid-batch-size",
        "16",
        "--sheet-images",
        "16",
        "--quiet",
        *options,
    ]


def _start(cmd, machine: Path):
    machine.mkdir()
    env = {
        **os.environ,
        "MNIST_DIFF_FID_CACHE": str(machine / "fid-cache"),
        "MNIST_DIFF_BENCH_CACHE": str(machine / "bench-cache"),
        "OMP_NUM_THREADS": "1",
    }  # two "machines" on one CPU: threads spinning against each other cost 10x
    return subprocess.Popen(cmd, cwd=machine, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _runs(server, experiment):
    client = MlflowClient(server)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("mnist_diff.role") == "study"]
    return client, parent, [r for r in runs if r.data.tags.get("mnist_diff.role") == "trial"]


def _machine_of(run, machines) -> Path:
    (machine,) = [m for m in machines if run.data.tags["mnist_diff.samples_dir"].startswith(str(m))]
    return machine


def test_two_machines_without_a_shared_disk_share_one_study(pg_url, mlflow_server, tmp_path):
    """Two `sweep` commands, each with its own folder, started together against one PostgreSQL storage and one
    tracking server, on one training with two samplers: it is trained once, on one machine, and the other
    machine scores it from the weights it fetched through the server."""
    machines = [tmp_path / "m1", tmp_path / "m2"]
    procs = [_start(_machine_cmd("two", pg_url, mlflow_server, m, "--epochs", "1"), m) for m in machines]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs

    trials = optuna.load_study(study_name="two", storage=pg_url).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert {t.params["sampler"] for t in trials} == {"ddpm", "ddim"}
    client, parent, runs = _runs(mlflow_server, "two")
    assert parent.info.status == "FINISHED" and parent.data.tags["mnist_diff.points_done"] == "2/2"
    assert [r.info.status for r in runs] == ["FINISHED"] * 2
    (trainer,) = [r for r in runs if "steps_per_epoch" in r.data.params]  # trained exactly once
    (scorer,) = [r for r in runs if "trained_in" in r.data.params]  # the other only sampled and scored
    assert {r.data.tags["mnist_diff.trained_by"] for r in runs} == {trainer.info.run_id}
    home, away = _machine_of(trainer, machines), _machine_of(scorer, machines)
    assert home != away, "both grid points ran on one machine: nothing crossed"
    assert scorer.data.params["trained_in"].startswith(str(away))
    key = trainer.data.params["training_key"]
    name = f"trainings/{key}/checkpoints/ema-epoch-001.pt"  # the scorer's copy is the trainer's, byte for byte
    assert (away / "out" / name).read_bytes() == (home / "out" / name).read_bytes()
    assert {a.path for a in client.list_artifacts(trainer.info.run_id, "training")} == {
        "training/ema-epoch-001.pt",
        "training/checkpoint-a.pt",
    }

    report = subprocess.run(
        [
            sys.executable,
            str(ROOT / "cli.py"),
            "report",
            "--study",
            "two",
            "--tracking-uri",
            mlflow_server,
            "--out",
            str(tmp_path / "report"),
        ],
        capture_output=True,
        text=True,
    )
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "report" / "report.md").read_text()
    assert "cosine" in text
    # the best model registered once in the server's registry, and fetched back through it by URI
    versions = [v for v in client.search_model_versions("name = 'mnist-diff'") if v.tags["mnist_diff.study"] == "two"]
    assert len(versions) == 1 and f"`mnist-diff` version {versions[0].version}" in text
    (best,) = [r for r in runs if r.info.run_id == versions[0].run_id]
    sample = subprocess.run(
        [
            sys.executable,
            str(ROOT / "cli.py"),
            "sample",
            "--model",
            f"models:/mnist-diff/{versions[0].version}",
            "--tracking-uri",
            mlflow_server,
            "--num-samples",
            "2",
            "--out",
            str(tmp_path / "samples"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert sample.returncode == 0, sample.stderr
    assert str(np.load(tmp_path / "samples" / "samples.npz")["sampler"]) == best.data.params["sampler"]


def test_a_machine_dies_and_the_other_resumes_from_the_uploaded_checkpoint(pg_url, mlflow_server, tmp_path):
    """kill -9 the machine that trains, mid-training: the other finds its trial stale, retries the grid point
    and resumes the training from the last checkpoint that reached the server, not from scratch."""
    machines = [tmp_path / "m1", tmp_path / "m2"]
    options = ("--sampler", "ddim", "--epochs", "12", "--fid-every", "0", "--heartbeat", "2")
    procs = dict(zip(machines, (_start(_machine_cmd("dies", pg_url, mlflow_server, m, *options), m) for m in machines)))
    deadline, uploaded = time.monotonic() + 300, None
    while uploaded is None:  # the index of the training's files on the server, in the shared storage
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs.values())
        time.sleep(0.2)
        try:
            attrs = optuna.load_study(study_name="dies", storage=pg_url).user_attrs
        except KeyError:  # the study is not made yet
            continue
        entry = next((v for k, v in attrs.items() if k.startswith("training:")), {})
        if entry.get("checkpoint", {}).get("step", 0) >= 4:
            uploaded = entry["checkpoint"]
    client = MlflowClient(mlflow_server)
    victim = _machine_of(client.get_run(uploaded["run_id"]), machines)
    procs[victim].kill()
    procs[victim].wait()
    (survivor,) = [m for m in machines if m != victim]
    output = procs[survivor].communicate(timeout=600)[0]
    assert procs[survivor].returncode == 0, output

    trials = optuna.load_study(study_name="dies", storage=pg_url).get_trials()
    S = optuna.trial.TrialState
    assert [t.state for t in trials] == [S.FAIL, S.COMPLETE]
    _, parent, runs = _runs(mlflow_server, "dies")
    assert parent.info.status == "FINISHED"
    killed = client.get_run(trials[0].user_attrs["mlflow_run_id"])
    resumed = client.get_run(trials[1].user_attrs["mlflow_run_id"])
    assert killed.info.status == "KILLED" and _machine_of(killed, machines) == victim
    assert _machine_of(resumed, machines) == survivor
    # it went on from the victim's last uploaded checkpoint (at least the one seen before the kill)
    assert int(resumed.data.params["resumed_from_step"]) >= uploaded["step"] > 0
    assert trials[1].user_attrs["trained_by_run_id"] == resumed.info.run_id
    assert resumed.data.metrics["epoch_loss"] > 0 and trials[1].value is not None


def test_report_names_a_postgresql_tracking_store_without_its_password(pg_url, tmp_path):
    password = pg_url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    result = CliRunner().invoke(
        cli.cli, ["report", "--study", "s", "--tracking-uri", pg_url, "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2 and "no MLflow run tagged as study 's'" in result.output, result.output
    assert f":{password}@" not in result.output and ":***@" in result.output  # the user may be the password


def test_a_tracking_server_url_with_credentials(mlflow_server, monkeypatch, tmp_path):
    """They go to MLflow as its MLFLOW_TRACKING_USERNAME/PASSWORD: the health check reaches the host, and the
    URL that commands print and record holds no password."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "")  # restored after the test
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "")
    with_credentials = mlflow_server.replace("http://", "http://alice:hunter2@")
    uri = checked_tracking_uri(with_credentials)
    assert uri == mlflow_server and os.environ["MLFLOW_TRACKING_PASSWORD"] == "hunter2"
    tracker = Tracker(with_credentials, "creds")
    tracker.start()
    assert "hunter2" not in tracker.describe()
    tracker.end("FINISHED")
    assert MlflowClient(uri).get_run(tracker.run_id).info.status == "FINISHED"
