"""`cli.py bench`: training images/s and sampling image-evaluations/s of the default model on one device, eager
and compiled side by side, and the FID engine's Inception images/s and fixed cost per score. Runs the real
training step, the real sampling path and the real FID code (`Trainer`, `generate`, `evaluate`); needs nothing
from the tracking stack, so it runs on a bare GPU machine (Inception needs torch-fidelity and its weights)."""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

from mnist_diff.config import Config
from mnist_diff.diffusion.schedules import make_schedule
from mnist_diff.diffusion.unet import UNet, count_parameters
from mnist_diff.perf import bench_cache, workload
from mnist_diff.runtime import accel
from mnist_diff.runtime.device import configure_backend, effective_precision
from mnist_diff.runtime.generate import generate


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MIN_SECONDS = 0.5  # of measured work per timed repeat: a rate, not the fixed cost of a call


def _median_rate(
    fn, work: float, repeats: int, device, min_seconds: float = MIN_SECONDS
) -> tuple[float, list[float], float]:
    """Run `fn` once to warm up (compilation, graph capture), then `repeats` times, each calling it again until
    `min_seconds` have passed: the median of work/second, every rate, and the seconds of the first call."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    rates = []
    for _ in range(repeats):
        calls, t0 = 0, time.perf_counter()
        while True:
            fn()
            _sync(device)
            calls += 1
            seconds = time.perf_counter() - t0
            if seconds >= min_seconds:
                break
        rates.append(work * calls / seconds)
    return statistics.median(rates), rates, first


def _bench_mode(
    device,
    compile: str,
    *,
    channels,
    batch_size,
    train_steps,
    sample_batch,
    sample_steps,
    repeats,
    precision,
    fused="auto",
) -> dict:
    from mnist_diff.runtime.data import to_model_range
    from mnist_diff.training.trainer import Trainer

    config = Config(
        channels=channels, batch_size=batch_size, precision=precision, compile=compile, fused=fused, warmup_steps=10**9
    )  # a tiny, constant-ish lr: the weights stay sane over many steps
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 1, 28, 28), dtype=torch.uint8, generator=gen).to(device)
    with tempfile.TemporaryDirectory() as tmp:  # the trainer writes nothing until fit(); a folder it may own
        trainer = Trainer(config, images, tmp, progress=False)
        x0 = to_model_range(images)
        trainer.model.train()

        def train_burst():
            for _ in range(train_steps):
                trainer._train_step(x0)  # the real step: forward, backward, clipping, AdamW, EMA

        train_ips, train_runs, train_first = _median_rate(train_burst, train_steps * batch_size, repeats, device)
        model = trainer.sampling_model
        out = {
            "train_images_per_s": train_ips,
            "train_images_per_s_runs": train_runs,
            "train_first_call_s": train_first,
        }
        schedules = {
            "ddpm": make_schedule("linear", sample_steps, 1e-4, 0.2),  # only the step count matters
            "ddim": make_schedule("linear", 1000),
        }
        runs = [(name, name, sample_batch) for name in schedules]
        if sample_batch > SMALL_SAMPLE_BATCH:  # a grid's batch: its steps are latency-bound (workload.Rates)
            runs.append(("ddpm_small", "ddpm", SMALL_SAMPLE_BATCH))
        for key, name, batch in runs:

            def burst():
                generate(
                    model,
                    schedules[name],
                    num=batch,
                    seed=0,
                    sampler=name,
                    ddim_steps=sample_steps,
                    batch_size=batch,
                    precision=precision,
                    progress=False,
                    compile=compile,
                )

            rate, _, first = _median_rate(burst, batch * sample_steps, repeats, device)
            out[f"{key}_image_steps_per_s"], out[f"{key}_first_call_s"] = rate, first
    return out


SMALL_SAMPLE_BATCH = 64  # Config.sheet_images: the sampling batch of an epoch's grid alone
INCEPTION_IMAGES = {"cuda": 4000, "cpu": 16}  # per timed repeat: several Inception batches on a GPU
SCORE_IMAGES = 2000  # the selection FID's size: the fixed cost is timed on a set this big (the n x n path)


def bench_inception(
    device: torch.device, *, weights_path=None, batch_size: int | None = None, repeats: int = 5
) -> dict:
    """Inception images/s (uint8 images already on the device, as the study feeds them) and the fixed cost of
    one FID score besides its images: the Fréchet distance of a 2,000-image set against cached statistics."""
    from mnist_diff.fid.engine import (
        default_batch_size,
        frechet_distance,
        inception_features,
    )

    batch_size = batch_size or default_batch_size(device)
    n = INCEPTION_IMAGES.get(device.type, INCEPTION_IMAGES["cpu"])
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=gen).to(device)
    rate, runs, first = _median_rate(
        lambda: inception_features(images, weights_path=weights_path, device=device, batch_size=batch_size),
        n,
        repeats,
        device,
    )
    # Statistics as a cached reference holds them (float64 on the math device), features as a score makes them.
    math_device = device if device.type == "cuda" else torch.device("cpu")
    ref = torch.randn(4096, 2048, generator=gen, dtype=torch.float64).to(math_device)
    mu, sigma = ref.mean(0), torch.cov(ref.T)
    features = torch.randn(SCORE_IMAGES, 2048, generator=gen).to(device)
    seconds = []
    for _ in range(repeats + 1):  # the first warms up the linear-algebra kernels
        _sync(device)
        t0 = time.perf_counter()
        frechet_distance(mu, sigma, features)  # returns a Python float: includes the sync
        seconds.append(time.perf_counter() - t0)
    return {
        "inception_images_per_s": rate,
        "inception_images_per_s_runs": runs,
        "inception_first_call_s": first,
        "inception_batch": batch_size,
        "fid_fixed_seconds": statistics.median(seconds[1:]),
    }


FUSED_CHECK_BATCH = 16


def fused_check(device: torch.device, *, channels: int, precision: str, fused: str = "auto") -> dict:
    """`fused` as a run resolves it on this device (`accel.use_fused`, its check included) and
    `fused_max_abs_diff`: max |fused - eager| of the UNet's output on one batch at random timesteps, at the
    bench precision, eagerly. The layers that start at zero (each block's last convolution, attention's output)
    get random weights first, or most of the network would take no part in the comparison. None where the fused
    forward cannot run here."""
    from mnist_diff.runtime.device import autocast

    torch.manual_seed(0)
    model = UNet(channels=channels)
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
            m.reset_parameters()
    model = accel.use_fused(accel.device_layout(model.to(device)).eval().requires_grad_(False), fused, precision)
    resolved = model.fused
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(FUSED_CHECK_BATCH, 1, 28, 28, generator=gen).to(device)
    t = torch.randint(0, 1000, (FUSED_CHECK_BATCH,), generator=gen).to(device)
    outs = {}
    try:
        with torch.no_grad(), autocast(device, precision):
            for flag in (False, True):
                model.fused = flag
                outs[flag] = model(x, t).float()
    except Exception:  # the fused forward cannot run here: `use_fused` warned, runs use the eager one
        pass
    diff = (outs[True] - outs[False]).abs().max().item() if True in outs else None
    return {"fused": resolved, "fused_max_abs_diff": diff}


def gflop_per_image(channels: int) -> tuple[float, float]:
    """GFLOP of the UNet per image: (a forward pass, a training step's forward and backward), as
    torch.utils.flop_counter counts them (convolutions and matrix products; 2 per multiply-add), at batch 1
    on a CPU copy. Rates times these give the FLOP rate a device sustains."""
    from torch.utils.flop_counter import FlopCounterMode

    model = UNet(channels=channels)
    x, t = torch.zeros(1, 1, 28, 28), torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as forward:
        with torch.no_grad():
            model(x, t)
    with FlopCounterMode(display=False) as step:
        model(x, t).sum().backward()
    return forward.get_total_flops() / 1e9, step.get_total_flops() / 1e9


def run_bench(
    device: torch.device,
    *,
    channels: int = 64,
    batch_size: int = 128,
    train_steps: int = 20,
    sample_batch: int | None = None,
    sample_steps: int = 20,
    repeats: int = 5,
    precision: str = "auto",
    compile: str = "auto",
    inception: bool = True,
    fid_weights=None,
    fid_batch_size: int | None = None,
    fused: str = "auto",
) -> dict:
    """Eager always; compiled too when `compile` is on (auto: on CUDA). The top-level rates are those a run
    with this `compile` setting gets (compiled if it was measured and did not fall back). `inception`: also the
    FID engine's rates; where torch-fidelity or its weights can't be had, `inception_error` says why."""
    # what else ran meanwhile: the 1-minute load average before measuring (this process has not loaded it yet)
    load, measured_at = os.getloadavg()[0], time.time()
    torch.manual_seed(0)
    configure_backend(device)  # the flags every command sets, so the numbers are the ones users get
    sample_batch = sample_batch or accel.default_sample_batch_size(device, channels)
    kwargs = dict(
        channels=channels,
        batch_size=batch_size,
        train_steps=train_steps,
        sample_batch=sample_batch,
        sample_steps=sample_steps,
        repeats=repeats,
        precision=precision,
        fused=fused,
    )
    modes = {"eager": _bench_mode(device, "off", **kwargs)}
    if accel.compile_enabled(compile, device):
        modes["compiled"] = _bench_mode(device, "on", **kwargs)
        modes["compiled"]["fell_back"] = accel.fell_back()
    used = modes.get("compiled", modes["eager"])
    fid = {}
    if inception:
        try:
            fid = bench_inception(device, weights_path=fid_weights, batch_size=fid_batch_size, repeats=repeats)
        except Exception as err:  # e.g. offline without a weights file: the training/sampling rates still stand
            fid = {"inception_error": f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"}
    return {
        "device": bench_cache.device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "precision": effective_precision(device, precision),
        "channels": channels,
        "parameters": count_parameters(UNet(channels=channels)),
        **dict(zip(("forward_gflop", "train_gflop"), gflop_per_image(channels))),
        "train_batch": batch_size,
        "sample_batch": sample_batch,
        "sample_steps": sample_steps,
        "repeats": repeats,
        **{k: used[k] for k in ("train_images_per_s", "ddpm_image_steps_per_s", "ddim_image_steps_per_s")},
        **(
            {
                "small_sample_batch": SMALL_SAMPLE_BATCH,
                "ddpm_small_image_steps_per_s": used["ddpm_small_image_steps_per_s"],
            }
            if "ddpm_small_image_steps_per_s" in used
            else {}
        ),
        "modes": modes,
        **fused_check(device, channels=channels, precision=precision, fused=fused),
        **fid,
        "bench_version": bench_cache.BENCH_VERSION,
        "measured_at": measured_at,
        "load_average": load,
        "cores": os.cpu_count(),
    }


def format_table(r: dict) -> str:
    modes = r["modes"]
    head = [
        ("device", f"{r['device']} ({r['device_type']}, {r['precision']}, torch {r['torch']})"),
        ("model", f"UNet channels={r['channels']}, {r['parameters'] / 1e6:.2f}M parameters"),
    ]
    width = max(len(k) for k, _ in head)
    lines = [f"{k:<{width}}  {v}" for k, v in head]
    rows = [
        ("train images/s", "train_images_per_s", f"batch {r['train_batch']}"),
        ("DDPM image-evaluations/s", "ddpm_image_steps_per_s", f"batch {r['sample_batch']}"),
        ("DDIM image-evaluations/s", "ddim_image_steps_per_s", f"batch {r['sample_batch']}"),
    ]
    names = list(modes)
    if all("ddpm_small_image_steps_per_s" in modes[n] for n in names):
        rows.append(("DDPM image-evaluations/s", "ddpm_small_image_steps_per_s", f"batch {SMALL_SAMPLE_BATCH}"))
    lines.append(
        f"{'measure':<26}"
        + "".join(f"{n:>14}" for n in names)
        + "   (first call s: "
        + ", ".join(names)
        + f"; median of {r['repeats']})"
    )
    for label, key, note in rows:
        first = key.replace("image_steps_per_s", "first_call_s").replace("images_per_s", "first_call_s")
        lines.append(
            f"{label:<26}"
            + "".join(f"{modes[n][key]:>14,.0f}" for n in names)
            + f"   {note}; "
            + ", ".join(f"{modes[n][first]:.1f}" for n in names)
        )
    if "forward_gflop" in r:

        def tflops(n: str) -> str:
            train = modes[n]["train_images_per_s"] * r["train_gflop"] / 1e3
            return f"{train:.1f} / {modes[n]['ddpm_image_steps_per_s'] * r['forward_gflop'] / 1e3:.1f}"

        lines.append(
            f"{'TFLOP/s train / sample':<26}"
            + "".join(f"{tflops(n):>14}" for n in names)
            + f"   at {r['train_gflop']:.2f} and {r['forward_gflop']:.2f} GFLOP an image (DDPM)"
        )
    if "ddpm_small_image_steps_per_s" in r:
        rates = workload.rates_from_bench(r, r["device_type"])
        lines.append(
            f"{'sampler step latency':<26}{rates.sample_step_seconds * 1000:>12,.2f}ms   fixed cost of a batch "
            f"step, from batches {SMALL_SAMPLE_BATCH} and {r['sample_batch']}: what small batches pay"
        )
    if "inception_images_per_s" in r:
        lines.append(
            f"{'Inception images/s':<26}{r['inception_images_per_s']:>14,.0f}   batch {r['inception_batch']}; "
            f"first call {r['inception_first_call_s']:.1f} s"
        )
        lines.append(
            f"{'FID fixed cost per score':<26}{r['fid_fixed_seconds'] * 1000:>12,.1f}ms   "
            f"Fréchet distance of {SCORE_IMAGES:,} images' features vs cached statistics"
        )
    elif "inception_error" in r:
        lines.append(f"Inception not measured: {r['inception_error']}")
    if "fused_max_abs_diff" in r:
        diff = r["fused_max_abs_diff"]
        lines.append(
            f"{'fused forward':<26}{'on' if r['fused'] else 'off':>14}   max |fused - eager| of the output: "
            + (f"{diff:.2e} ({r['precision']}, batch {FUSED_CHECK_BATCH})" if diff is not None else "cannot run here")
        )
    failed = modes.get("compiled", {}).get("fell_back")
    if failed:
        lines.append(f"compiled fell back to eager for: {', '.join(failed)} (see the warning above)")
    return "\n".join(lines)


# -- bench --full: the whole GPU path once ---------------------------------------------------------------------

FULL_CONFIG = dict(schedule="cosine", timesteps=200, beta_end=0.08, sampler="ddpm")  # a study config


def full_config(**fields) -> Config:
    """The config `run_full` trains: `FULL_CONFIG` with `fields`; ValueError when they are invalid."""
    return Config(**FULL_CONFIG, **fields)


def run_full(
    device: torch.device,
    out_dir,
    *,
    data_dir=None,
    fid_weights=None,
    epochs: int = 2,
    fid_select_samples: int = 2000,
    fid_samples: int = 10000,
    train_samples: int | None = None,
    fid_ref_samples: int | None = None,
    channels: int = 64,
    batch_size: int = 128,
    precision: str = "auto",
    compile: str = "auto",
    progress: bool = True,
) -> dict:
    """One real training of a study config (`FULL_CONFIG`) for `epochs` epochs with the study's FID protocol
    scaled down to those epochs (a selection FID after every epoch), then the final FID of the best epoch on
    `fid_samples` new images: the study's code path end to end, with seconds per phase."""
    from mnist_diff.fid.engine import Reference, ensure_reference_stats
    from mnist_diff.runtime import timing
    from mnist_diff.runtime.data import load_mnist
    from mnist_diff.training.experiment import run_experiment

    config = full_config(
        epochs=epochs,
        batch_size=batch_size,
        channels=channels,
        precision=precision,
        compile=compile,
        fid_select_samples=fid_select_samples,
        fid_samples=fid_samples,
        train_samples=train_samples,
        fid_ref_samples=fid_ref_samples,
    )
    configure_backend(device)
    reference = Reference("train", fid_ref_samples, data_dir, fid_weights)
    t0 = time.perf_counter()
    images = load_mnist(data_dir, train=True, limit=train_samples, device=device)
    ensure_reference_stats(reference, device=device)
    setup = time.perf_counter() - t0
    timing.reset()
    t0 = time.perf_counter()
    result = run_experiment(config, images, out_dir, reference=reference, progress=progress)
    wall = time.perf_counter() - t0
    return {
        "config": config.to_dict(),
        "out_dir": str(out_dir),
        "setup_seconds": setup,
        "wall_seconds": wall,
        "seconds": timing.totals(wall_seconds=wall),
        "train_images_per_s": result.steps * batch_size / max(result.train_seconds, 1e-9),
        "epoch_fids": result.epoch_fids,
        "best_epoch": result.best_epoch,
        "best_fid": result.best_fid,
    }


def format_full(full: dict) -> str:
    c = full["config"]
    lines = [
        f"full check: {c['schedule']}, T={c['timesteps']}, {c['sampler']}, {c['epochs']} epoch(s) of "
        f"{c['train_samples'] or 'all'} images at batch {c['batch_size']}; selection FID on "
        f"{c['fid_select_samples']:,} images after every epoch, final FID on {c['fid_samples']:,} images",
        f"{'MNIST + reference statistics':<30}{full['setup_seconds']:>10.1f} s",
        *(f"{k.replace('_', ' '):<30}{v:>10.1f} s" for k, v in full["seconds"].items()),
        f"{'total':<30}{full['wall_seconds']:>10.1f} s",
        f"{'training images/s':<30}{full['train_images_per_s']:>10,.0f}",
        f"{'selection FID per epoch':<30}  " + ", ".join(f"{e}: {v:.2f}" for e, v in full["epoch_fids"].items()),
    ]
    if full["best_fid"] is not None:
        lines.append(f"{'final FID (best epoch ' + str(full['best_epoch']) + ')':<30}{full['best_fid']:>10.2f}")
    return "\n".join(lines)


def quick_bench(device, channels: int, batch_size: int, precision: str) -> dict:
    """A short bench (seconds: three timed repeats of MIN_SECONDS per figure), cached; marked `quick`."""
    device = torch.device(device)
    gpu = device.type != "cpu"
    result = run_bench(
        device,
        channels=channels,
        batch_size=batch_size,
        precision=precision,
        train_steps=20 if gpu else 2,
        sample_batch=500 if gpu else 64,
        sample_steps=20 if gpu else 2,
        repeats=3,
        inception=False,
    )  # it may need a download: the projection labels it an estimate
    result["quick"] = True
    bench_cache.save(result, device, precision)
    return result
