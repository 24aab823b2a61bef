"""`bench`'s steady-state sampling fit, its fixed costs in the projection, concurrent training, the Inception
precision check, and the JSON fields a later `sweep` reads back (old cached entries included)."""

import json

import pytest
import torch
from click.testing import CliRunner

import cli
from mnist_diff.perf import bench_cache, workload
from mnist_diff.perf.workload import Rates


def test_two_pass_lengths_give_the_fixed_cost_and_the_rate_per_step():
    # passes of 4 and 20 steps taking 1.0 s and 3.0 s: 0.125 s a step, 0.5 s a pass (binary-exact numbers)
    assert workload.fit_pass_time(4, 1.0, 20, 3.0) == (0.5, 0.125)
    assert workload.fit_pass_time(20, 3.0, 4, 1.0) == (0.5, 0.125)  # either order
    assert workload.fit_pass_time(100, 1.5, 1000, 6.0) == pytest.approx((1.0, 0.005))  # 1 s + 5 ms a step
    # noise past sense: no negative fixed cost, no non-positive slope; each step then costs the long pass's mean
    assert workload.fit_pass_time(2, 0.1, 4, 0.4) == (0.0, 0.1)
    assert workload.fit_pass_time(2, 0.5, 4, 0.4) == (0.0, 0.1)
    with pytest.raises(ValueError, match="two pass lengths"):
        workload.fit_pass_time(4, 1.0, 4, 2.0)


def test_short_pass_is_a_tenth_of_the_long_one():
    from mnist_diff.perf.bench import short_pass_steps

    assert [short_pass_steps(k) for k in (3, 5, 50, 1000)] == [2, 2, 5, 100]
    with pytest.raises(ValueError):
        short_pass_steps(2)


def test_each_sampling_pass_is_charged_its_fixed_cost():
    r = Rates(100.0, 100.0, 4.0, 0.0, sample_batch=50, sample_pass_seconds=0.5)
    # 120 images at batch 50: passes of 50, 50 and 20 images; 10 steps each: 120 x 10 / 100 s + 3 passes x 0.5 s
    assert r.sampling_seconds(120, 10) == pytest.approx(12.0 + 1.5)
    assert Rates(100.0, 100.0, 4.0, 0.0, sample_batch=50).sampling_seconds(120, 10) == pytest.approx(12.0)


def test_the_projection_adds_each_workers_start_and_compiling():
    r = Rates(100.0, 100.0, 4.0, 0.0, worker_start_seconds=4.0, compile_seconds=30.0)
    assert workload.worker_seconds(r) == 34.0
    # two widths: one start per worker, each model compiled
    assert workload.worker_seconds({(8,): r, (64,): Rates(1.0, 1.0, 1.0, 0.0, compile_seconds=20.0)}) == 54.0
    seconds = {"training": 100.0, "grids": 20.0}
    assert workload.wall_seconds(seconds, 4, parallel=2, worker=34.0) == pytest.approx(
        workload.START_SECONDS + 34.0 + (120.0 + 4 * workload.TRIAL_OVERHEAD_SECONDS) / 2
    )
    table = workload.format_table([workload.Config(epochs=1)], r)
    line = next(line for line in table.splitlines() if line.startswith("worker start"))
    assert "34 s" in line and "4.0 s process start + 30.0 s compiling" in line


def test_trials_at_once_shorten_only_the_training_by_the_measured_speedup():
    speedups = workload.concurrent_speedups({"1": 100.0, "2": 160.0})
    assert speedups == {1: 1.0, 2: 1.6}
    r = Rates(100.0, 100.0, 4.0, 0.0, concurrent_training=speedups)
    assert (r.training_speedup(1), r.training_speedup(2), r.training_speedup(4)) == (1.0, 1.6, 1.0)  # 4: unmeasured
    seconds = {"training": 160.0, "grids": 20.0}
    one, two = (workload.wall_seconds(seconds, 4, worker=0.0, training_speedup=x) for x in (1.0, 1.6))
    assert one - two == pytest.approx(160.0 - 100.0)
    table = workload.format_table([workload.Config(epochs=1)], r, trials_per_worker=2)
    assert "2 trials at once in each (training 1.60x as measured)" in table
    assert "no training gain measured" in workload.format_table([workload.Config(epochs=1)], r, trials_per_worker=4)


def test_an_old_cached_bench_still_projects(tmp_path, monkeypatch):
    """A version-2 entry (no steady state, no fixed costs) reads back and projects as before: its sampling rate is
    the samplers' mean, no cost per pass, no compile seconds, the worker start an estimate."""
    monkeypatch.setenv(bench_cache.ENV, str(tmp_path / "bench"))
    old = {
        "channels": 8,
        "train_batch": 32,
        "train_images_per_s": 100.0,
        "ddpm_image_steps_per_s": 300.0,
        "ddim_image_steps_per_s": 500.0,
        "bench_version": 2,
    }
    bench_cache.save(old, torch.device("cpu"), "auto")
    entry = bench_cache.load(torch.device("cpu"), 8, 32, "auto")
    assert bench_cache.outdated(entry) == f"measured by bench version 2, now {bench_cache.BENCH_VERSION}"
    r = workload.rates_from_bench(entry, "cpu")
    assert (r.sample_evaluations_per_s, r.sample_pass_seconds, r.compile_seconds) == (400.0, 0.0, 0.0)
    assert r.worker_start_seconds == workload.WORKER_START_SECONDS_ESTIMATE and "worker_start_seconds" in r.estimated
    new = {**old, "sample_image_steps_per_s": 350.0, "sample_pass_fixed_s": 0.25, "compile_s": 12.0}
    r = workload.rates_from_bench({**new, "worker_start_s": 2.5}, "cpu")
    assert (r.sample_evaluations_per_s, r.sample_pass_seconds, r.compile_seconds) == (350.0, 0.25, 12.0)
    assert r.worker_start_seconds == 2.5 and "worker_start_seconds" not in r.estimated


def test_bench_json_carries_the_steady_state_fixed_costs_and_concurrent_training():
    from mnist_diff.perf.bench import format_table, run_bench

    r = run_bench(
        torch.device("cpu"),
        channels=8,
        batch_size=8,
        train_steps=1,
        sample_batch=80,
        sample_steps=4,
        repeats=1,
        compile="off",
        precision="fp32",  # quicker to start than bf16 on a CPU
        inception=False,
        worker_start=False,
        concurrent=(2,),
    )
    assert r["bench_version"] == bench_cache.BENCH_VERSION
    assert r["sample_pass_steps"] == [2, 4] and len(r["sample_pass_seconds"]) == 2
    assert r["sample_pass_fixed_s"] >= 0 and r["sample_image_steps_per_s"] > 0
    assert r["small_sample_pass_fixed_s"] >= 0 and r["small_sample_image_steps_per_s"] > 0
    assert r["compile_s"] >= 0 and "worker_start_s" not in r
    assert set(r["train_concurrent_images_per_s"]) == {"2"} and r["train_concurrent_images_per_s"]["2"] > 0
    # the fit is the pure function's on the timed passes
    (k1, k2), (t1, t2) = r["sample_pass_steps"], r["sample_pass_seconds"]
    fixed, per_step = workload.fit_pass_time(k1, t1, k2, t2)
    assert r["sample_pass_fixed_s"] == fixed and r["sample_image_steps_per_s"] == pytest.approx(80 / per_step)
    rates = workload.rates_from_bench(json.loads(json.dumps(r)), "cpu")  # as the cache gives it back
    assert rates.sample_pass_seconds == fixed and rates.compile_seconds == r["compile_s"]
    # the grid's batch (64) measured beside the bench's for the step latency, at its steady rate
    assert r["small_sample_batch"] == 64 and r["ddpm_small_image_steps_per_s"] > 0
    small_step = 64 / r["small_sample_image_steps_per_s"]
    assert rates.sample_batch == 80 and 0 <= rates.sample_step_seconds <= small_step
    table = format_table(r)
    assert "sampler step latency" in table and "batch 64" in table and "TFLOP/s train / sample" in table
    assert "DDPM steady state" in table and "from passes of 2 and 4 steps" in table
    assert "train images/s, N at once" in table and "worker start" in table


def test_inception_precision_is_checked_by_name():
    from mnist_diff.fid.engine import inception_features

    with pytest.raises(ValueError, match="unknown Inception precision 'fp16'"):
        inception_features(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), precision="fp16")


def test_bench_option_lists():
    result = CliRunner().invoke(cli.cli, ["bench", "--concurrent", "1,x"])
    assert result.exit_code == 2 and "is not a comma list of counts >= 1" in result.output
    result = CliRunner().invoke(cli.cli, ["bench", "--sample-steps", "2"])
    assert result.exit_code == 2 and "--sample-steps" in result.output
