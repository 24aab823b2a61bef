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
from click.testing import CliRunner
from conftest import tiny_args
from mlflow.tracking import MlflowClient

import cli

ROOT = Path(__file__).resolve().parents[1]
STATE = optuna.trial.TrialState


def sweep_cmd(tmp_path, *extra):
    return [
        sys.executable,
        str(ROOT / "cli.py"),
        "sweep",
        "--study-name",
        "r",
        "--storage",
        f"sqlite:///{tmp_path}/optuna.db",
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
        "--experiment",
        "e",
        "--out",
        str(tmp_path / "out"),
        "--schedule",
        "linear",
        "--timesteps",
        "200",
        "--sampler",
        "ddim",
        *tiny_args(
            "batch_size",
            "channels",
            "warmup_steps",
            "ddim_steps",
            epochs=3,
            train_samples=640,
            fid_every=0,
            fid_samples=8,
            fid_ref_samples=16,
            fid_batch_size=16,
        ),
        "--heartbeat",
        "1",
        "--quiet",
        *extra,
    ]


def start_and_wait_for_epoch(tmp_path, cmd=None, trainings=1, timeout=240):
    """Start a sweep and return once `trainings` trainings have a full checkpoint (end of epoch 1) on disk."""
    env = {**os.environ, "MNIST_DIFF_FID_CACHE": str(tmp_path / "fid-cache")}
    proc = subprocess.Popen(
        cmd or sweep_cmd(tmp_path), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + timeout
    while len({p.parts[-3] for p in (tmp_path / "out" / "trainings").glob("*/checkpoints/ckpt-*.pt")}) < trainings:
        assert proc.poll() is None, proc.stdout.read()
        if time.time() > deadline:
            proc.kill()  # leave no sweep running behind a failed test
            pytest.fail("no epoch checkpoint in time")
        time.sleep(0.2)
    time.sleep(0.5)  # into the next epoch
    return proc, env


def study_parent(client):
    (parent,) = [
        r
        for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
        if r.data.tags.get("mnist_diff.role") == "study"
    ]
    return parent


def finish(tmp_path, env, cmd=None):
    proc = subprocess.run(
        cmd or sweep_cmd(tmp_path), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
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
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == []  # no run of the study left RUNNING
    parent = study_parent(client)
    assert parent.info.status == "FINISHED" and parent.data.tags["mnist_diff.points_done"] == "1/1"


def test_kill_9_mid_trial_then_rerun_at_once_resumes(tmp_path):
    """Rerun at once: the killed trial is not stale yet when the rerun starts (heartbeat 10 s, stale after 20 s),
    so the rerun waits for it, and when Optuna fails it as stale mid-sweep its run becomes KILLED and it is retried."""
    cmd = sweep_cmd(tmp_path)
    cmd[cmd.index("--heartbeat") + 1] = "10"
    proc, env = start_and_wait_for_epoch(tmp_path, cmd)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    study, client = finish(tmp_path, env, cmd)
    check_recovered(study, client, {"KILLED"})
    first = min(study.get_trials(), key=lambda t: t.number)
    tags = client.get_run(first.user_attrs["mlflow_run_id"]).data.tags
    assert tags["error_type"] == "WorkerLost" and tags["mnist_diff.retry"] == "retry 1 of 2 queued"


def test_sigterm_saves_marks_killed_and_rerun_resumes(tmp_path):
    proc, env = start_and_wait_for_epoch(tmp_path)
    step_at_signal = max(
        int(p.stem.split("-")[1]) for p in (tmp_path / "out").glob("trainings/*/checkpoints/ckpt-*.pt")
    )
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
    cmd = sweep_cmd(tmp_path, "--sampler", "ddpm", "--lr", "1e6", "--max-steps", "40")
    cmd[cmd.index("--epochs") + 1] = "2"
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    study = optuna.load_study(study_name="r", storage=f"sqlite:///{tmp_path}/optuna.db")
    trials = study.get_trials()
    failed = [t for t in trials if t.state == STATE.FAIL]
    if not failed:
        pytest.fail("lr 1e6 did not diverge: " + proc.stdout[-2000:])
    for t in failed:
        assert t.user_attrs["error"].startswith("NonFiniteLoss: non-finite training loss")
        assert t.user_attrs["retryable"] is False
        run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED" and run.data.tags["error_type"] == "NonFiniteLoss"
        assert run.data.tags["mnist_diff.retry"] == "not retried: a NonFiniteLoss would happen again"
    assert len(trials) == 2  # not retried, and the other grid point still ran


def tiny_sweep_args(tmp_path, *extra):
    return [
        "sweep",
        "--study-name",
        "t",
        "--storage",
        f"sqlite:///{tmp_path}/optuna.db",
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
        "--experiment",
        "e",
        "--out",
        str(tmp_path / "out"),
        "--schedule",
        "linear",
        "--timesteps",
        "200",
        *tiny_args(
            "batch_size",
            "channels",
            "warmup_steps",
            "ddim_steps",
            epochs=1,
            train_samples=64,
            fid_every=0,
            fid_samples=8,
            fid_ref_samples=16,
            fid_batch_size=16,
        ),
        "--quiet",
        *extra,
    ]


def test_transient_failure_is_retried_up_to_max_retries_and_retry_failed_requeues(tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_DIFF_FID_CACHE", str(tmp_path / "fid-cache"))
    # Trial 0 trains; trial 1, the other sampler, samples that training into OUT/trials/0001/. A file in the
    # way makes it fail with a real OSError (NotADirectoryError), as a broken disk would; a retry is a new trial
    # writing into OUT/trials/<its number>/, so each of these files fails one attempt.
    trials_dir = tmp_path / "out" / "trials"
    trials_dir.mkdir(parents=True)
    for n in (1, 2, 3):
        (trials_dir / f"{n:04d}").write_text("in the way")
    storage, client = f"sqlite:///{tmp_path}/optuna.db", MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")

    def sweep(*extra, code=0):  # a sweep that leaves a point FAIL exits 1
        result = CliRunner().invoke(cli.cli, tiny_sweep_args(tmp_path, "--max-retries", "1", *extra))
        assert result.exit_code == code, result.output
        study = optuna.load_study(study_name="t", storage=storage)
        return result.output, {t.number: t for t in study.get_trials()}

    def run(trial):
        return client.get_run(trial.user_attrs["mlflow_run_id"])

    output, t = sweep(code=1)  # trial 1 fails, its one retry (trial 2) too: the point is FAIL
    assert "1/2 grid points complete" in output and ", seed=0) failed: NotADirectoryError" in output
    assert [t[n].state for n in sorted(t)] == [STATE.COMPLETE, STATE.FAIL, STATE.FAIL]
    assert t[1].params == t[2].params and t[2].user_attrs["retry_of_trial"] == 1
    assert t[1].user_attrs["error"].startswith("NotADirectoryError") and t[1].user_attrs["retryable"] is True
    assert t[2].user_attrs["retries"] == 1 and len(t[2].user_attrs["errors"]) == 2
    assert run(t[1]).data.tags["mnist_diff.retry"] == "retry 1 of 1 queued"
    tags = run(t[2]).data.tags
    assert run(t[2]).info.status == "FAILED" and tags["mnist_diff.retries"] == "1"
    assert len(json.loads(tags["mnist_diff.errors"])) == 2
    assert tags["mnist_diff.retry"] == "not retried: --max-retries 1 used up"
    parent = study_parent(client)  # not FINISHED while a grid point is open
    assert parent.info.status == "FAILED" and parent.data.tags["mnist_diff.points_done"] == "1/2"
    assert parent.data.tags["error_message"].startswith("1 grid point(s) failed")

    _, t = sweep(code=1)  # its retries are used up: a plain rerun leaves it FAIL
    assert len(t) == 3

    output, t = sweep("--retry-failed")  # a fresh budget: trial 3 fails on the last file, its retry completes
    assert "2/2 grid points complete" in output
    assert [t[n].state for n in (3, 4)] == [STATE.FAIL, STATE.COMPLETE]
    assert t[3].user_attrs["retry_of_trial"] == 2 and t[3].user_attrs["retries"] == 0
    assert t[4].user_attrs["retries"] == 1 and len(t[4].user_attrs["errors"]) == 3  # every error of the point
    assert run(t[4]).info.status == "FINISHED" and run(t[4]).data.tags["mnist_diff.retries"] == "1"
    assert len(json.loads(run(t[4]).data.tags["mnist_diff.errors"])) == 3
    parent = study_parent(client)
    assert parent.info.status == "FINISHED" and parent.data.tags["mnist_diff.points_done"] == "2/2"
    assert "error_message" not in parent.data.tags


def test_sigterm_to_a_parallel_sweep_stops_every_worker(tmp_path):
    cmd = sweep_cmd(tmp_path, "--workers", "2", "--schedule", "cosine")  # 2 grid points, 2 trainings
    cmd[cmd.index("--epochs") + 1] = "50"  # both still training when the signal comes
    proc, env = start_and_wait_for_epoch(tmp_path, cmd, trainings=2)
    log = (tmp_path / "out" / "training.log").read_text()
    workers = {int(line.split("[pid ")[1].split("]")[0]) for line in log.splitlines() if "[pid " in line}
    try:
        assert len(workers) == 2
        proc.send_signal(signal.SIGTERM)  # to the parent only: it passes the signal on
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode != 0
        assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], out
    finally:
        for pid in workers:
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
    study = optuna.load_study(study_name="r", storage=f"sqlite:///{tmp_path}/optuna.db")
    trials = study.get_trials()
    assert len(trials) == 2 and all(t.state == STATE.FAIL and t.user_attrs["interrupted"] for t in trials)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert [client.get_run(t.user_attrs["mlflow_run_id"]).info.status for t in trials] == ["KILLED"] * 2
    parent = study_parent(client)
    assert parent.info.status == "KILLED" and parent.data.tags["mnist_diff.points_done"] == "0/2"


def test_a_worker_that_exits_with_an_error_fails_the_command(tmp_path):
    """Workers log to OUT/training.log; a folder in its place makes each worker exit with code 1 at once."""
    env = {**os.environ, "MNIST_DIFF_FID_CACHE": str(tmp_path / "fid-cache")}
    (tmp_path / "out" / "training.log").mkdir(parents=True)
    proc = subprocess.run(
        sweep_cmd(tmp_path, "--workers", "2"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Error: worker 0 exited with code 1; worker 1 exited with code 1" in proc.stderr
    assert "0/1 grid points complete" in proc.stdout  # the results were written first
    assert json.loads((tmp_path / "out" / "grid_search_results.json").read_text())["complete"] == 0
    parent = study_parent(MlflowClient(f"sqlite:///{tmp_path}/mlflow.db"))
    assert parent.info.status == "FAILED" and parent.data.tags["mnist_diff.worker_exit_codes"] == "[1, 1]"


def test_parallel_workers_and_separate_commands_share_the_grid(tmp_path):
    """Two `sweep` commands started together, --workers 2 each: 4 processes on one SQLite storage, 4 grid points,
    2 trainings, one parent run."""
    env = {**os.environ, "MNIST_DIFF_FID_CACHE": str(tmp_path / "fid-cache")}
    cmd = sweep_cmd(tmp_path, "--workers", "2")
    for flag, _value in (("--schedule", "linear"), ("--sampler", "ddim")):
        del cmd[cmd.index(flag) : cmd.index(flag) + 2]
    cmd += ["--schedule", "linear", "--schedule", "cosine"]
    cmd[cmd.index("--epochs") + 1] = "1"
    cmd[cmd.index("--train-samples") + 1] = "64"
    # started in the same instant: one of them sets the study up (its queue, its one parent run)
    loud = [c for c in cmd if c != "--quiet"]  # the first shows its bars: the study's only, not its workers'
    first, second = (
        subprocess.Popen(c, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c in (loud, cmd)
    )
    outputs = [p.communicate(timeout=600)[0] for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    assert "study r: 100%" in outputs[0] and "4/4" in outputs[0] and "point" in outputs[0], outputs[0]
    assert "img-step" not in outputs[0] and "train:" not in outputs[0]
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
