"""Sweeps survive kill -9, SIGTERM and bad values: real processes, real signals, real SQLite stores."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
STATE = optuna.trial.TrialState


def sweep_cmd(tmp_path, *extra):
    return [sys.executable, str(ROOT / "cli.py"), "sweep", "--study-name", "r",
            "--storage", f"sqlite:///{tmp_path}/optuna.db", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
            "--experiment", "e", "--out", str(tmp_path / "out"), "--schedule", "linear", "--timesteps", "200",
            "--sampler", "ddpm", "--epochs", "3", "--batch-size", "32", "--train-samples", "640", "--channels", "8",
            "--warmup-steps", "2", "--fid-every", "0", "--fid-samples", "8", "--fid-ref-samples", "16",
            "--fid-batch-size", "16", "--heartbeat", "1", "--quiet", *extra]


def start_and_wait_for_epoch(tmp_path, timeout=240):
    """Start a sweep and return once its first full training checkpoint (end of epoch 1) is on disk."""
    env = {**os.environ, "MNIST_DIFF_FID_CACHE": str(tmp_path / "fid-cache")}
    proc = subprocess.Popen(sweep_cmd(tmp_path), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while not list((tmp_path / "out" / "trainings").glob("*/checkpoints/ckpt-*.pt")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no epoch checkpoint in time"
        time.sleep(0.2)
    time.sleep(0.5)  # into the next epoch
    return proc, env


def finish(tmp_path, env):
    proc = subprocess.run(sweep_cmd(tmp_path), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    study = optuna.load_study(study_name="r", storage=f"sqlite:///{tmp_path}/optuna.db")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    return study, client


def check_recovered(study, client, killed_status):
    trials = study.get_trials()
    complete = [t for t in trials if t.state == STATE.COMPLETE]
    assert len(complete) == 1 and len([t for t in trials if t.state == STATE.FAIL]) == 1
    first, retry = sorted(trials, key=lambda t: t.number)
    assert first.state == STATE.FAIL and retry.state == STATE.COMPLETE and first.params == retry.params
    old_run = client.get_run(first.user_attrs["mlflow_run_id"])
    new_run = client.get_run(retry.user_attrs["mlflow_run_id"])
    assert old_run.info.status in killed_status
    assert new_run.info.status == "FINISHED"
    assert new_run.data.tags["mnist_diff.retry_of_trial"] == str(first.number)  # the new run links to the old
    assert int(new_run.data.params["resumed_from_step"]) > 0  # resumed from a checkpoint, not from scratch
    steps = [m.step for m in client.get_metric_history(new_run.info.run_id, "epoch_loss")]
    assert len(steps) == len(set(steps))  # no step logged twice
    result = json.loads((Path(retry.user_attrs["samples_dir"]).parent / "result.json").read_text())
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]


def test_kill_9_mid_trial_then_rerun_resumes(tmp_path):
    proc, env = start_and_wait_for_epoch(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(2.5)  # > 2 heartbeats: the trial is now stale
    study, client = finish(tmp_path, env)
    check_recovered(study, client, {"KILLED", "FAILED"})


def test_sigterm_saves_marks_killed_and_rerun_resumes(tmp_path):
    proc, env = start_and_wait_for_epoch(tmp_path)
    step_at_signal = max(int(p.stem.split("-")[1]) for p in (tmp_path / "out").glob("trainings/*/checkpoints/ckpt-*.pt"))
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    study = optuna.load_study(study_name="r", storage=f"sqlite:///{tmp_path}/optuna.db")
    (trial,) = study.get_trials()
    assert trial.state == STATE.FAIL and trial.user_attrs.get("interrupted") is True
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_run(trial.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    saved = max(int(p.stem.split("-")[1]) for p in (tmp_path / "out").glob("trainings/*/checkpoints/ckpt-*.pt"))
    assert saved > step_at_signal  # the steps made before the signal was handled were saved
    study, client = finish(tmp_path, env)
    check_recovered(study, client, {"KILLED"})


def test_non_finite_loss_fails_one_trial_and_the_others_go_on(tmp_path):
    env = {**os.environ, "MNIST_DIFF_FID_CACHE": str(tmp_path / "fid-cache")}
    cmd = sweep_cmd(tmp_path, "--sampler", "ddim", "--lr", "1e6", "--max-steps", "40")
    cmd[cmd.index("--epochs") + 1] = "2"
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    study = optuna.load_study(study_name="r", storage=f"sqlite:///{tmp_path}/optuna.db")
    trials = study.get_trials()
    failed = [t for t in trials if t.state == STATE.FAIL]
    if not failed:
        pytest.fail("lr 1e6 did not diverge: " + proc.stdout[-2000:])
    for t in failed:
        assert t.user_attrs["error"].startswith("NonFiniteLoss: non-finite training loss")
        run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED" and run.data.tags["error_type"] == "NonFiniteLoss"
    assert len(trials) == 2  # the other grid point still ran


def test_parallel_workers_and_separate_commands_share_the_grid(tmp_path):
    """Two `sweep` commands with --workers 2 each: 4 processes on one SQLite storage, 4 grid points, 2 trainings."""
    env = {**os.environ, "MNIST_DIFF_FID_CACHE": str(tmp_path / "fid-cache")}
    cmd = sweep_cmd(tmp_path, "--workers", "2")
    for flag, value in (("--schedule", "linear"), ("--sampler", "ddpm")):
        del cmd[cmd.index(flag):cmd.index(flag) + 2]
    cmd += ["--schedule", "linear", "--schedule", "cosine"]
    cmd[cmd.index("--epochs") + 1] = "1"
    cmd[cmd.index("--train-samples") + 1] = "64"
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(3)  # so the first command has made the study's parent run
    second = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outputs = [p.communicate(timeout=600)[0] for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    assert not any("database is locked" in o for o in outputs)
    log = (tmp_path / "out" / "training.log").read_text()
    assert "database is locked" not in log
    assert len({line.split("[pid ")[1].split("]")[0] for line in log.splitlines() if "[pid " in line}) >= 4

    study = optuna.load_study(study_name="r", storage=f"sqlite:///{tmp_path}/optuna.db")
    trials = study.get_trials()
    assert [t.state for t in trials] == [STATE.COMPLETE] * 4  # each grid point once, nothing duplicated
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4
    for schedule in ("linear", "cosine"):  # one training per training config: never trained twice at once
        pair = [t for t in trials if t.params["schedule"] == schedule]
        assert len({t.user_attrs["trained_by_run_id"] for t in pair}) == 1
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len([r for r in runs if r.data.tags.get("mnist_diff.role") == "study"]) == 1
    assert sorted(r.info.status for r in runs if r.data.tags.get("mnist_diff.role") == "trial") == ["FINISHED"] * 4
