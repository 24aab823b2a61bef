"""A study run in pieces: `sweep --stop-after` ends a piece cleanly before its deadline and the same command goes on;
`report --results A --results B` merges pieces (grid filters run in their own folders and stores) into one study,
the same as one uninterrupted run; pieces of different protocols are refused."""

import json
import os
import shutil
import time

import optuna
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from test_report import record
from test_study import TINY

import cli
from mnist_diff.report.analysis import load_records_from_json

# TINY's sweep, cheapest: DDIM only (no T-step DDPM sampling), 1 epoch, a 4-image sample sheet; 2 seeds, so
# that each schedule's piece holds 2 points, each its own training
CHEAP = [*TINY, "--sampler", "ddim", "--timesteps", "200", "--epochs", "1", "--sheet-images", "4", "--seeds", "2"]


def piece_args(folder, *extra):
    """A sweep whose stores and outputs all lie in `folder`: a piece that travels as one folder."""
    return [
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
        *CHEAP,
        *extra,
    ]


@pytest.fixture(scope="module")
def fid_cache(tmp_path_factory):
    """One FID cache for this module's sweeps: the reference statistics are computed once."""
    before = os.environ.get("MNIST_DIFF_FID_CACHE")
    os.environ["MNIST_DIFF_FID_CACHE"] = str(tmp_path_factory.mktemp("fid-cache"))
    yield
    if before is None:
        del os.environ["MNIST_DIFF_FID_CACHE"]
    else:
        os.environ["MNIST_DIFF_FID_CACHE"] = before


def invoke(args):
    result = CliRunner().invoke(cli.cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def trial_spans(folder):
    """(seconds of each COMPLETE trial, the earliest trial's start), from the piece's Optuna study."""
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{folder}/optuna.db")
    trials = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    spans = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials]
    return spans, min(t.datetime_start.timestamp() for t in trials)


def parent(folder):
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("e").experiment_id])
    return next(r for r in runs if r.data.tags.get("mnist_diff.role") == "study")


def comparable(report_json):
    """What a report concludes, less what depends on where and when it ran (run ids, seconds, folders)."""
    a = json.loads(report_json.read_text())
    drop = ("run_ids", "train_seconds_mean", "final_sampling_seconds_mean", "trial_seconds_mean")
    return {
        "configs": [{k: v for k, v in row.items() if k not in drop} for row in a["configs"]],
        "means": a["means"],
        "claims": a["claims"],
        "points": (a["points_expected"], a["points_complete"], a["partial"]),
        "missing": a["montage_missing"],
    }


def test_a_study_in_pieces_one_stopped_by_the_deadline_reports_as_one_run(tmp_path, fid_cache):
    whole, linear, cosine = tmp_path / "whole", tmp_path / "linear", tmp_path / "cosine"
    for folder in (whole, linear, cosine):
        folder.mkdir()
    invoke(piece_args(linear, "--schedule", "linear"))  # first: it measures the bench rates if none are cached
    began = time.time()
    invoke(piece_args(whole, "--schedule", "linear,cosine"))
    spans, first_start = trial_spans(whole)
    projection = json.loads((whole / "grid_search_results.json").read_text())["projection"]
    projected = max(sum(s) for s in projection["trial_seconds"])

    # A deadline the first trial fits by half a trial, and after which the second does not: the command's setup
    # (as the whole run's), the projected trial, half an actual one.
    stop_after = (first_start - began) + projected + min(spans) / 2
    stopped_args = piece_args(cosine, "--schedule", "cosine", "--stop-after", f"{stop_after:.1f}s")
    first = invoke(stopped_args)
    said = "stopped before the deadline with 1/2 grid points complete; the same command goes on"
    assert "study s: 1/2 grid points complete" in first.output and said in first.output, first.output
    doc = json.loads((cosine / "grid_search_results.json").read_text())
    assert doc["complete"] == 1 and doc["stopped"].startswith(said)
    run = parent(cosine)
    assert run.info.status == "KILLED" and run.data.tags["error_type"] == "StoppedBeforeDeadline"
    assert run.data.tags["error_message"].startswith(said) and run.data.tags["mnist_diff.points_done"] == "1/2"
    again = invoke(stopped_args)  # the same command goes on
    assert "study s: 2/2 grid points complete" in again.output and "stopped" not in again.output
    doc = json.loads((cosine / "grid_search_results.json").read_text())
    assert doc["complete"] == 2 and doc["stopped"] is None and parent(cosine).info.status == "FINISHED"
    assert len(doc["results"]) == 2  # each point ran once: the stop started nothing it did not finish

    # a piece travels: its records hold paths relative to its folder, read where the folder was copied
    assert all(r["samples_dir"] == f"trials/{r['trial']:04d}/samples" for r in doc["results"])
    moved = tmp_path / "elsewhere" / "linear"
    shutil.copytree(linear, moved, ignore=shutil.ignore_patterns("*.db", "trainings"))
    shutil.rmtree(linear)
    for name in ("grid_search_results.json", "training.log"):  # small enough to commit
        assert (moved / name).stat().st_size < 16_000, name

    invoke(["report", "--results", whole / "grid_search_results.json", "--out", tmp_path / "r-whole", "--no-tracking"])
    merged = invoke(
        ["report", "--results", moved, "--results", cosine / "grid_search_results.json", "--out", tmp_path / "r-pieces"]
    )
    assert "note:" not in merged.output  # no point in two pieces
    one, pieces = comparable(tmp_path / "r-whole" / "report.json"), comparable(tmp_path / "r-pieces" / "report.json")
    assert pieces == one
    assert one["points"] == (4, 4, False) and one["missing"] == [] and len(one["configs"]) == 2
    md = (tmp_path / "r-pieces" / "report.md").read_text()
    assert "Merged from 2 pieces" in md


def write_piece(path, records, fixed=None, grid=None, name="s"):
    grid = grid or {"schedule": ["linear"], "timesteps_beta_end": [[200, 0.08]], "sampler": ["ddim"], "seed": [0]}
    doc = {
        "study_name": name,
        "grid": grid,
        "fixed": fixed or {"epochs": 4, "batch_size": 128},
        "complete": sum(r["state"] == "COMPLETE" for r in records),
        "grid_size": 1,
        "results": records,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def report(tmp_path, *paths):
    args = ["report", "--out", str(tmp_path / "report")]
    for p in paths:
        args += ["--results", str(p)]
    return CliRunner().invoke(cli.cli, args)


def test_pieces_of_another_protocol_are_refused_naming_the_field(tmp_path):
    a = write_piece(tmp_path / "a" / "grid_search_results.json", [record(0, "linear", 200, "ddim", 20)])
    b = write_piece(tmp_path / "b.json", [record(0, "cosine", 200, "ddim", 10)], fixed={"epochs": 2, "batch_size": 128})
    result = report(tmp_path, a, b)
    assert result.exit_code == 2 and "its protocol differs in epochs (2 vs 4)" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "report").exists()
    c = write_piece(tmp_path / "c.json", [record(0, "cosine", 200, "ddim", 10)], fixed={"epochs": 4})
    assert "differs in batch_size (not recorded vs 128)" in report(tmp_path, a, c).output
    grid = {"schedule": ["cosine"], "timesteps_beta_end": [[200, 0.08]], "sampler": ["ddim"], "seed": [0], "lr": [1]}
    d = write_piece(tmp_path / "d.json", [record(0, "cosine", 200, "ddim", 10)], grid=grid)
    result = report(tmp_path, a, d)
    assert result.exit_code == 2 and "grid dimension 'lr' is in one and not the other" in result.output
    # a speed setting may differ: pieces run on different machines
    e = write_piece(
        tmp_path / "e.json",
        [record(0, "cosine", 200, "ddim", 10)],
        fixed={"epochs": 4, "batch_size": 128, "compile": "off", "fid_batch_size": 7},
    )
    assert report(tmp_path, a, e).exit_code == 0
    (tmp_path / "empty").mkdir()
    result = report(tmp_path, tmp_path / "empty")
    assert result.exit_code == 2 and "a folder without grid_search_results.json" in result.output


def test_a_point_complete_in_two_pieces_is_taken_from_the_first_given(tmp_path):
    a = write_piece(tmp_path / "a.json", [record(0, "linear", 200, "ddim", 20)], name="a")
    b = write_piece(
        tmp_path / "b.json",
        [record(0, "linear", 200, "ddim", 30), record(1, "cosine", 200, "ddim", 10, state="FAIL")],
        grid={"schedule": ["linear", "cosine"], "timesteps_beta_end": [[200, 0.08]], "sampler": ["ddim"], "seed": [0]},
        name="b",
    )
    result = report(tmp_path, b, a)
    assert result.exit_code == 0, result.output
    assert "is COMPLETE in" in result.output and "b.json's is kept (the first --results given)" in result.output
    a_json = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [row["best_fid"] for row in a_json["configs"]] == [[30.0]]  # b's, given first
    assert a_json["study_name"] == "b + a" and (a_json["points_expected"], a_json["points_complete"]) == (2, 1)
    assert [m["state"] for m in a_json["missing"]] == ["FAIL"]


def test_samples_dir_relative_to_the_results_folder_old_absolute_kept(tmp_path):
    old = str(tmp_path / "machine" / "trials" / "0000" / "samples")
    path = write_piece(
        tmp_path / "piece" / "grid_search_results.json",
        [
            record(0, "linear", 200, "ddim", 20, samples_dir="trials/0000/samples"),
            record(1, "linear", 200, "ddim", 20, seed=1, samples_dir=old),
        ],
    )
    records, _ = load_records_from_json(path)
    assert [r["samples_dir"] for r in records] == [str(tmp_path / "piece" / "trials/0000/samples"), old]


def test_the_deadline_projects_the_next_queued_trial_less_a_training_already_made(tmp_path):
    from mnist_diff.config import Config
    from mnist_diff.study.deadline import next_trial_seconds, stop_reason
    from mnist_diff.study.retries import enqueue
    from mnist_diff.study.spec import Sweep
    from mnist_diff.study.storage import open_study, trainings_first

    sweep = Sweep(
        study_name="d",
        out_dir=tmp_path,
        base=Config(),
        schedules=("linear",),
        pairs=((200, 0.08),),
        samplers=("ddpm", "ddim"),
        storage=f"sqlite:///{tmp_path}/optuna.db",
        heartbeat=0,
    )
    order = [p["sampler"] for p in sweep.points()]
    rest = {"ddpm": 30.0, "ddim": 5.0}  # projected [training, the rest] per point, in grid order
    sweep.projection = {"trial_seconds": [[100.0, rest[m]] for m in order]}
    study = open_study(sweep)
    for params in trainings_first(sweep):
        enqueue(study, params)
    assert next_trial_seconds(study, sweep) == 130.0  # DDPM first: it trains
    sweep.deadline = 1000.0
    assert stop_reason(study, sweep, now=870.0) is None
    reason = stop_reason(study, sweep, now=871.0)
    assert reason == "stopped before the deadline: the next trial is projected at 130 s and 129 s are left"
    trial = study.ask()  # the queued DDPM point, run and completed: its training is made
    for name, choices in sweep.search_space().items():
        trial.suggest_categorical(name, choices)
    study.tell(trial, 1.0)
    assert next_trial_seconds(study, sweep) == 5.0  # the DDIM point only samples and scores
    sweep.projection = None  # without rates: the longest trial the study completed
    done = study.get_trials()[0]
    assert next_trial_seconds(study, sweep) == (done.datetime_complete - done.datetime_start).total_seconds()
    sweep.deadline = None
    assert stop_reason(study, sweep, now=1e12) is None


def test_a_deadline_no_trial_fits_is_warned_and_starts_nothing(tmp_path, fid_cache):
    result = invoke(piece_args(tmp_path, "--schedule", "linear", "--seeds", "1", "--stop-after", "0.01s"))
    assert "warning: --stop-after 0 s: the shortest trial is projected at" in result.output, result.output
    assert "study s: 0/1 grid points complete" in result.output
    doc = json.loads((tmp_path / "grid_search_results.json").read_text())
    assert doc["results"] == [] and doc["stopped"].startswith("stopped before the deadline with 0/1")
    assert parent(tmp_path).info.status == "KILLED"
