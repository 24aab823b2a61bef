"""The study's work per phase (counted by hand here), its projection, the bench cache and `sweep --dry-run`."""

import json
import os
from itertools import product

import click
import pytest
import torch
from click.testing import CliRunner

import cli
from mnist_diff.cli.params import Duration
from mnist_diff.config import Config
from mnist_diff.perf import bench_cache, workload
from mnist_diff.perf.workload import FINAL, GRIDS, INCEPTION, SELECTION, TRAINING, Rates
from mnist_diff.presets import SMOKE
from mnist_diff.runtime.device import effective_precision
from mnist_diff.study.plan import auto_workers


def reference_study() -> list:
    """The 16 grid points of `sweep` with no options."""
    return [
        Config(schedule=s, timesteps=t, beta_end=b, sampler=m)
        for s, (t, b), m in product(
            ("linear", "cosine", "quadratic", "sigmoid"), ((200, 0.08), (1000, 0.02)), ("ddpm", "ddim")
        )
    ]


def test_reference_study_counts():
    w = workload.count(reference_study())
    assert (w.trials, w.trainings, w.fid_scores, w.reference_images) == (16, 8, 16 * (20 + 1), 60_000)
    # 8 trainings x 20 epochs x (60,000 // 128 = 468 steps) x 128 images
    assert w.phase(TRAINING).images == w.phase(TRAINING).evaluations == 8 * 20 * 468 * 128 == 9_584_640
    # UNet calls per image summed over the 16 trials: 4 x 1000 (DDPM T=1000) + 4 x 200 + 8 x 50 (DDIM)
    calls = 4 * 1000 + 4 * 200 + 8 * 50
    assert calls == 5200
    assert (w.phase(SELECTION).images, w.phase(SELECTION).evaluations) == (16 * 20 * 2000, 20 * 2000 * calls)
    assert (w.phase(FINAL).images, w.phase(FINAL).evaluations) == (16 * 10_000, 10_000 * calls)
    assert (w.phase(GRIDS).images, w.phase(GRIDS).evaluations) == (16 * 20 * 64, 20 * 64 * calls)
    assert w.phase(INCEPTION).images == 16 * (20 * 2000 + 10_000) == 800_000
    # issue 10 says "about 267 million, DDPM at T=1000 77% of them, ~9.6 million training images": exact
    # figures are 266,656,000 and 4000/5200 = 76.9%, since every phase spends the same draws per trial
    assert w.sampling_evaluations == (20 * 2000 + 10_000 + 20 * 64) * calls == 266_656_000
    ddpm_1000 = workload.count([c for c in reference_study() if c.sampler == "ddpm" and c.timesteps == 1000])
    assert ddpm_1000.sampling_evaluations / w.sampling_evaluations == pytest.approx(4000 / 5200)
    assert ddpm_1000.trainings == 4 and ddpm_1000.phase(TRAINING).images == 4 * 20 * 468 * 128


def test_small_grid_counts():
    base = Config(
        timesteps=20,
        beta_end=0.2,
        ddim_steps=5,
        epochs=5,
        batch_size=32,
        train_samples=100,
        fid_every=2,
        fid_select_samples=10,
        fid_samples=30,
        fid_ref="test",
    )
    # DDPM and DDIM share seed 0's training; seed 1 trains again. 100 // 32 = 3 steps per epoch, 15 steps.
    w = workload.count([base, base.replace(sampler="ddim"), base.replace(seed=1)])
    assert (w.trials, w.trainings) == (3, 2)
    assert w.phase(TRAINING).images == 2 * 15 * 32
    calls = 20 + 5 + 20
    assert workload.scored_epochs(base) == [2, 4, 5]  # every 2nd, and the last
    assert (w.phase(SELECTION).images, w.phase(SELECTION).evaluations) == (3 * 3 * 10, 3 * 10 * calls)
    assert (w.phase(FINAL).images, w.phase(FINAL).evaluations) == (3 * 30, 30 * calls)
    assert (w.phase(GRIDS).images, w.phase(GRIDS).evaluations) == (3 * 5 * 64, 5 * 64 * calls)
    assert (w.phase(INCEPTION).images, w.fid_scores, w.reference_images) == (3 * (30 + 30), 3 * 4, 10_000)

    # --max-steps 7 ends inside epoch 3: 2 complete epochs, the last of them scored
    short = workload.count([base.replace(max_steps=7)])
    assert (short.phase(TRAINING).images, short.phase(GRIDS).images, short.fid_scores) == (7 * 32, 2 * 64, 2)
    assert workload.scored_epochs(base.replace(max_steps=7)) == [2]
    # no FID at all: no scores, no reference
    none = workload.count([base.replace(fid_every=0, fid_samples=0, fid_ref_samples=50)])
    assert (none.phase(INCEPTION).images, none.fid_scores, none.reference_images) == (0, 0, 0)
    assert workload.count([base.replace(fid_every=0, fid_ref_samples=50)]).reference_images == 50


def test_projection_and_warning():
    base = Config(
        timesteps=20,
        beta_end=0.2,
        ddim_steps=5,
        epochs=5,
        batch_size=32,
        train_samples=100,
        fid_every=2,
        fid_select_samples=10,
        fid_samples=30,
        fid_ref="test",
    )
    configs = [base, base.replace(sampler="ddim")]
    w = workload.count(configs)
    r = Rates(train_images_per_s=96, sample_evaluations_per_s=50, inception_images_per_s=4, fid_fixed_seconds=3)
    s = workload.project(w, r)
    assert s[TRAINING] == pytest.approx(480 / 96)
    assert s[SELECTION] == pytest.approx(3 * 10 * 25 / 50) and s[FINAL] == pytest.approx(30 * 25 / 50)
    assert s[GRIDS] == pytest.approx(5 * 64 * 25 / 50)
    assert s[INCEPTION] == pytest.approx(2 * 60 / 4 + 8 * 3)
    assert workload.project_configs(configs, r) == s
    assert workload.long_study_warning(sum(s.values()), "cpu") is None  # about 4 min
    slow = sum(workload.project_configs(configs, Rates(1, 1, 4, 3)).values())
    line = workload.long_study_warning(slow, "cpu")
    assert line.startswith("This study is projected to take 2 h ") and "--preset smoke" in line
    assert "--preset smoke" not in workload.long_study_warning(slow, "cpu", suggest_smoke=False)
    assert [workload.format_duration(x) for x in (44.6, 390, 77_890)] == ["45 s", "6 min 30 s", "21 h 38 min"]


def test_a_grid_over_widths_is_projected_at_each_widths_rates():
    """Two widths, each at its own bench: the projection is the sum of the two groups' projections, a DDPM and
    a DDIM trial of one width still share a training, and the table names each width's rate."""
    base = Config(
        timesteps=20,
        beta_end=0.2,
        ddim_steps=5,
        epochs=5,
        batch_size=32,
        train_samples=100,
        fid_every=2,
        fid_select_samples=10,
        fid_samples=30,
        fid_ref="test",
        channels=8,
    )
    narrow = [base, base.replace(sampler="ddim")]
    wide = [c.replace(channels=16) for c in narrow]
    fast = Rates(
        train_images_per_s=96,
        sample_evaluations_per_s=50,
        inception_images_per_s=4,
        fid_fixed_seconds=3,
        source="bench A",
    )
    slow = Rates(
        train_images_per_s=24,
        sample_evaluations_per_s=10,
        inception_images_per_s=4,
        fid_fixed_seconds=3,
        source="bench A",
    )
    rates = {workload.rate_key(narrow[0]): fast, workload.rate_key(wide[0]): slow}
    s = workload.project_configs(narrow + wide, rates)
    # per width: 480 training images (one training for both samplers); 3 x 10 selection, 30 final and 5 x 64 grid
    # images at 25 calls each (20 DDPM + 5 DDIM); Inception alike at both widths
    assert s[TRAINING] == pytest.approx(480 / 96 + 480 / 24)
    assert s[SELECTION] == pytest.approx(3 * 10 * 25 / 50 + 3 * 10 * 25 / 10)
    assert s[GRIDS] == pytest.approx(5 * 64 * 25 / 50 + 5 * 64 * 25 / 10)
    assert s[INCEPTION] == pytest.approx(2 * (2 * 60 / 4 + 8 * 3))
    assert workload.project_configs(narrow, rates) == workload.project(workload.count(narrow), fast)
    table = workload.format_table(narrow + wide, rates)
    assert "4 trials, 2 trainings" in table
    assert "96 images/s (channels 8); 24 images/s (channels 16)" in table
    assert "50 evaluations/s (channels 8); 10 evaluations/s (channels 16)" in table
    assert "\nrates: bench A\n" in table and "4 images/s + 3 s x 16 scores" in table  # alike: said once
    assert workload.long_study_warning(sum(s.values()), "cpu") is None
    with pytest.raises(KeyError):  # a width with no rates is a caller's bug, not a silent guess
        workload.project_configs([base.replace(channels=32)], rates)


def test_small_batches_pay_the_step_latency():
    """t(b) = L + b c per sampler step: L = 1 ms, c = 5 us. The two rates bench measures give back L."""
    big, small = 2000 / (1e-3 + 2000 * 5e-6), 64 / (1e-3 + 64 * 5e-6)
    assert workload.sample_step_latency(2000, big, 64, small) == pytest.approx(1e-3)
    assert workload.sample_step_latency(2000, big, 64, big) == 0.0  # no faster per image at 2000: no latency
    assert workload.sample_step_latency(2000, big, 64, small / 100) == pytest.approx(64 / (small / 100))  # capped
    assert workload.sample_step_latency(64, big, 64, small) == 0.0  # one batch size: nothing to tell apart
    r = workload.rates_from_bench(
        {
            "train_images_per_s": 1.0,
            "ddpm_image_steps_per_s": big,
            "ddim_image_steps_per_s": big,
            "sample_batch": 2000,
            "small_sample_batch": 64,
            "ddpm_small_image_steps_per_s": small,
        },
        "cuda",
    )
    assert (r.sample_batch, r.sample_step_seconds) == (2000, pytest.approx(1e-3))
    assert r.sampling_seconds(64, 1000) == pytest.approx(1000 * (1e-3 + 64 * 5e-6))  # a grid at T=1000: 1.32 s
    assert r.sampling_seconds(10_000, 1) == pytest.approx(5 * (1e-3 + 2000 * 5e-6))  # 5 batches of 2,000
    assert r.sampling_seconds(2064, 1) == pytest.approx(1e-3 + 2064 * 5e-6)  # the tail joins the last batch
    assert r.sampling_seconds(300, 1, batch=100) == pytest.approx(3 * (1e-3 + 100 * 5e-6))  # a config's own batch
    # no latency measured: a pass costs its evaluations at the rate, whatever its batches
    flat = Rates(1.0, big, 1.0, 0.0)
    assert flat.sampling_seconds(64, 1000) == pytest.approx(64_000 / big)
    assert "1.00 ms a batch step" in workload.format_table(reference_study(), r)


def test_passes_and_their_projection_with_latency():
    base = Config(
        timesteps=20,
        beta_end=0.2,
        ddim_steps=5,
        epochs=5,
        batch_size=32,
        train_samples=100,
        fid_every=2,
        fid_select_samples=10,
        fid_samples=30,
        fid_ref="test",
    )
    w = workload.count([base])
    # epochs 2, 4 and 5 draw the grid (64) and the selection (10) in one pass of 74; epochs 1 and 3 the grid alone
    assert w.phase(SELECTION).passes == ((74, 20, 0, pytest.approx(3 * 10 / 74)),)
    assert w.phase(GRIDS).passes == ((64, 20, 0, 2.0), (74, 20, 0, pytest.approx(3 * 64 / 74)))
    assert w.phase(FINAL).passes == ((30, 20, 0, 1.0),)
    r = Rates(1.0, 1000.0, 1.0, 0.0, sample_batch=50, sample_step_seconds=0.01)
    per_image = 1 / 1000 - 0.01 / 50
    s = workload.project(w, r)
    # 74 images at batch 50: batches of 50 and 24, each step paying 10 ms
    pass74 = 20 * (2 * 0.01 + 74 * per_image)
    assert s[SELECTION] == pytest.approx(3 * 10 / 74 * pass74)
    # 64 images at batch 50: 50 and a tail of 14 (over an eighth of a batch, so a batch of its own)
    assert s[GRIDS] == pytest.approx(2 * 20 * (2 * 0.01 + 64 * per_image) + 3 * 64 / 74 * pass74)
    assert s[FINAL] == pytest.approx(20 * (0.01 + 30 * per_image))
    assert workload.count([base.replace(sample_batch_size=16)]).phase(FINAL).passes == ((30, 20, 16, 1.0),)
    # grids every 3rd epoch (3 and the last, 5); selection at 2, 4, 5: only epoch 5 draws both in one pass
    sparse = workload.count([base.replace(sheet_every=3)])
    assert workload.grid_epochs(base.replace(sheet_every=3)) == [3, 5]
    assert sparse.phase(SELECTION).passes == ((10, 20, 0, 2.0), (74, 20, 0, pytest.approx(10 / 74)))
    assert sparse.phase(GRIDS).passes == ((64, 20, 0, 1.0), (74, 20, 0, pytest.approx(64 / 74)))
    assert (sparse.phase(GRIDS).images, sparse.phase(SELECTION).images) == (2 * 64, 3 * 10)
    assert workload.count([base.replace(sheet_every=0)]).phase(GRIDS).passes == ()


def test_rates_from_bench_label_estimates():
    bench = {"train_images_per_s": 123.0, "ddpm_image_steps_per_s": 441.0, "ddim_image_steps_per_s": 457.0}
    r = workload.rates_from_bench(bench, "cpu")
    assert (r.train_images_per_s, r.sample_evaluations_per_s, r.inception_images_per_s) == (123, 449, 4)
    assert set(r.estimated) == {"inception_images_per_s", "fid_fixed_seconds", "worker_start_seconds"}
    assert "4 images/s (estimate)" in workload.format_table(reference_study(), r)
    measured = workload.rates_from_bench({**bench, "inception_images_per_s": 1500.0}, "cuda")
    assert measured.inception_images_per_s == 1500
    assert measured.estimated == ("fid_fixed_seconds", "worker_start_seconds")
    assert workload.rates_from_bench(bench, "cuda").inception_images_per_s == 2000


def test_bench_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv(bench_cache.ENV, str(tmp_path / "bench"))
    cpu = torch.device("cpu")
    assert bench_cache.load(cpu, 8, 32, "auto") is None
    result = {"channels": 8, "train_batch": 32, "train_images_per_s": 114.0}
    path = bench_cache.save(result, cpu, "auto")
    assert path.parent == tmp_path / "bench" and path.name.startswith("cpu-")
    assert bench_cache.load(cpu, 8, 32, "auto") == result
    assert bench_cache.load(cpu, 64, 32, "auto") is None
    auto = effective_precision(cpu, "auto")  # entries are keyed by the precision that runs: auto resolved
    assert bench_cache.load(cpu, 8, 32, auto) == result
    assert bench_cache.load(cpu, 8, 32, "fp32" if auto == "bf16" else "bf16") is None
    bench_cache.save({**result, "train_batch": 128}, cpu, "auto")  # a second entry keeps the first
    assert len(json.loads(path.read_text())["entries"]) == 2 and bench_cache.load(cpu, 8, 32, "auto") == result
    path.write_text("{damaged")
    assert bench_cache.load(cpu, 8, 32, "auto") is None


# Real `bench` results of this project's CPU machine (2 cores): channels 64 from docs/BENCHMARKS.md
# (`bench --device cpu --repeats 3`); channels 8 at the smoke preset's batch 32 from `bench --device cpu
# --channels 8 --batch-size 32 --sample-batch 64 --train-steps 10 --sample-steps 10 --repeats 3`, run with
# one thread while the machine was shared (so slower than it can be).
BENCH_CPU = [
    {
        "channels": 64,
        "train_batch": 128,
        "train_images_per_s": 123.0,
        "ddpm_image_steps_per_s": 441.0,
        "ddim_image_steps_per_s": 457.0,
    },
    {
        "channels": 8,
        "train_batch": 32,
        "train_images_per_s": 114.4,
        "ddpm_image_steps_per_s": 354.0,
        "ddim_image_steps_per_s": 381.7,
    },
]


def save_cpu_bench(*results):
    """Cache CPU bench results at this process's threads and at one: the smoke preset's workers have one thread
    each (on 2 cores), and rates are kept per thread count."""
    threads = torch.get_num_threads()
    for n in {threads, 1}:
        torch.set_num_threads(n)
        for result in results:
            bench_cache.save(result, torch.device("cpu"), "auto")
    torch.set_num_threads(threads)


@pytest.fixture
def cached_cpu_bench(tmp_path, monkeypatch):
    monkeypatch.setenv(bench_cache.ENV, str(tmp_path / "bench"))
    save_cpu_bench(*BENCH_CPU)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_sweep_dry_run_prints_the_work_and_creates_nothing(cached_cpu_bench):
    result = CliRunner().invoke(cli.cli, ["sweep", "--dry-run", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "16 trials, 8 trainings, 336 FID scores; 266,656,000 UNet evaluations for sampling" in out
    for phase in workload.PHASES:
        assert f"\n{phase} " in out
    assert "9,584,640" in out and "total" in out and "measuring" not in out  # the cached rates were used
    assert "123 images/s" in out and "449 evaluations/s" in out and "(estimate)" in out
    warnings = [line for line in out.splitlines() if line.startswith("This study is projected to take")]
    assert len(warnings) == 1 and "--preset smoke" in warnings[0]
    assert list(cached_cpu_bench.iterdir()) == []  # no study, run, store or folder


def test_sweep_dry_run_projects_each_width_of_a_grid_at_its_own_rates(cached_cpu_bench):
    save_cpu_bench({**BENCH_CPU[1], "channels": 16, "train_images_per_s": 57.2})
    result = CliRunner().invoke(
        cli.cli,
        [
            "sweep",
            "--dry-run",
            "--device",
            "cpu",
            "--preset",
            "smoke",
            "--schedule",
            "cosine",
            "--grid",
            "channels=8,16",
        ],
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert "8 trials, 4 trainings" in out and "measuring" not in out
    assert "114 images/s (channels 8); 57 images/s (channels 16)" in out
    training = next(line for line in out.splitlines() if line.startswith("training "))
    # the smoke preset trains 2 epochs of 256 images (8 steps of 32): 2 trainings of 512 images per width
    assert workload.format_duration(2 * 512 / 114.4 + 2 * 512 / 57.2) in training


def test_time_budget_fits_the_fid_protocol_or_refuses(cached_cpu_bench):
    from mnist_diff.study.grid import reference_configs

    smoke = [c.replace(**SMOKE) for c in reference_configs()]
    rates = workload.rates_from_bench(BENCH_CPU[1], "cpu")
    asked = sum(workload.project_configs(smoke, rates).values())
    args = ["sweep", "--dry-run", "--device", "cpu", "--preset", "smoke", "--time-budget"]
    roomy = CliRunner().invoke(cli.cli, [*args, f"{asked + 60:.0f}"])
    assert roomy.exit_code == 0 and "the protocol as given fits" in roomy.output, roomy.output
    assert "48 FID scores" in roomy.output  # 16 trials x (2 epochs + the final)
    # a second short: the first reduction that changes anything for the smoke preset's 8 and 16 images is scoring
    # every 2nd epoch, which of 2 epochs scores only the last: 16 x (1 + 1) scores
    tight = CliRunner().invoke(cli.cli, [*args, f"{asked - 1:.3f}s"])
    assert tight.exit_code == 0, tight.output
    assert "running selection FID on 8 images every 2 epoch(s) (grids with them), final FID on 16" in tight.output
    assert "16 trials, 8 trainings, 32 FID scores" in tight.output
    fitted = sum(workload.project_configs([c.replace(fid_every=2, sheet_every=2) for c in smoke], rates).values())
    assert f"(projected {workload.format_duration(fitted)})" in tight.output
    for bad, message in (
        (["1s"], "--time-budget 1 s: even the smallest FID protocol is projected at "),
        (
            ["1h", "--grid", "fid_samples=16,32"],
            "--time-budget chooses the FID protocol, which the grid varies (fid_samples)",
        ),
        (["soon"], "'soon' is not a time span such as 600, 90s, 25m or 1h30m"),
    ):
        result = CliRunner().invoke(cli.cli, [*args, *bad])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.output
    assert list(cached_cpu_bench.iterdir()) == []
    # refused without --dry-run too, before any store or folder is made
    result = CliRunner().invoke(cli.cli, [*[a for a in args if a != "--dry-run"], "1s"])
    assert result.exit_code == 2 and "even the smallest FID protocol" in result.output, result.output
    assert list(cached_cpu_bench.iterdir()) == []


def test_durations():
    d = Duration()
    assert [d.convert(t, None, None) for t in ("600", "90s", "25m", "25min", "1h30m", "1.5h", "2h 5s", "")] == [
        600,
        90,
        1500,
        1500,
        5400,
        5400,
        7205,
        None,
    ]
    for bad in ("0", "m", "5d", "-5m", "1h-2m", "h1"):
        with pytest.raises(click.BadParameter):
            d.convert(bad, None, None)


def test_smoke_preset_is_not_warned_about(cached_cpu_bench):
    result = CliRunner().invoke(cli.cli, ["sweep", "--dry-run", "--device", "cpu", "--preset", "smoke"])
    assert result.exit_code == 0, result.output
    assert "16 trials, 8 trainings, 48 FID scores" in result.output and "measuring" not in result.output
    assert "projected to take" not in result.output
    assert list(cached_cpu_bench.iterdir()) == []


def test_bench_full_measures_everything_sweep_projects_and_runs_the_study_path(
    tmp_path, monkeypatch, data_dir, fid_weights
):
    monkeypatch.setenv(bench_cache.ENV, str(tmp_path / "bench"))
    monkeypatch.setenv("MNIST_DIFF_FID_CACHE", str(tmp_path / "fid-cache"))
    monkeypatch.chdir(tmp_path)
    smoke_model = ["--channels", "8", "--batch-size", "32"]  # the smoke preset's
    full = [
        "--full",
        "--epochs",
        "1",
        "--train-samples",
        "64",
        "--fid-select-samples",
        "8",
        "--fid-samples",
        "10",
        "--fid-ref-samples",
        "16",
    ]
    full += [*(["--data-dir", data_dir] if data_dir else []), *(["--fid-weights", fid_weights] if fid_weights else [])]
    result = CliRunner().invoke(
        cli.cli,
        [
            "bench",
            "--device",
            "cpu",
            *smoke_model,
            "--sample-batch",
            "4",
            "--train-steps",
            "1",
            "--sample-steps",
            "4",
            "--repeats",
            "1",
            *full,
            "--fid-precision-check",
            "6",
            "--json",
            str(tmp_path / "b.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    cached = bench_cache.load(torch.device("cpu"), 8, 32, "auto")
    assert cached["train_images_per_s"] > 0 and cached["inception_images_per_s"] > 0
    assert 0 < cached["fid_fixed_seconds"] < 60
    assert "the reference study (16 configs, default protocol) on this device: " in result.output
    # Inception in fp32 and bf16 on 6 test images against the 16-image reference: the two scores and their gap
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["fid_check_images"] == 6 and b["fid_fp32"] > 0 and b["fid_bf16"] > 0
    assert b["fid_bf16_diff"] == b["fid_bf16"] - b["fid_fp32"] and "FID fp32 / bf16" in result.output
    # --full: one real training with the study's FID protocol scaled down, every phase timed, one table
    r = json.loads((tmp_path / "b.json").read_text())["full"]
    assert r["config"]["schedule"] == "cosine" and r["config"]["epochs"] == 1
    assert set(r["epoch_fids"]) == {"1"} and r["best_epoch"] == 1 and r["best_fid"] > 0
    assert all(
        r["seconds"][k] > 0
        for k in (
            "training",
            "selection_sampling",
            "selection_fid",
            "final_sampling",
            "final_fid",
            "grids",
            "checkpoints",
        )
    )
    assert (
        "full check: cosine, T=200, ddpm, 1 epoch(s)" in result.output and "final FID (best epoch 1)" in result.output
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "bench", "fid-cache"]  # the training: a temp dir
    # one worker: the bench's threads (workers of fewer threads are measured for their own rates)
    result = CliRunner().invoke(
        cli.cli, ["sweep", "--dry-run", "--device", "cpu", "--preset", "smoke", "--workers", "1"]
    )
    assert result.exit_code == 0 and "measuring" not in result.output and "rates: bench of " in result.output
    inception = next(line for line in result.output.splitlines() if line.startswith("Inception "))
    assert "(estimate)" not in inception  # Inception and the FID fixed cost are measured now


def test_flops_per_image_of_the_default_unet():
    """Issue 10's figure, 0.70 GFLOP per evaluation at width 64; a training step is about three forwards (the
    backward computes gradients of both inputs and weights); width 32 is a quarter (channels squared)."""
    from mnist_diff.perf.bench import gflop_per_image

    forward, train = gflop_per_image(64)
    assert forward == pytest.approx(0.7017, abs=1e-4) and train == pytest.approx(2.1042, abs=1e-4)
    assert train / forward == pytest.approx(3.0, abs=0.01)
    assert gflop_per_image(32)[0] == pytest.approx(forward / 4, rel=0.01)


def test_sweep_measures_once_without_a_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(bench_cache.ENV, str(tmp_path / "bench"))
    monkeypatch.chdir(tmp_path)
    args = ["sweep", "--dry-run", "--device", "cpu", "--preset", "smoke", "--schedule", "cosine", "--workers", "1"]
    first = CliRunner().invoke(cli.cli, args)
    assert first.exit_code == 0 and "measuring this device" in first.output, first.output
    assert "rates: quick bench of " in first.output and "4 trials, 2 trainings" in first.output
    assert bench_cache.load(torch.device("cpu"), 8, 32, "auto")["quick"] is True
    second = CliRunner().invoke(cli.cli, args)
    assert second.exit_code == 0 and "measuring" not in second.output
    again = CliRunner().invoke(cli.cli, [*args, "--rebench"])  # measured again without deleting the cache
    assert again.exit_code == 0 and "measuring this device" in again.output, again.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench"]


def test_fit_protocol_takes_the_most_faithful_reduction_that_fits():
    configs = reference_study()
    # Rates where the training alone takes 100 s and one UNet evaluation 1 µs
    rates = Rates(
        train_images_per_s=9_584_640 / 100,
        sample_evaluations_per_s=1e6,
        inception_images_per_s=1e15,
        fid_fixed_seconds=0.0,
    )
    full = sum(workload.project(workload.count(configs), rates).values())
    assert full == pytest.approx(100 + 266.656)
    assert workload.fit_protocol(configs, rates, full) == ((2000, 1, 10000), pytest.approx(full))
    # (1000, 1, 10000): selection 20 x 1000 x 5200 = 104 M evaluations, final 52 M, grids 6.656 M
    (step, seconds) = workload.fit_protocol(configs, rates, full - 1)
    assert step == (1000, 1, 10000) and seconds == pytest.approx(100 + 104 + 52 + 6.656)
    # (1000, 2, 10000) scores epochs 2, 4, ..., 20 (10 of them) and draws their grids only
    step, seconds = workload.fit_protocol(configs, rates, 100 + 104 + 52 + 6.656 - 1)
    assert step == (1000, 2, 10000) and seconds == pytest.approx(100 + 52 + 52 + 6.656 / 2)
    assert workload.fit_protocol(configs, rates, 100) is None  # the training alone takes that long
    # never more work than asked for: a config scoring less keeps its own counts, fid_every 0 stays 0 (its
    # grids are thinned like anyone's)
    small = Config(fid_select_samples=100, fid_every=0, fid_samples=0)
    assert workload.reduce_protocol(small, 1000, 2, 5000) == small.replace(sheet_every=2)
    assert workload.reduce_protocol(small.replace(sheet_every=0), 1000, 2, 5000).sheet_every == 0
    assert workload.reduce_protocol(Config(), 500, 4, 2000).to_dict() == {
        **Config().to_dict(),
        "fid_select_samples": 500,
        "fid_every": 4,
        "fid_samples": 2000,
        "sheet_every": 4,
    }


def test_workers_auto_is_one_per_core_for_the_smoke_preset_on_a_cpu_and_one_otherwise():
    from mnist_diff.study.grid import reference_configs

    configs = reference_configs(Config())  # 16 points, 8 trainings (the samplers share one)
    cpu, cores = torch.device("cpu"), os.cpu_count() or 1
    assert auto_workers(cpu, "smoke", configs) == min(cores, 8)
    assert auto_workers(cpu, "study", configs) == 1
    one_training = [c for c in configs if c.training_key() == configs[0].training_key()]
    assert len(one_training) == 2 and auto_workers(cpu, "smoke", one_training) == 1


def test_the_smoke_projection_is_within_2x_of_the_wall_time(tmp_path, monkeypatch, data_dir, fid_weights):
    """Issue 22, item 11: a narrowed smoke study (cosine, T=200: a DDPM trial that trains, a DDIM trial that
    reuses it) projected from a fresh quick bench, then run: the recorded wall-time projection (phases at a
    timed rate, not a call's start-up, plus the start and per-trial overhead) is within 2x of the wall time."""
    import time

    monkeypatch.setenv(bench_cache.ENV, str(tmp_path / "bench"))
    monkeypatch.setenv("MNIST_DIFF_FID_CACHE", str(tmp_path / "fid-cache"))
    monkeypatch.chdir(tmp_path)
    args = [
        "sweep",
        "--preset",
        "smoke",
        "--schedule",
        "cosine",
        "--timesteps",
        "200",
        "--device",
        "cpu",
        "--study-name",
        "s",
        "--storage",
        f"sqlite:///{tmp_path}/optuna.db",
        "--quiet",
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
        "--out",
        str(tmp_path / "out"),
        *(["--data-dir", data_dir] if data_dir else []),
        *(["--fid-weights", fid_weights] if fid_weights else []),
    ]
    t0 = time.perf_counter()
    result = CliRunner().invoke(cli.cli, args)
    wall = time.perf_counter() - t0
    assert result.exit_code == 0, result.output
    projection = json.loads((tmp_path / "out" / "grid_search_results.json").read_text())["projection"]
    projected = projection.get("wall_seconds") or sum(projection["seconds"].values())
    assert 0.5 < projected / wall < 2, (projected, wall, result.output)
    assert "wall clock" in result.output and "2 trials" in result.output
    entry = bench_cache.load(torch.device("cpu"), 8, 32, "auto")  # what a later sweep reads, and how it was taken
    assert entry["quick"] and min(entry["modes"]["eager"]["train_images_per_s_runs"]) > 0
    assert {"bench_version", "measured_at", "load_average", "cores"} <= set(entry)


def test_a_cached_bench_says_when_it_is_outdated_or_was_measured_under_load():
    import time

    from mnist_diff.perf.bench_cache import BENCH_VERSION

    now = time.time()
    fresh = {"bench_version": BENCH_VERSION, "measured_at": now - 3600, "load_average": 0.4, "cores": 2}
    assert bench_cache.outdated(fresh, now) is None and bench_cache.busy(fresh) is None
    assert bench_cache.outdated({}, now) == f"measured by bench version 1, now {BENCH_VERSION}"  # before versions
    assert bench_cache.outdated({**fresh, "measured_at": now - 40 * 86400}, now) == "measured 40 days ago"
    assert bench_cache.busy({**fresh, "load_average": 5.8}) == "measured under load 5.8 on 2 cores"
