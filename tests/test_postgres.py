"""A study shared through a real PostgreSQL server (`.ci/postgres.sh` starts one and exports
MNIST_DIFF_TEST_PG): the study claim, the training lock across processes, two `sweep` commands at once, and
no password in any record. Skipped, saying why, where no server can be reached; under CI they must run."""
import multiprocessing as mp
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from mnist_diff.config import Config
from mnist_diff.locks import exclusive
from mnist_diff.study import Sweep, claim_study

ROOT = Path(__file__).resolve().parents[1]
SERVER = os.environ.get("MNIST_DIFF_TEST_PG")  # postgresql://user:password@host:port, no database


@pytest.fixture
def pg_url():
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
    yield f"{SERVER}/{name}"
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    conn.close()


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
    cmd = [sys.executable, str(ROOT / "cli.py"), "sweep", "--study-name", "pg", "--storage", pg_url,
           "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--experiment", "e", "--out", str(tmp_path / "out"),
           "--schedule", "linear,cosine", "--timesteps", "200", "--sampler", "ddim", "--ddim-steps", "5",
           "--epochs", "1", "--batch-size", "32", "--train-samples", "64", "--channels", "8", "--warmup-steps", "2",
           "--fid-every", "0", "--fid-samples", "8", "--fid-ref-samples", "16", "--fid-batch-size", "16", "--quiet"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
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
