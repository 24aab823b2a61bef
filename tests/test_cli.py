"""The command line, through click's runner (fast) and one real subprocess (exit code, stderr)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import malicious_checkpoint, tiny_args

import cli
from mnist_diff.choices import SAMPLERS, SCHEDULES
from mnist_diff.cli.checks import RUN_LOCK
from mnist_diff.runtime.device import effective_precision

ROOT = Path(__file__).resolve().parents[1]
TINY_ARGS = [
    *tiny_args(
        "timesteps",
        "beta_end",
        "channels",
        "batch_size",
        "warmup_steps",
        "sampler",
        "ddim_steps",
        train_samples=64,
        fid_every=0,
        fid_samples=0,
    ),
    "--quiet",
    "--no-tracking",
]


def run(*args):
    return CliRunner().invoke(cli.cli, [str(a) for a in args])


def files_under(path: Path) -> list:
    return sorted(p.relative_to(path) for p in path.rglob("*")) if path.exists() else []


def test_every_choice_the_cli_offers_is_implemented():
    from mnist_diff.choices import USES_BETA_RANGE
    from mnist_diff.diffusion.samplers import network_calls
    from mnist_diff.diffusion.schedules import make_schedule

    assert set(USES_BETA_RANGE) == set(SCHEDULES)
    assert all(make_schedule(name, 10, 1e-4, 0.2).betas.shape == (10,) for name in SCHEDULES)
    assert all(network_calls(name, 10, 5) > 0 for name in SAMPLERS)


BAD_TRAIN = [
    (["--schedule", "exponential"], "'exponential' is not one of"),
    (["--sampler", "euler"], "'euler' is not one of"),
    (["--timesteps", "1"], "--timesteps"),
    (["--beta-start", "0"], "--beta-start must be > 0"),
    (["--beta-start", "-0.1"], "--beta-start must be > 0"),
    (["--beta-end", "0.00005"], "--beta-end (5e-05) must be greater than --beta-start"),
    (["--beta-end", "1.0"], "--beta-end must be < 1"),
    (["--timesteps", "40", "--ddim-steps", "50"], "--ddim-steps (50) cannot exceed --timesteps (40)"),
    (["--data-dir", "/nonexistent/mnist"], "--data-dir"),
    (["--channels", "12"], "multiple of 8"),
    (["--ema-warmup-steps", "-1"], "--ema-warmup-steps"),
    # a cut epoch is no epoch: 64 images in batches of 32 are 2 steps an epoch, so 1 step scores nothing
    (
        ["--train-samples", "64", "--batch-size", "32", "--max-steps", "1"],
        "--max-steps 1 stops before the first epoch ends (2 steps: 64 images, --batch-size 32), so nothing is scored",
    ),
    # config values the option types let through: Config's checks (shared with grid values) refuse them
    (["--lr", "inf", "--dry-run"], "--lr must be a finite number, got inf"),
    (["--lr", "nan", "--dry-run"], "--lr must be a finite number, got nan"),
    (["--beta-start", "nan", "--dry-run"], "--beta-start must be a finite number"),
    (["--train-samples", "60001", "--dry-run"], "--train-samples must be <= 60000 (the MNIST train split)"),
    (
        ["--fid-ref", "test", "--fid-ref-samples", "10001", "--dry-run"],
        "--fid-ref-samples must be in [2, 10000] (the MNIST test split), got 10001",
    ),
]


@pytest.mark.parametrize("args,message", BAD_TRAIN)
def test_train_rejects_bad_input_before_any_work(tmp_path, args, message):
    out = tmp_path / "out"
    result = run("train", "--out", out, *args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0]
    assert not out.exists()


def test_unwritable_out_is_rejected(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = run("train", "--out", blocker / "sub")
    assert result.exit_code == 2 and "can't be created" in result.output
    assert blocker.read_text() == "x"


def test_missing_and_corrupt_checkpoint(tmp_path):
    result = run("sample", "--checkpoint", tmp_path / "nope.pt", "--out", tmp_path / "s")
    assert result.exit_code == 2 and "does not exist" in result.output
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    result = run("sample", "--checkpoint", bad, "--out", tmp_path / "s")
    assert result.exit_code == 2 and "unreadable" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_a_checkpoint_that_runs_code_is_unreadable_and_never_run(tmp_path):
    marker = tmp_path / "code-ran"
    evil = malicious_checkpoint(tmp_path / "evil.pt", marker)
    result = run("sample", "--checkpoint", evil, "--out", tmp_path / "s")
    assert result.exit_code == 2 and "unreadable" in result.output and len(result.output.strip().splitlines()) == 1
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    malicious_checkpoint(out / "checkpoints" / "ckpt-00000004.pt", marker)
    result = run("train", *TINY_ARGS, "--resume", "--out", out)
    assert result.exit_code == 2 and "unreadable" in result.output and len(result.output.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "s").exists()
    assert files_under(out / "checkpoints") == [Path("ckpt-00000004.pt")]


def test_a_second_train_on_the_same_out_is_refused_while_the_first_runs(tmp_path, data_dir):
    out = tmp_path / "run"
    data = ["--data-dir", data_dir] if data_dir else []
    first = subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), "train", *TINY_ARGS, "--epochs", "1000", "--out", str(out), *data],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        lock = out / RUN_LOCK
        deadline = time.monotonic() + 120
        while not (lock.exists() and lock.read_text() == str(first.pid)):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        for resume in ([], ["--resume"]):
            second = run("train", *TINY_ARGS, "--max-steps", "2", "--out", out, *data, *resume)
            assert second.exit_code == 2, second.output
            assert second.output.strip() == f"Error: --out {out} is in use by another run (pid {first.pid})"
    finally:
        first.kill()
        first.wait()


def test_bench_full_refuses_an_out_that_holds_a_training_run(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    ckpt = out / "checkpoints" / "ckpt-00000004.pt"
    ckpt.write_bytes(b"a training run's checkpoint")
    result = run(
        "bench",
        "--device",
        "cpu",
        "--channels",
        "8",
        "--batch-size",
        "8",
        "--train-steps",
        "1",
        "--sample-steps",
        "4",
        "--repeats",
        "1",
        "--no-inception",
        "--full",
        "--epochs",
        "1",
        "--train-samples",
        "8",
        "--fid-select-samples",
        "2",
        "--fid-samples",
        "2",
        "--out",
        out,
    )
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"Error: --out {out} already holds a training run: choose another --out"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [ckpt.name]
    assert ckpt.read_bytes() == b"a training run's checkpoint"


def test_cosine_help_says_beta_range_is_ignored():
    result = run("train", "--help")
    assert result.exit_code == 0 and "IGNORES" in result.output


def test_real_process_exit_code_and_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "train", "--beta-end", "2", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "Error: --beta-end must be < 1, got 2.0"
    assert "Traceback" not in proc.stderr and files_under(tmp_path) == []


def test_help_is_fast_and_imports_no_torch():
    code = "import sys, cli; cli.cli.main(['--help'])"
    proc = subprocess.run([sys.executable, "-c", code + "\n"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "train" in proc.stdout
    check = "import sys, cli; assert 'torch' not in sys.modules and 'mlflow' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", check], cwd=ROOT).returncode == 0


def test_train_then_sample_end_to_end(tmp_path, data_dir):
    out = tmp_path / "run"
    result = run(
        "train",
        *TINY_ARGS,
        "--epochs",
        "2",
        "--max-steps",
        "3",
        "--out",
        out,
        *(["--data-dir", data_dir] if data_dir else []),
    )
    assert result.exit_code == 0, result.output
    assert "trained 3 steps" in result.output
    assert (out / "samples" / "epoch-001.png").exists() and (out / "config.json").exists()
    again = run("train", *TINY_ARGS, "--out", out)
    assert again.exit_code == 2 and "--resume" in again.output
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    other = run("train", *TINY_ARGS, "--resume", "--lr", "1e-3", "--seed", "1", "--epochs", "3", "--out", out)
    assert other.exit_code == 2 and other.output.strip() == (
        f"Error: --resume: --out {out} was trained with other settings: lr 0.0002 (now 0.001), "
        "seed 0 (now 1); give those, or another --out"
    )  # --epochs may grow
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    ckpt = sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1]

    too_many = run("sample", "--checkpoint", ckpt, "--ddim-steps", "21", "--out", tmp_path / "s0")
    assert too_many.exit_code == 2 and "cannot exceed --timesteps (20)" in too_many.output
    assert not (tmp_path / "s0").exists()

    for sampler, clip in (("ddpm", []), ("ddim", ["--no-clip-x0"])):
        s_out = tmp_path / f"s-{sampler}"
        result = run(
            "sample",
            "--checkpoint",
            ckpt,
            "--num-samples",
            10,
            "--sampler",
            sampler,
            "--batch-size",
            4,
            "--out",
            s_out,
            "--quiet",
            *clip,
        )
        assert result.exit_code == 0, result.output
        npz = np.load(s_out / "samples.npz")
        images = npz["images"]
        assert images.shape == (10, 1, 28, 28) and images.dtype == np.uint8
        assert bool(npz["clip_x0"]) is not clip  # the checkpoint's setting (on) unless --no-clip-x0
        assert (s_out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    result = run(
        "bench",
        "--device",
        "cpu",
        "--channels",
        "8",
        "--batch-size",
        "8",
        "--sample-batch",
        "4",
        "--train-steps",
        "1",
        "--sample-steps",
        "4",
        "--repeats",
        "1",
        "--no-inception",
        "--json",
        out,
    )
    assert result.exit_code == 0, result.output
    import json

    r = json.loads(out.read_text())
    assert r["train_images_per_s"] > 0 and r["ddpm_image_steps_per_s"] > 0
    assert r["precision"] == effective_precision("cpu", "auto")
    assert "inception_images_per_s" not in r and "Inception images/s" not in result.output
    # --fused auto is off on a CPU; the fused forward is still compared: bf16 rounding (tests/test_fused.py)
    assert r["fused"] is False and 0 <= r["fused_max_abs_diff"] < (0.1 if r["precision"] == "bf16" else 1e-4)
    assert "max |fused - eager|" in result.output
    # a worker's start, and the reference study as `sweep --dry-run` projects it at these rates, printed too
    assert r["worker_start_s"] > 0 and r["projected_reference_study_s"] > 0
    assert "reference study" in result.output and "worker start" in result.output


def unavailable_device():
    import torch

    return "cuda" if not torch.cuda.is_available() else "mps"


MORE_BAD = [
    (["train", "--device", "DEVICE"], "is not available"),
    (["sample", "--checkpoint", "MISSING"], "does not exist"),
    (["evaluate", "--no-tracking"], "give exactly one of --checkpoint, --images and --model"),
    (["evaluate", "--images", "GARBAGE", "--no-tracking"], "unreadable"),
    (["evaluate", "--images", "NPZ", "--model", "models:/m@champion", "--no-tracking"], "exactly one of --checkpoint,"),
    (["report"], "give exactly one of --study and --results"),
    (["report", "--study", "nope", "--tracking-uri", "sqlite:///TMP/m.db"], "no MLflow run tagged as study"),
    (["report", "--results", "GARBAGE"], "not a grid_search_results.json"),
    (["sweep", "--no-tracking"], "drop --no-tracking"),
    (["sweep", "--stop-after", "soon"], "'soon' is not a time span such as 600, 90s, 25m or 1h30m"),
    (["sweep", "--seeds", "0"], "--seeds"),
    (["train", "--sheet-every", "-1"], "--sheet-every"),
    (["bench", "--channels", "12"], "multiple of 8"),
    (["bench", "--compile", "fast"], "'fast' is not one of"),
    (["evaluate", "--images", "NHWC", "--no-tracking"], "expected at least 2 uint8 images [N, 1, 28, 28]"),
    (["evaluate", "--images", "FLOAT", "--no-tracking"], "got float32 [4, 1, 28, 28]"),
    (["evaluate", "--images", "NONE", "--no-tracking"], "got uint8 [0, 1, 28, 28]"),
    (
        ["evaluate", "--images", "NPZ", "--no-tracking", "--fid-ref", "test", "--fid-ref-samples", "10001"],
        "--fid-ref-samples must be in [2, 10000]",
    ),
    (["train", "--dry-run", "--fid-weights", "GARBAGE"], "not a torch weights file"),
    (["train", "--dry-run", "--fid-weights", "STATE"], "not torch-fidelity's Inception weights"),
    (["evaluate", "--images", "NPZ", "--fid-weights", "MISSING"], "does not exist"),
    (["train", "--dry-run", "--data-dir", "TMP/in"], "holds no MNIST: looked for TMP/in/MNIST/raw/"),
    (["report", "--results", "LIST"], "not a grid_search_results.json (expected an object"),
    (["report", "--results", "EMPTY"], "not a grid_search_results.json (expected an object"),
    (["report", "--results", "NOPARAMS"], "not a grid_search_results.json (results[0] is not a trial record"),
    (["sweep", "--grid", "weight_decay=-1"], "weight_decay=-1): weight_decay must be >= 0, got -1.0"),
    (["sweep", "--grid", "grad_clip=nan"], "grad_clip must be a finite number, got nan"),
    (["sweep", "--grid", "lr=inf"], "--lr must be a finite number, got inf"),
    (["sweep", "--grid", "warmup_steps=-5"], "--warmup-steps must be >= 0, got -5"),
    (["sweep", "--grid", "fid_ref_samples=60001"], "--fid-ref-samples must be in [2, 60000]"),
    (["bench", "--full", "--fid-ref-samples", "60001"], "--fid-ref-samples must be in [2, 60000]"),
    (["sweep", "--grid-file", "LATIN1"], "not UTF-8 text"),
    (["sweep", "--grid-file", "GARBAGE"], "not a TOML grid file"),
    (
        [
            "bench",
            "--device",
            "cpu",
            "--channels",
            "8",
            "--batch-size",
            "8",
            "--sample-batch",
            "4",
            "--train-steps",
            "1",
            "--sample-steps",
            "4",
            "--repeats",
            "1",
            "--no-inception",
            "--json",
            "TMP/nope/b.json",
        ],
        "--json TMP/nope/b.json: folder TMP/nope does not exist",
    ),
]


@pytest.mark.parametrize("args,message", MORE_BAD)
def test_every_command_rejects_bad_input_with_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    garbage = tmp_path / "in" / "garbage.json"
    garbage.write_text("{not json")
    subst = {"DEVICE": unavailable_device(), "MISSING": str(tmp_path / "in" / "none.pt"), "GARBAGE": str(garbage)}
    subst.update(input_files(tmp_path / "in"))
    args = [subst.get(a, a.replace("TMP", str(tmp_path))) for a in args]
    result = run(*args, *(["--out", tmp_path / "out"] if args[0] in ("train", "sample", "report", "sweep") else []))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    message = message.replace("TMP", str(tmp_path))
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # nothing created: no out, store or study


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "sqlite+pysqlite:///file::memory:?cache=shared"])
def test_every_command_refuses_an_in_memory_store(tmp_path, monkeypatch, url):
    """What a command writes there vanishes with it: runs, trials, the study (and it used to exit 0)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    npz = tmp_path / "in" / "x.npz"
    np.savez(npz, images=np.zeros((2, 1, 28, 28), np.uint8))
    out = ["--out", tmp_path / "out"]
    tiny = [*TINY_ARGS[:-1], "--max-steps", "2"]  # without the fix, train would train: briefly
    for args in (
        ["train", "--tracking-uri", url, *out, *tiny],
        ["evaluate", "--images", npz, "--tracking-uri", url],
        ["sweep", "--storage", url, *out],
        ["sweep", "--tracking-uri", url, *out],
        ["report", "--study", "s", "--tracking-uri", url, *out],
        ["report", "--study", "s", "--storage", url, *out],
    ):
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and "is an in-memory database" in lines[0], (args, result.output)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def input_files(folder: Path) -> dict:
    """Files that are readable but the wrong thing: each a placeholder of MORE_BAD."""
    import torch

    arrays = {
        "NPZ": np.zeros((4, 1, 28, 28), np.uint8),
        "NHWC": np.zeros((4, 28, 28, 1), np.uint8),
        "FLOAT": np.zeros((4, 1, 28, 28), np.float32),
        "NONE": np.zeros((0, 1, 28, 28), np.uint8),
    }
    out = {}
    for name, images in arrays.items():
        np.savez(folder / f"{name}.npz", images=images)
        out[name] = str(folder / f"{name}.npz")
    torch.save({"conv.weight": torch.zeros(2, 1, 3, 3)}, folder / "state.pt")
    texts = {"LIST": "[]", "EMPTY": "{}", "NOPARAMS": '{"grid": {}, "results": [{"trial": 0}]}'}
    for name, text in texts.items():
        (folder / f"{name}.json").write_text(text)
        out[name] = str(folder / f"{name}.json")
    (folder / "latin1.toml").write_bytes("[grid]\n# \u00e9t\u00e9\nddim_steps = [10]\n".encode("latin-1"))
    return {**out, "STATE": str(folder / "state.pt"), "LATIN1": str(folder / "latin1.toml")}


@pytest.mark.parametrize(
    "uri,message",
    [
        ("file:TMP/mlruns", "MLflow 3 no longer opens folder (file:) stores"),
        ("TMP/mlruns", "MLflow 3 no longer opens folder (file:) stores"),
        ("ftp://user:secret@host/x", "tracking URI ftp://user:***@host/x: MLflow does not support the scheme"),
    ],
)
@pytest.mark.parametrize(
    "command",
    [
        ["train", *TINY_ARGS[:-1], "--max-steps", "2"],
        ["sweep", "--preset", "smoke", "--schedule", "linear", "--timesteps", "200", "--sampler", "ddim"],
        ["evaluate", "--images", "NPZ"],
        ["report", "--study", "s"],
    ],
)
def test_tracking_uris_mlflow_refuses_exit_2_for_every_command(tmp_path, monkeypatch, command, uri, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    (tmp_path / "in").mkdir()
    subst = input_files(tmp_path / "in")
    args = [subst.get(a, a) for a in command]
    result = run(
        *args,
        "--tracking-uri",
        uri.replace("TMP", str(tmp_path)),
        *(["--out", tmp_path / "out"] if args[0] != "evaluate" else []),
    )
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], result.output
    assert "secret" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_sweep_refuses_an_existing_study_with_another_grid(tmp_path, monkeypatch):
    import optuna

    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    optuna.create_study(study_name="s", storage=storage).set_user_attr("grid", {"schedule": ["linear"]})
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run("sweep", "--study-name", "s", "--storage", storage, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "exists with another grid" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert len(optuna.load_study(study_name="s", storage=storage).get_trials()) == 0


def test_sweep_refuses_to_resume_a_study_with_other_settings(tmp_path, monkeypatch):
    """Its finished trials would be mixed with trials of another protocol; speed settings may change."""
    import optuna

    from mnist_diff.config import Config
    from mnist_diff.study.spec import Sweep

    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="s", storage=storage)
    study.set_user_attr("grid", Sweep(study_name="s", out_dir=tmp_path, base=Config()).grid_description())
    study.set_user_attr("fixed", {"epochs": 20, "fid_select_samples": 2000, "compile": "off", "fid_batch_size": 50})
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run(
        "sweep",
        "--study-name",
        "s",
        "--storage",
        storage,
        "--out",
        tmp_path / "out",
        "--epochs",
        "5",
        "--fid-select-samples",
        "500",
        "--compile",
        "on",
    )
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (
        "Error: study 's' exists with other settings: epochs 20 (now 5), "
        "fid_select_samples 2000 (now 500); give those, or another --study-name"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert len(optuna.load_study(study_name="s", storage=storage).get_trials()) == 0


def test_dry_run_shows_clip_x0_and_ema_warmup(tmp_path):
    result = run("train", "--dry-run", "--out", tmp_path / "o")
    config = json.loads(result.output)
    assert result.exit_code == 0 and config["clip_x0"] is True and config["ema_warmup_steps"] == 400
    result = run("train", "--dry-run", "--no-clip-x0", "--ema-warmup-steps", "0", "--out", tmp_path / "o")
    config = json.loads(result.output)
    assert config["clip_x0"] is False and config["ema_warmup_steps"] == 0


def test_the_sample_sheet_options_keep_their_old_names_hidden():
    result = run("train", "--grid-images", "4", "--grid-every", "2", "--dry-run", "--no-tracking")
    assert result.exit_code == 0, result.output
    config = json.loads(result.output)
    assert config["sheet_images"] == 4 and config["sheet_every"] == 2
    shown = run("train", "--help").output
    assert "--sheet-images" in shown and "--grid-images" not in shown and "--grid-every" not in shown
