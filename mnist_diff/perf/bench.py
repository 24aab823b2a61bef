"""`cli.py bench`: training images/s and sampling image-evaluations/s of the default model on one device, eager
and compiled side by side, and the FID engine's Inception images/s and fixed cost per score. Runs the real
training step, the real sampling path and the real FID code (`Trainer`, `generate`, `evaluate`); needs nothing
from the tracking stack, so it runs on a bare GPU machine (Inception needs torch-fidelity and its weights)."""

from __future__ import annotations

import contextlib
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
        short = short_pass_steps(sample_steps)
        schedules = {  # DDPM: only the step count matters
            "ddpm": make_schedule("linear", sample_steps, 1e-4, 0.2),
            "ddpm_short": make_schedule("linear", short, 1e-4, 0.2),
            "ddim": make_schedule("linear", 1000),
        }
        runs = [(name, name, sample_batch) for name in schedules]
        if sample_batch > SMALL_SAMPLE_BATCH:  # a grid's batch: its steps are latency-bound (workload.Rates)
            runs += [("ddpm_small", "ddpm", SMALL_SAMPLE_BATCH), ("ddpm_small_short", "ddpm_short", SMALL_SAMPLE_BATCH)]
        for key, name, batch in runs:
            schedule = schedules[name]
            sampler = name.removesuffix("_short")

            def burst():
                generate(
                    model,
                    schedule,
                    num=batch,
                    seed=0,
                    sampler=sampler,
                    ddim_steps=sample_steps,
                    batch_size=batch,
                    precision=precision,
                    progress=False,
                    compile=compile,
                )

            steps = schedule.timesteps if sampler == "ddpm" else sample_steps
            rate, _, first = _median_rate(burst, batch * steps, repeats, device)
            out[f"{key}_image_steps_per_s"], out[f"{key}_first_call_s"] = rate, first
        # The steady state: the two DDPM pass lengths' times split into a fixed cost per pass and a rate per step
        for key, batch in (("", sample_batch), ("small_", SMALL_SAMPLE_BATCH)):
            if f"ddpm_{key}short_image_steps_per_s" not in out:
                continue
            long_s = batch * sample_steps / out[f"ddpm_{key}image_steps_per_s"]
            short_s = batch * short / out[f"ddpm_{key}short_image_steps_per_s"]
            fixed, per_step = workload.fit_pass_time(short, short_s, sample_steps, long_s)
            out[f"{key}sample_pass_steps"], out[f"{key}sample_pass_seconds"] = [short, sample_steps], [short_s, long_s]
            out[f"{key}sample_pass_fixed_s"], out[f"{key}sample_image_steps_per_s"] = fixed, batch / per_step
        # Compiling and warming up, once per worker process: each measured call's first time beyond its steady one
        first_calls = [("train", train_steps * batch_size), ("ddpm", sample_batch * sample_steps)]
        if "ddpm_small_first_call_s" in out:
            first_calls.append(("ddpm_small", SMALL_SAMPLE_BATCH * sample_steps))
        steady = {"train": "train_images_per_s"}
        out["compile_s"] = sum(
            max(0.0, out[f"{k}_first_call_s"] - work / out[steady.get(k, f"{k}_image_steps_per_s")])
            for k, work in first_calls
        )
    return out


def short_pass_steps(steps: int) -> int:
    """The short sampling pass beside a long one of `steps` (at least 3): a tenth of it, at least 2 steps."""
    if steps < 3:
        raise ValueError(f"the long sampling pass needs at least 3 steps, got {steps}")
    return max(2, steps // 10)


SMALL_SAMPLE_BATCH = 64  # Config.sheet_images: the sampling batch of an epoch's grid alone
INCEPTION_IMAGES = {"cuda": 4000, "cpu": 16}  # per timed repeat: several Inception batches on a GPU
SCORE_IMAGES = 2000  # the selection FID's size: the fixed cost is timed on a set this big (the n x n path)


def bench_inception(
    device: torch.device,
    *,
    weights_path=None,
    batch_size: int | None = None,
    repeats: int = 5,
    precision: str = "fp32",
) -> dict:
    """Inception images/s (uint8 images already on the device, as the study feeds them; at `precision`, see
    `fid.engine.inception_features`) and the fixed cost of one FID score besides its images: the Fréchet
    distance of a 2,000-image set against cached statistics."""
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
        lambda: inception_features(
            images, weights_path=weights_path, device=device, batch_size=batch_size, precision=precision
        ),
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
        "inception_precision": precision,
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


FID_BF16_TOLERANCE = 0.05  # |FID bf16 - FID fp32| on 10,000 images, measured on the GPU, for bf16 to be the default
FID_BF16_CHECK_IMAGES = 10_000


def fid_precision_check(
    device: torch.device,
    images: int,
    *,
    data_dir=None,
    fid_weights=None,
    fid_ref_samples: int | None = None,
    batch_size: int | None = None,
) -> dict:
    """FID of the first `images` MNIST test images against the reference statistics (the training split, or its
    first `fid_ref_samples`), with Inception in fp32 and in bf16 (`fid.engine.inception_features`): whether bf16
    changes the scores. bf16 may become the default only where |fid_bf16_diff| <= FID_BF16_TOLERANCE on
    FID_BF16_CHECK_IMAGES images on the GPU (docs/speed.md)."""
    from mnist_diff.fid.engine import Reference, compute_fid, ensure_reference_stats
    from mnist_diff.runtime.data import load_mnist

    reference = Reference("train", fid_ref_samples, data_dir, fid_weights)
    ensure_reference_stats(reference, device=device)
    real = load_mnist(data_dir, train=False, limit=images, device=device)
    out = {"fid_check_images": int(real.shape[0]), "fid_check_reference": reference.cache_name()}
    for precision in ("fp32", "bf16"):
        score = compute_fid(real, reference, device=device, batch_size=batch_size, precision=precision)
        out[f"fid_{precision}"], out[f"fid_{precision}_seconds"] = score["fid"], score["fid_seconds"]
    out["fid_bf16_diff"] = out["fid_bf16"] - out["fid_fp32"]
    out["fid_bf16_within_tolerance"] = abs(out["fid_bf16_diff"]) <= FID_BF16_TOLERANCE
    return out


WORKER_MODULES = ("mnist_diff.study.worker",)  # what a study's spawned worker process imports before its work
FALLBACK_WORKER_MODULES = ("mnist_diff.training.experiment", "mnist_diff.fid.engine")  # without the tracking stack


def time_worker_start(device_type: str = "cpu") -> float:
    """Seconds for a fresh Python process to start and import what a study worker imports, and on CUDA to
    create its CUDA context (the shorter of two; the first may read the files from disk). Without the tracking
    stack (a bare GPU machine): the training and FID modules alone."""
    import subprocess
    import sys

    code = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)\n"
    if device_type == "cuda":
        code += "import torch\ntorch.zeros(1, device='cuda')\n"

    def once(modules) -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code, *modules], check=True, capture_output=True, timeout=300)
        return time.perf_counter() - t0

    try:
        seconds = [once(WORKER_MODULES) for _ in range(2)]
    except subprocess.CalledProcessError:
        seconds = [once(FALLBACK_WORKER_MODULES) for _ in range(2)]
    return min(seconds)


def bench_concurrent(
    device: torch.device,
    counts,
    *,
    channels: int,
    batch_size: int,
    train_steps: int,
    repeats: int,
    precision: str,
    compile: str = "off",
) -> dict[str, float]:
    """{N: aggregate training images/s} of N independent training loops at once in this process, for each N in
    `counts`: each loop in its own thread with its own model, optimizer and noise generator (its own `Trainer`)
    and, on CUDA, its own stream. Whether several studies' workers could share one device profitably. Keys are
    strings (as JSON keeps them)."""
    import threading

    from mnist_diff.runtime.data import to_model_range
    from mnist_diff.training.trainer import Trainer

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 1, 28, 28), dtype=torch.uint8, generator=gen).to(device)
    x0 = to_model_range(images)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            loops = []
            for i in range(n):
                config = Config(
                    channels=channels,
                    batch_size=batch_size,
                    precision=precision,
                    compile=compile,
                    warmup_steps=10**9,
                    seed=i,
                )
                trainer = Trainer(config, images, os.path.join(tmp, str(i)), progress=False)
                trainer.model.train()
                stream = torch.cuda.Stream(device) if device.type == "cuda" else None
                loops.append((trainer, stream))

            def run(trainer, stream, steps, errors):
                try:
                    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                        for _ in range(steps):
                            trainer._train_step(x0)
                    if stream is not None:
                        stream.synchronize()
                except BaseException as err:  # raised in the caller's thread
                    errors.append(err)

            def burst(loops=loops):
                errors = []
                threads = [threading.Thread(target=run, args=(t, s, train_steps, errors)) for t, s in loops]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                if errors:
                    raise errors[0]

            out[str(n)] = _median_rate(burst, n * train_steps * batch_size, repeats, device)[0]
    return out


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"


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
    fid_precision: str = "fp32",
    worker_start: bool = True,
    concurrent: tuple[int, ...] = (),
) -> dict:
    """Eager always; compiled too when `compile` is on (auto: on CUDA). The top-level rates are those a run
    with this `compile` setting gets (compiled if it was measured and did not fall back). `inception`: also the
    FID engine's rates (Inception at `fid_precision`); where torch-fidelity or its weights can't be had,
    `inception_error` says why. `worker_start`: also time a worker process's start (`time_worker_start`).
    `concurrent`: also the aggregate training rate of that many training loops at once (`bench_concurrent`)."""
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
            fid = bench_inception(
                device, weights_path=fid_weights, batch_size=fid_batch_size, repeats=repeats, precision=fid_precision
            )
        except Exception as err:  # e.g. offline without a weights file: the training/sampling rates still stand
            fid = {"inception_error": f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"}
    extra = {}
    if worker_start:
        try:
            extra["worker_start_s"] = time_worker_start(device.type)
        except Exception as err:  # the projection then takes its estimate
            extra["worker_start_error"] = _one_line(err)
    if concurrent:
        compiled = "on" if "compiled" in modes and not modes["compiled"].get("fell_back") else "off"
        try:
            extra["train_concurrent_images_per_s"] = bench_concurrent(
                device,
                concurrent,
                channels=channels,
                batch_size=batch_size,
                train_steps=train_steps,
                repeats=repeats,
                precision=precision,
                compile=compiled,
            )
        except Exception as err:  # e.g. compiling from several threads: the other figures still stand
            extra["train_concurrent_error"] = _one_line(err)
    steady = [
        k
        for k in (
            "sample_image_steps_per_s",
            "sample_pass_fixed_s",
            "sample_pass_steps",
            "sample_pass_seconds",
            "small_sample_image_steps_per_s",
            "small_sample_pass_fixed_s",
            "compile_s",
        )
        if k in used
    ]
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
        **{k: used[k] for k in steady},
        **extra,
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
    if "sample_pass_fixed_s" in r:
        k1, k2 = r["sample_pass_steps"]
        lines.append(
            f"{'DDPM steady state':<26}{r['sample_image_steps_per_s']:>14,.0f}   image-evaluations/s at batch "
            f"{r['sample_batch']}, + {r['sample_pass_fixed_s'] * 1000:,.1f} ms fixed a pass (from passes of "
            f"{k1} and {k2} steps)"
        )
    if "compile_s" in r or "worker_start_s" in r:
        start = f"{r['worker_start_s']:.1f} s" if "worker_start_s" in r else "not measured"
        lines.append(
            f"{'worker start':<26}{start:>14}   process start and imports; + {r.get('compile_s', 0):.1f} s "
            "compiling and first calls"
        )
    if "train_concurrent_images_per_s" in r:
        lines.append(
            f"{'train images/s, N at once':<26}  "
            + ", ".join(f"{n}: {v:,.0f}" for n, v in r["train_concurrent_images_per_s"].items())
            + " (aggregate of N training loops, one thread and stream each)"
        )
    elif "train_concurrent_error" in r:
        lines.append(f"concurrent training not measured: {r['train_concurrent_error']}")
    if "projected_reference_study_s" in r:
        lines.append(
            f"{'reference study':<26}{workload.format_duration(r['projected_reference_study_s']):>14}   "
            "projected wall clock of the 16 configs, default protocol, one worker (`sweep --dry-run`)"
        )
    if "inception_images_per_s" in r:
        lines.append(
            f"{'Inception images/s':<26}{r['inception_images_per_s']:>14,.0f}   batch {r['inception_batch']}, "
            f"{r.get('inception_precision', 'fp32')}; "
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
    if "fid_bf16_diff" in r:
        verdict = "within" if r["fid_bf16_within_tolerance"] else "beyond"
        lines.append(
            f"{'FID fp32 / bf16':<26}{r['fid_fp32']:>8.3f} / {r['fid_bf16']:.3f}   diff {r['fid_bf16_diff']:+.4f} on "
            f"{r['fid_check_images']:,} images, {verdict} ±{FID_BF16_TOLERANCE} (the rule: on "
            f"{FID_BF16_CHECK_IMAGES:,} images on the GPU)"
        )
    elif "fid_check_error" in r:
        lines.append(f"FID precision check failed: {r['fid_check_error']}")
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
        sample_steps=20 if gpu else 4,
        repeats=3,
        inception=False,
        worker_start=False,
    )  # it may need a download: the projection labels it an estimate
    result["quick"] = True
    bench_cache.save(result, device, precision)
    return result
