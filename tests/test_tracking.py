"""A tiny real training tracked in a real SQLite MLflow store, checked through MlflowClient."""

import hashlib
import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY
from mlflow.tracking import MlflowClient

import cli
from mnist_diff.config import Config
from mnist_diff.fid.engine import Reference
from mnist_diff.runtime.data import load_mnist
from mnist_diff.tracking.mlflow_store import Tracker, ensure_experiment, find_study_run
from mnist_diff.training.experiment import run_experiment
from mnist_diff.training.trainer import Callback

FID_ARGS = ["--fid-select-samples", "8", "--fid-samples", "10", "--fid-ref-samples", "16", "--fid-batch-size", "10"]


def test_train_is_tracked_end_to_end(tmp_path, data_dir, fid_weights, monkeypatch):
    monkeypatch.setenv("MNIST_DIFF_FID_CACHE", str(tmp_path / "fid-cache"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "train",
        "--timesteps",
        "20",
        "--beta-end",
        "0.2",
        "--channels",
        "8",
        "--batch-size",
        "32",
        "--train-samples",
        "64",
        "--warmup-steps",
        "2",
        "--sampler",
        "ddim",
        "--ddim-steps",
        "5",
        "--epochs",
        "2",
        "--quiet",
        "--tracking-uri",
        uri,
        "--experiment",
        "t",
        "--out",
        str(tmp_path / "run"),
        "--no-clip-x0",
        "--ema-warmup-steps",
        "3",
        *FID_ARGS,
    ]
    if data_dir:
        args += ["--data-dir", data_dir]
    result = CliRunner().invoke(cli.cli, args)
    assert result.exit_code == 0, result.output
    assert f"mlflow ui --backend-store-uri {uri}" in result.output and "#/experiments/" in result.output
    assert "?workflowType=machine_learning" in result.output  # the UI's training view, not its GenAI one

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("t")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["schedule"] == "linear" and p["timesteps"] == "20" and p["sampler"] == "ddim"
    assert p["fid_select_samples"] == "8" and p["channels"] == "8" and p["seed"] == "0"
    assert float(p["alpha_bar_T"]) > 0 and int(p["parameters"]) > 0 and p["torch_version"]
    assert p["clip_x0"] == "False" and p["ema_warmup_steps"] == "3" and p["ema_nominal_step"] == "3"
    # 2 steps per epoch, logged at each epoch's end: the decay of the updates after steps 1 and 3 (0-based)
    ema = client.get_metric_history(run.info.run_id, "ema_decay")
    assert sorted((m.step, m.value) for m in ema) == [(2, pytest.approx(0.999 / 3)), (4, 0.999)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "fid")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch_loss")] == [1, 2]
    assert client.get_metric_history(run.info.run_id, "train_loss")
    m = run.data.metrics
    assert m["best_fid"] > 0 and m["best_epoch"] in (1, 2)
    assert {"sampling_seconds", "fid_seconds", "train_images_per_sec"} <= m.keys()

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"schedule.png", "curves.png", "config.json", "result.json", "checkpoints", "images"} <= artifacts
    assert (tmp_path / "mlruns").is_dir()  # artifacts live beside the SQLite store, not in the working directory
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    # MLflow names the files `samples+step+N+...` (older versions: `samples%step%N%...`)
    steps = sorted({int(re.search(r"step[+%](\d+)[+%]", path)[1]) for path in images if "samples" in path})
    assert steps == [1, 2]
    ckpts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints/best")} | {
        a.path for a in client.list_artifacts(run.info.run_id, "checkpoints/last")
    }
    assert any(c.endswith(".pt") and "ema-epoch" in c for c in ckpts) and any("ckpt-" in c for c in ckpts)

    # system metrics (on by default): at least one sample of the machine, however short the run
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= m.keys()
    assert not any(k.startswith("system/gpu") for k in m) or torch.cuda.is_available()
    # lineage: the 64 training images and the 16 reference images, each with the sha256 of its uint8 bytes
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert inputs.keys() == {"mnist-train-64", "mnist-train-16"}
    for name, limit, context in (("mnist-train-64", 64, "training"), ("mnist-train-16", 16, "fid_reference")):
        sha = hashlib.sha256(load_mnist(data_dir, train=True, limit=limit).numpy().tobytes()).hexdigest()
        assert inputs[name].dataset.digest == sha[:32]
        assert json.loads(inputs[name].dataset.profile) == {"num_images": limit, "sha256": sha}
        assert {t.key: t.value for t in inputs[name].tags}["mlflow.data.context"] == context
    # the experiment opens in MLflow's model-training view, with a description
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "diffusion" in exp.tags["mlflow.note.content"]
    # the selected epoch as an MLflow Model of the run: runs:/RUN/model draws what its EMA checkpoint draws
    (output,) = client.get_run(run.info.run_id).outputs.model_outputs
    assert output.step == m["best_epoch"]
    assert {x.key: x.value for x in client.get_logged_model(output.model_id).metrics}["best_fid"] == m["best_fid"]
    drawn = []
    for name, source in [
        ("by-uri", ["--model", f"runs:/{run.info.run_id}/model", "--tracking-uri", uri]),
        (
            "by-file",
            ["--checkpoint", str(tmp_path / "run" / "checkpoints" / f"ema-epoch-{int(m['best_epoch']):03d}.pt")],
        ),
    ]:
        out = tmp_path / name
        sampled = CliRunner().invoke(cli.cli, ["sample", *source, "--num-samples", "3", "--out", str(out), "--quiet"])
        assert sampled.exit_code == 0, sampled.output
        drawn.append(np.load(out / "samples.npz")["images"])
    np.testing.assert_array_equal(*drawn)


def test_an_experiment_keeps_its_own_description_and_gets_its_kind(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("mine", tags={"mlflow.note.content": "my notes"})
    assert ensure_experiment(client, uri, "mine") == exp_id
    tags = client.get_experiment(exp_id).tags
    assert tags["mlflow.note.content"] == "my notes" and tags["mlflow.experimentKind"] == "custom_model_development"


def test_no_system_metrics_logs_none(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for on in (True, False):
        tracker = Tracker(uri, "t", system_metrics=on)
        with tracker.run():
            tracker.log_metrics({"x": 1.0})
        metrics = tracker.client.get_run(tracker.run_id).data.metrics
        assert any(k.startswith("system/") for k in metrics) == on


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_system_metrics_are_on_unless_turned_off(command):
    parse = lambda *args: cli.cli.commands[command].make_context(command, list(args)).params["system_metrics"]
    assert parse() is True and parse("--no-system-metrics") is False


class Boom(Callback):
    def on_epoch_end(self, end):
        raise RuntimeError("forced failure for the test")


def test_failure_marks_run_failed_with_reason(tmp_path, mnist_small, data_dir, fid_weights):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "t")
    config = Config(**{**TINY, "epochs": 1, "fid_every": 0, "fid_samples": 0})
    with pytest.raises(RuntimeError, match="forced failure"):
        with tracker.run():
            run_experiment(
                config,
                mnist_small[:128],
                tmp_path / "run",
                tracker=tracker,
                progress=False,
                reference=Reference("train", 16, data_dir, fid_weights),
                callbacks=[Boom()],
            )
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error_type"] == "RuntimeError"
    assert run.data.tags["error_message"] == "forced failure for the test"


def test_interrupt_marks_run_killed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "t")
    with pytest.raises(KeyboardInterrupt):
        with tracker.run():
            raise KeyboardInterrupt
    assert MlflowClient(uri).get_run(tracker.run_id).info.status == "KILLED"


def test_unreachable_tracking_store_is_rejected_before_training(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli.cli, ["train", "--tracking-uri", "http://127.0.0.1:9/", "--out", str(out)])
    assert result.exit_code == 2 and "unreachable" in result.output
    assert not out.exists()
    result = CliRunner().invoke(
        cli.cli, ["train", "--tracking-uri", f"sqlite:///{tmp_path}/no/such/dir/m.db", "--out", str(out)]
    )
    assert result.exit_code == 2 and "not writable" in result.output
    assert not out.exists()


def test_evaluate_command_scores_a_samples_file(tmp_path, data_dir, fid_weights, monkeypatch):
    import numpy as np

    from mnist_diff.runtime.data import load_mnist

    monkeypatch.setenv("MNIST_DIFF_FID_CACHE", str(tmp_path / "fid-cache"))
    npz = tmp_path / "samples.npz"
    np.savez(npz, images=load_mnist(data_dir, train=False, limit=12).numpy())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(
        cli.cli,
        ["evaluate", "--images", str(npz), "--fid-ref-samples", "16", "--tracking-uri", uri, "--experiment", "e"],
    )
    assert result.exit_code == 0, result.output
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("e").experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics["fid"] > 0
    bad = CliRunner().invoke(cli.cli, ["evaluate", "--no-tracking"])
    assert bad.exit_code == 2 and "exactly one of" in bad.output


def test_failed_artifact_uploads_are_recorded_and_training_goes_on(tmp_path, mnist_small, data_dir, fid_weights):
    """A real failure: the experiment's artifact store is a path under a regular file."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    MlflowClient(uri).create_experiment("broken", artifact_location=(blocker / "artifacts").as_uri())
    tracker = Tracker(uri, "broken")
    config = Config(**{**TINY, "epochs": 2, "fid_every": 0, "fid_samples": 0})
    with tracker.run():
        result = run_experiment(
            config,
            mnist_small[:128],
            tmp_path / "run",
            tracker=tracker,
            progress=False,
            reference=Reference("train", 16, data_dir, fid_weights),
        )
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and result.epochs_done == 2
    assert int(run.data.tags["artifact_upload_errors"]) >= 3
    assert (
        "samples step" in run.data.tags["artifact_upload_last_error"]
        or "pt" in run.data.tags["artifact_upload_last_error"]
    )
    assert [m.step for m in MlflowClient(uri).get_metric_history(tracker.run_id, "epoch_loss")] == [1, 2]
    assert (tmp_path / "run" / "checkpoints" / "ema-epoch-002.pt").exists()  # the local copies are kept


def test_a_run_made_by_mlflow_run_keeps_its_params_and_gets_the_resolved_ones(tmp_path, monkeypatch):
    """`mlflow run` logs its -P values as typed before our command starts; MLflow never changes a param."""
    from mlflow.entities import Param

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    client.log_batch(run_id, params=[Param("epochs", "''"), Param("lr", "2e-4"), Param("seed", "0")], synchronous=True)
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    tracker = Tracker(uri, "e")
    assert tracker.start() == run_id
    tracker.log_params({"epochs": 2, "lr": 2e-4, "seed": 0, "channels": 8})
    assert client.get_run(run_id).data.params == {
        "epochs": "''",
        "epochs.resolved": "2",
        "lr": "2e-4",
        "lr.resolved": "0.0002",
        "seed": "0",
        "channels": "8",
    }


def test_a_study_is_found_whatever_its_name_holds(tmp_path):
    """MLflow's filter strings have no escapes: quotes, backslashes and spaces in a name, and names that a LIKE
    pattern would confuse with it (x_ for x\\)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    names = ["it's", 'say "hi"', "x\\", "x_", "x\\\\", "both ' and \" \\", "a b", "a\\'b"]
    for name in names:
        Tracker(uri, "e", tags={"mnist_diff.role": "study", "mnist_diff.study": name}).start()
    client = MlflowClient(uri)
    for name in names:
        assert find_study_run(client, uri, "e", name).data.tags["mnist_diff.study"] == name
    assert find_study_run(client, uri, "e", "x") is None
