"""Custom grids: parsing and validation (`mnist_diff.grid`, `sweep --grid/--grid-file`), the reference grid
unchanged, and a custom grid end to end with real SQLite Optuna and MLflow stores."""

import json
import os
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from test_study import TINY

import cli
from mnist_diff.config import Config
from mnist_diff.study.grid import (
    Grid,
    GridError,
    load_file,
    make_dim,
    parse_option,
    reference_dims,
    reference_grid,
)
from mnist_diff.study.spec import Sweep

# TINY without the options these grids vary (an option the grid also sets is refused)
_i, _j = TINY.index("--channels"), TINY.index("--ddim-steps")
TINY_GRID = [a for k, a in enumerate(TINY) if k not in (_i, _i + 1, _j, _j + 1)]


def test_the_reference_grid_is_unchanged():
    """Same 16 points under the same Optuna names and values as before grids were general: a study made by an
    earlier version resumes, and its records read the same."""
    sweep = Sweep(study_name="s", out_dir=Path("."), base=Config())
    assert sweep.search_space() == {
        "schedule": ["linear", "cosine", "quadratic", "sigmoid"],
        "timesteps_beta_end": ["200:0.08", "1000:0.02"],
        "sampler": ["ddpm", "ddim"],
        "seed": [0],
    }
    assert sweep.grid_description() == {
        "schedule": ["linear", "cosine", "quadratic", "sigmoid"],
        "timesteps_beta_end": [[200, 0.08], [1000, 0.02]],
        "sampler": ["ddpm", "ddim"],
        "seed": [0],
    }
    assert sweep.size == 16 == reference_grid().size
    c = sweep.config_for({"schedule": "cosine", "timesteps_beta_end": "1000:0.02", "sampler": "ddim", "seed": 0})
    assert (c.schedule, c.timesteps, c.beta_end, c.sampler, c.seed) == ("cosine", 1000, 0.02, "ddim", 0)
    assert len({c.training_key() for c in reference_grid().configs(Config())}) == 8


def test_dimensions_parse_typed_values_and_coupled_fields():
    d = parse_option("timesteps:beta_end=200:0.08,500:0.04")
    assert (d.name, d.label, d.values) == ("timesteps_beta_end", "timesteps:beta_end", ((200, 0.08), (500, 0.04)))
    assert d.encode(d.values[1]) == "500:0.04" and d.decode("500:0.04") == {"timesteps": 500, "beta_end": 0.04}
    assert parse_option("clip_x0=true,false").values == ((True,), (False,))
    assert parse_option("eta=0,0.5").values == ((0.0,), (0.5,))
    assert parse_option("train_samples=none,256").values == ((None,), (256,))
    assert parse_option("schedule=cosine").values == (("cosine",),)


def test_values_keep_their_identity():
    """Coupled values are written as text: two values that differ past six digits stay two points (not one,
    which left a sweep re-running it forever), and each point runs with its own value, not a rounded one."""
    d = parse_option("timesteps:beta_end=200:0.08000001,200:0.08000002")
    grid = Grid((d,))
    assert grid.search_space() == {"timesteps_beta_end": ["200:0.08000001", "200:0.08000002"]}
    assert [p["beta_end"] for p in grid.points()] == [0.08000001, 0.08000002]
    assert parse_option("timesteps:beta_end=200:0.08").encode((200, 0.08)) == "200:0.08"  # short where exact


def test_extra_dimensions_replace_the_reference_ones_they_share_a_field_with():
    extra = [
        parse_option("sampler=ddim"),
        parse_option("ddim_steps=10,50"),
        parse_option("timesteps:beta_end=200:0.08,500:0.04,1000:0.02"),
    ]
    grid = Grid.build(reference_dims(), extra, seeds=(0, 1))
    assert [d.name for d in grid.dims] == ["schedule", "timesteps_beta_end", "sampler", "ddim_steps", "seed"]
    assert grid.size == 4 * 3 * 1 * 2 * 2
    assert grid.varied() == ["schedule", "timesteps", "beta_end", "ddim_steps", "seed"]
    configs = grid.configs(Config())
    assert {c.sampler for c in configs} == {"ddim"} and {c.timesteps for c in configs} == {200, 500, 1000}
    # points differing only in sampling fields (ddim_steps) share a training; seeds and schedules do not
    assert len({c.training_key() for c in configs}) == 4 * 3 * 2


def test_grid_file(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text(
        '[grid]\nddim_steps = [10, 50]\n"timesteps:beta_end" = [[200, 0.08], [500, 0.04]]\neta = [0, 0.5]\n'
    )
    dims = load_file(path)
    assert [(d.label, d.values) for d in dims] == [
        ("ddim_steps", ((10,), (50,))),
        ("timesteps:beta_end", ((200, 0.08), (500, 0.04))),
        ("eta", ((0.0,), (0.5,))),
    ]
    with pytest.raises(GridError, match="ddim_steps: 1.5 is not of type int"):
        make_dim("ddim_steps", [10, 1.5])


def _ddim_over(t: int) -> str:
    return f"a grid point (…, ddim_steps={t + 1}) with T={t}"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--grid", "learning_rate=1e-3"], "unknown config field 'learning_rate' in grid dimension 'learning_rate'"),
        (["--grid", "ddim_steps=10,fifty"], "ddim_steps: 'fifty' is not an integer"),
        (["--grid", "clip_x0=maybe"], "clip_x0: 'maybe' is not true or false"),
        (["--grid", "eta="], "grid dimension 'eta' has no values"),
        (["--grid", "ddim_steps=10,10"], "grid dimension 'ddim_steps' repeats 10"),
        (["--grid", "lr=1e-3,0.001"], "grid dimension 'lr' repeats 0.001"),  # two texts, one value
        (["--grid", "ddim_steps"], "--grid 'ddim_steps': expected NAME=V1,V2,..."),
        (["--grid", "timesteps:beta_end=200"], "'200' needs 2 values, one per field"),
        (["--grid", "ddim_steps=10", "--grid", "ddim_steps=20"], "field 'ddim_steps' is in two grid dimensions"),
        # every point is checked, not only the first: T=1000 passes, T=200 fails
        (
            ["--grid", "ddim_steps=50,500"],
            "grid point (schedule=linear, timesteps=200, beta_end=0.08, sampler=ddpm, "
            "ddim_steps=500): --ddim-steps (500) cannot exceed --timesteps (200)",
        ),
        (["--grid", "timesteps:beta_end=200:0.08,300:0.00001"], "--beta-end (1e-05) must be greater than --beta-start"),
        (
            ["--grid", "channels=8,16", "--channels", "32"],
            "--channels 32 is also the grid dimension 'channels': give channels in one place",
        ),
        (
            ["--ddim-steps", "20", "--grid", "ddim_steps=10,50"],
            "--ddim-steps 20 is also the grid dimension 'ddim_steps': give ddim_steps in one place",
        ),
        (["--grid", "seed=5", "--seeds", "3"], "--seeds 3 and the grid dimension 'seed' both set the seeds"),
        # issue 22: the 3-step point would end before its first epoch (8 steps of the smoke preset's 256 images)
        (
            [
                "--preset",
                "smoke",
                "--schedule",
                "linear",
                "--timesteps",
                "200",
                "--sampler",
                "ddim",
                "--epochs",
                "2",
                "--grid",
                "max_steps=3,9",
            ],
            "grid point (schedule=linear, timesteps=200, beta_end=0.08, sampler=ddim, "
            "max_steps=3): --max-steps 3 stops before the first epoch ends (8 steps: 256 images, --batch-size 32)",
        ),
        (["--fid-every", "0", "--fid-samples", "0"], "--fid-every 0 with --fid-samples 0 scores nothing"),
        (["--seeds", "17"], "the grid has 272 points, more than --max-points 256"),
        (["--grid", "eta=0,1", "--max-points", "16"], "the grid has 32 points, more than --max-points 16"),
    ],
)
def test_bad_grids_exit_2_with_one_line_and_create_nothing(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.cli, ["sweep", "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.output
    assert list(tmp_path.iterdir()) == []


def test_bad_grid_files(tmp_path):
    bad = {
        "syntax.toml": "[grid\nddim_steps = [1]",
        "scalar.toml": "[grid]\nddim_steps = 10\n",
        "empty.toml": "[grid]\n",
        "repeats.toml": '[grid]\n"timesteps:beta_end" = [[200, 0.08], [200, "0.080"]]\n',
    }
    messages = {
        "syntax.toml": "--grid-file",
        "scalar.toml": "ddim_steps must be a list of values",
        "empty.toml": "no grid dimensions",
        "repeats.toml": "repeats 200:0.08",
    }
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        result = CliRunner().invoke(cli.cli, ["sweep", "--dry-run", "--grid-file", str(tmp_path / name)])
        assert result.exit_code == 2 and messages[name] in result.output, result.output


@pytest.fixture(scope="module")
def custom_sweep(tmp_path_factory, data_dir, fid_weights):
    """A custom smoke grid over a training field (channels) and a sampling field (ddim_steps): 4 points,
    2 trainings."""
    tmp_path = tmp_path_factory.mktemp("grid")
    os.environ["MNIST_DIFF_FID_CACHE"] = str(tmp_path / "fid-cache")
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text("[grid]\nddim_steps = [2, 5]\n")
    args = [
        "sweep",
        "--study-name",
        "g",
        "--storage",
        f"sqlite:///{tmp_path}/optuna.db",
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
        "--experiment",
        "e",
        "--out",
        str(tmp_path / "out"),
        *TINY_GRID,
        "--schedule",
        "cosine",
        "--timesteps",
        "200",
        "--sampler",
        "ddim",
        "--grid",
        "channels=8,16",
        "--grid-file",
        str(grid_file),
    ]
    result = CliRunner().invoke(cli.cli, args)
    assert result.exit_code == 0, result.output
    return tmp_path, result


def test_a_custom_grid_end_to_end(custom_sweep):
    tmp_path, result = custom_sweep
    assert "4/4 grid points complete" in result.output
    study = optuna.load_study(study_name="g", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert {(t.params["channels"], t.params["ddim_steps"]) for t in study.get_trials()} == {
        (8, 2),
        (8, 5),
        (16, 2),
        (16, 5),
    }
    assert study.user_attrs["grid"]["channels"] == [8, 16]
    # points that differ only in ddim_steps (a sampling field) share a training: 2 trainings, not 4
    trainings = [p for p in (tmp_path / "out" / "trainings").iterdir() if p.is_dir()]
    assert len(trainings) == 2
    assert len({t.user_attrs["trained_by_run_id"] for t in study.get_trials()}) == 2
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("e").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("mnist_diff.role") == "study")
    assert parent.data.params["grid"] == (
        "schedule=cosine; timesteps:beta_end=200:0.08; sampler=ddim; channels=8,16; ddim_steps=2,5; seed=0"
    )
    children = [r for r in runs if r.data.tags.get("mnist_diff.role") == "trial"]
    assert sorted((r.data.params["channels"], r.data.params["ddim_steps"]) for r in children) == [
        ("16", "2"),
        ("16", "5"),
        ("8", "2"),
        ("8", "5"),
    ]
    doc = json.loads((tmp_path / "out" / "grid_search_results.json").read_text())
    assert doc["grid_fields"]["channels"] == ["channels"]
    assert {(r["params"]["channels"], r["params"]["ddim_steps"]) for r in doc["results"]} == {
        (8, 2),
        (8, 5),
        (16, 2),
        (16, 5),
    }


@pytest.mark.parametrize("source", ["mlflow", "json"])
def test_report_groups_by_the_varied_fields(custom_sweep, source):
    tmp_path, _ = custom_sweep
    out = tmp_path / f"report-{source}"
    given = (
        ["--study", "g", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
        if source == "mlflow"
        else ["--results", str(tmp_path / "out" / "grid_search_results.json"), "--no-tracking"]
    )
    result = CliRunner().invoke(cli.cli, ["report", *given, "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["varied"] == ["channels", "ddim_steps"] and report["points_complete"] == 4
    assert report["claims"] == []  # not the reference grid
    for field in ("channels", "ddim_steps"):
        groups = report["means"][field]["groups"]
        assert sorted(g["group"] for g in groups) == ([8, 16] if field == "channels" else [2, 5])
        assert all(g["n"] == 2 for g in groups)
        best, other = sorted(groups, key=lambda g: g["vs_best"]["text"] != "best")
        assert best["vs_best"]["text"] == "best" and best["mean"] <= other["mean"]
        vs = other["vs_best"]  # paired on every other field and the seed: 2 pairs, 1 seed
        assert vs["difference"] == f"{other['group']} − {best['group']}" and vs["n_pairs"] == 2
        assert vs["mean_diff"] == pytest.approx(other["mean"] - best["mean"])
        assert vs["shared_training"] is (field == "ddim_steps") and vs["exceeds_seed_spread"] is None
    text = (out / "report.md").read_text()
    assert "## Mean best FID by channels" in text and "## Mean best FID by ddim_steps" in text
    assert "| schedule | T | β_end | sampler | channels | ddim_steps | seeds |" in text
    assert "## Reference claims" not in text
    assert (out / "samples_montage.png").stat().st_size > 0


def test_resuming_with_another_grid_is_refused(custom_sweep):
    tmp_path, _ = custom_sweep
    args = [
        "sweep",
        "--study-name",
        "g",
        "--storage",
        f"sqlite:///{tmp_path}/optuna.db",
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
        "--experiment",
        "e",
        "--out",
        str(tmp_path / "out"),
        *TINY_GRID,
        "--schedule",
        "cosine",
        "--timesteps",
        "200",
        "--sampler",
        "ddim",
        "--grid",
        "channels=8,32",
        "--grid",
        "ddim_steps=2,5",
    ]
    result = CliRunner().invoke(cli.cli, args)
    assert result.exit_code == 2 and "study 'g' exists with another grid" in result.output, result.output
    assert len(optuna.load_study(study_name="g", storage=f"sqlite:///{tmp_path}/optuna.db").get_trials()) == 4
