"""MLproject: every entry point renders, through MLflow's own code, to a command cli.py accepts with the CLI's
defaults; and `mlflow run` itself runs the study and a training with only the parameters a user cares about."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.projects._project_spec import load_project
from mlflow.tracking import MlflowClient

import cli
from mnist_diff.choices import SAMPLERS, SCHEDULES
from mnist_diff.cli.params import selected

ROOT = Path(__file__).resolve().parents[1]
ENTRY_COMMANDS = {"main": "sweep", "train": "train", "sample": "sample", "evaluate": "evaluate"}


def parse(command: str, args: list) -> dict:
    """The values cli.py gets for `args`; a None from an empty value is the option's default ("not given")."""
    cmd = cli.cli.commands[command]
    params = cmd.make_context(command, list(args)).params
    defaults = {p.name: p.default for p in cmd.params}
    return {k: defaults[k] if v is None else v for k, v in params.items()}


def rendered(entry_point: str, parameters: dict) -> list:
    """The command `mlflow run -e ENTRY_POINT` runs, as argv, rendered by MLflow's project code."""
    command = load_project(ROOT).get_entry_point(entry_point).compute_command(parameters, storage_dir=None)
    argv = shlex.split(command)
    assert argv[:2] == ["python", "cli.py"] and argv[2] == ENTRY_COMMANDS[entry_point], argv
    return argv[3:]


@pytest.mark.parametrize("entry_point", sorted(ENTRY_COMMANDS))
def test_entry_point_defaults_are_the_cli_defaults(entry_point, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"")
    needed = {"checkpoint": str(ckpt)} if entry_point in ("sample", "evaluate") else {}
    command = ENTRY_COMMANDS[entry_point]
    via_mlflow = parse(command, rendered(entry_point, needed))
    bare = parse(command, [a for k, v in needed.items() for a in (f"--{k}", v)])
    via_mlflow.pop("quiet"), bare.pop("quiet")
    assert via_mlflow == bare


def test_empty_parameters_mean_not_given(tmp_path):
    """What MLflow passes for the grid filters and preset-dependent sizes left out: the whole grid, the
    preset's sizes (the empty string reaches cli.py as an empty argument)."""
    argv = rendered("main", {"preset": "smoke", "sampler": "ddim", "schedule": "linear,cosine"})
    assert argv[argv.index("--epochs") + 1] == "" and argv[argv.index("--fid-samples") + 1] == ""
    ctx = cli.cli.commands["sweep"].make_context("sweep", argv)
    assert ctx.params["epochs"] is None and ctx.params["fid_ref_samples"] is None
    assert selected(ctx.params["samplers"], SAMPLERS) == ("ddim",)
    assert selected(ctx.params["schedules"], SCHEDULES) == ("linear", "cosine")
    assert selected(ctx.params["timesteps_list"], ("200", "1000")) == ("200", "1000")


@pytest.mark.parametrize(
    "args,expected",
    [
        ([], ("linear", "cosine", "quadratic", "sigmoid")),
        (["--schedule", "all"], ("linear", "cosine", "quadratic", "sigmoid")),
        (["--schedule", "sigmoid,linear"], ("linear", "sigmoid")),
        (["--schedule", "cosine", "--schedule", "linear,cosine"], ("linear", "cosine")),
    ],
)
def test_grid_filters_take_comma_lists_and_repeats(args, expected):
    ctx = cli.cli.commands["sweep"].make_context("sweep", args)
    assert selected(ctx.params["schedules"], SCHEDULES) == expected


# -- `mlflow run` for real ---------------------------------------------------------------------------------


def project_files() -> dict:
    return {
        p.relative_to(ROOT): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in ROOT.rglob("*")
        if p.is_file() and ".git" not in p.parts and "__pycache__" not in p.parts
    }


def mlflow_run(tmp_path, *args) -> None:
    """`mlflow run ROOT ARGS` from tmp_path, every store in tmp_path; fails the test if the project folder
    changes (`mlflow run` runs the command in the project folder)."""
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "MNIST_DIFF_FID_CACHE": str(tmp_path / "fid-cache"),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        # one thread: on a shared CPU, OpenMP threads spinning against other processes make it 10x slower
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    before = project_files()
    t0 = time.perf_counter()
    # its own session, so a test that times out takes `mlflow run` and the command it started down with it
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "run",
            str(ROOT),
            "--env-manager",
            "local",
            "--experiment-name",
            "mnist-diff",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    print(f"mlflow run {' '.join(args)}: {time.perf_counter() - t0:.0f} s")
    assert proc.returncode == 0, output[-4000:]
    assert project_files() == before


@pytest.mark.timeout(1800)
def test_mlflow_run_main_smoke_runs_every_grid_point(tmp_path):
    # -P preset=smoke and nothing that changes the grid: all 16 points. Sizes only to keep it short; the
    # training size is left out on purpose (the empty value becomes the smoke preset's).
    mlflow_run(
        tmp_path,
        "-P",
        "preset=smoke",
        "-P",
        f"storage=sqlite:///{tmp_path}/optuna.db",
        "-P",
        f"out={tmp_path}/out",
        "-P",
        "epochs=1",
        "-P",
        "fid-select-samples=2",
        "-P",
        "fid-samples=2",
        "-P",
        "fid-ref-samples=2",
        "-P",
        "sheet-images=4",
        "-P",
        "workers=2",
    )  # a worker per core
    study = optuna.load_study(study_name="mnist-diff-study", storage=f"sqlite:///{tmp_path}/optuna.db")
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 16
    assert len({(t.params["schedule"], t.params["timesteps_beta_end"], t.params["sampler"]) for t in trials}) == 16
    doc = json.loads((tmp_path / "out" / "grid_search_results.json").read_text())
    assert doc["complete"] == doc["grid_size"] == 16

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("mnist-diff")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (parent,) = [r for r in runs if r.data.tags.get("mnist_diff.role") == "study"]
    children = [r for r in runs if r.data.tags.get("mnist_diff.role") == "trial"]
    assert len(runs) == 17 and len(children) == 16 and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.info.experiment_id for r in runs} == {exp.experiment_id}
    assert parent.data.tags["mlflow.project.entryPoint"] == "main"  # the run `mlflow run` made is the parent
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    p = parent.data.params
    assert p["train-samples"] == "''" and p["train_samples"] == "256" and p["epochs"] == "1"
    assert p["sheet_images"] == "4"


def test_mlflow_run_main_with_a_grid(tmp_path):
    mlflow_run(
        tmp_path,
        "-P",
        "preset=smoke",
        "-P",
        "schedule=cosine",
        "-P",
        "timesteps=200",
        "-P",
        "sampler=ddim",
        "-P",
        "grid=ddim_steps=2,5",
        "-P",
        f"storage=sqlite:///{tmp_path}/optuna.db",
        "-P",
        f"out={tmp_path}/out",
        "-P",
        "epochs=1",
        "-P",
        "fid-select-samples=2",
        "-P",
        "fid-samples=2",
        "-P",
        "fid-ref-samples=2",
    )
    study = optuna.load_study(study_name="mnist-diff-study", storage=f"sqlite:///{tmp_path}/optuna.db")
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert sorted(t.params["ddim_steps"] for t in trials) == [2, 5]
    assert len([p for p in (tmp_path / "out" / "trainings").iterdir() if p.is_dir()]) == 1  # a sampling field
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (parent,) = [r for r in runs if r.data.tags.get("mnist_diff.role") == "study"]
    assert parent.data.params["grid"] == "ddim_steps=2,5"  # as typed; the whole grid as resolved:
    assert parent.data.params["grid.resolved"] == (
        "schedule=cosine; timesteps:beta_end=200:0.08; sampler=ddim; ddim_steps=2,5; seed=0"
    )


def test_mlflow_run_train_with_a_few_parameters(tmp_path):
    mlflow_run(
        tmp_path,
        "-e",
        "train",
        "-P",
        f"out={tmp_path}/run",
        "-P",
        "timesteps=20",
        "-P",
        "ddim-steps=20",
        "-P",
        "channels=8",
        "-P",
        "train-samples=128",
        "-P",
        "epochs=1",
        "-P",
        "fid-every=0",
        "-P",
        "fid-samples=0",
    )
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "ckpt-00000001.pt").is_file() and (ckpts / "ema-epoch-001.pt").is_file()  # 1 step of 128
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.project.entryPoint"] == "train"
    p = run.data.params
    assert p["timesteps"] == "20" and p["channels"] == "8" and p["train_samples"] == "128" and p["sampler"] == "ddpm"
    assert p["fid-ref-samples"] == "''" and p["fid_ref_samples"] == "None"
    assert client.get_metric_history(run.info.run_id, "epoch_loss")
