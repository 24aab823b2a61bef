"""How much work a study is, phase by phase, and how long it should take at given rates.

Pure: counts follow from the grid's `Config`s exactly as `experiment` and `train` spend them; times follow
from rates passed in (`bench_cache` reads and writes the measured ones). No I/O, no mlflow/optuna/click.

A DDPM and a DDIM trial with the same `training_key()` share one training, but each samples its own grids
and FID images with its own sampler.

Sampling time is not only images × network calls: each sampler step of a batch also costs a fixed latency
(kernel launches, the sampler's own arithmetic), which dominates small batches such as a 64-image grid at
T=1000 (1,000 sequential steps). So each sampling phase also lists its passes (how many images are drawn
together, at how many calls each), and `project` charges every step of every batch `Rates.sample_step_seconds`
on top of its images. Each pass (a batch drawn from noise to image) also costs a fixed time besides its steps
(its per-image generators, the first noise, the final conversion): `bench` times passes of two lengths and
`fit_pass_time` splits their times into that fixed cost and the steady per-step rate, and `project` charges
every pass `Rates.sample_pass_seconds` once.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from mnist_diff.config import Config, epoch_due
from mnist_diff.diffusion.samplers import network_calls
from mnist_diff.runtime.generate import batch_sizes

MNIST_SIZES = {"train": 60_000, "test": 10_000}
HOUR = 3600.0

# What a bench's rates depend on (`bench_cache` keys its entries by them): a grid over any of them, e.g.
# `--grid channels=32,64`, is projected group by group, each at its own rates. All are training fields, so a
# shared training never spans two groups.
RATE_FIELDS = ("channels", "batch_size", "precision")

TRAINING, SELECTION, FINAL, GRIDS, INCEPTION = (
    "training",
    "selection sampling",
    "final sampling",
    "grids",
    "Inception",
)
PHASES = (TRAINING, SELECTION, FINAL, GRIDS, INCEPTION)

# Fallbacks while `bench` has no Inception figure for the device: estimates, and labelled so wherever shown.
INCEPTION_IMAGES_PER_S_ESTIMATE = {"cpu": 4.0, "gpu": 2000.0}  # CPU: ~0.25 s/image on the 2-core dev machine
# per score: the FID engine keeps Inception and the reference statistics per process; a few ms of linear algebra
FID_FIXED_SECONDS_ESTIMATE = 0.1

# Wall-clock costs besides the phases' work, modelled on the smoke study on the 2-core machine (a trial's
# `seconds_other` 0.5-1.5 s, ~0.5 s between trials; ~12 s from the projection to the first trial): estimates.
TRIAL_OVERHEAD_SECONDS = 1.5  # per trial: MLflow run, Optuna bookkeeping, model build, checkpoints, logs
START_SECONDS = 7.0  # per study: stores, MNIST, FID reference
# per worker, until `bench` measures it (`worker_start_s`): its process start and imports (workers start at once)
WORKER_START_SECONDS_ESTIMATE = 3.0


@dataclass(frozen=True)
class Phase:
    name: str
    images: int  # training: images trained on; sampling: images drawn; Inception: images scored
    evaluations: int  # network evaluations: UNet calls (training: one forward+backward per image),
    # Inception forwards for the Inception phase
    # sampling phases: (images drawn together, network calls per image, sample batch or 0 for the device's,
    # how many such passes this phase pays for: fractional where a pass also draws another phase's images)
    passes: tuple[tuple[int, int, int, float], ...] = ()


@dataclass(frozen=True)
class Workload:
    phases: tuple[Phase, ...]
    trials: int
    trainings: int
    fid_scores: int  # calls of the FID metric (each has a fixed cost besides its images)
    reference_images: int  # real images through Inception once per reference; cached on disk afterwards

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)

    @property
    def sampling_evaluations(self) -> int:
        """UNet evaluations of all sampling: selection, final and grids."""
        return sum(self.phase(n).evaluations for n in (SELECTION, FINAL, GRIDS))


def steps_per_epoch(c: Config) -> int:
    """Optimizer steps per epoch: the last partial batch is dropped (train.Trainer)."""
    n = min(c.train_samples or MNIST_SIZES["train"], MNIST_SIZES["train"])
    return n // c.batch_size


def total_steps(c: Config) -> int:
    steps = c.epochs * steps_per_epoch(c)
    return steps if c.max_steps is None else min(steps, c.max_steps)


def epochs_done(c: Config) -> int:
    """Complete epochs: each gets a grid and is a candidate for FID selection."""
    return total_steps(c) // steps_per_epoch(c)


def scored_epochs(c: Config) -> list[int]:
    """The epochs scored for selection: every `fid_every`-th and the last (experiment.FidSelection)."""
    last = epochs_done(c)
    return [e for e in range(1, last + 1) if epoch_due(c.fid_every, e, last)]


def unscored(c: Config, ranked: bool = False) -> str | None:
    """Why a run of `c` can give no score, None when it can: `max_steps` stops it before its first epoch
    ends (a cut epoch is no epoch: no EMA weights to score; from one epoch on, the last is scored). `ranked`
    (a sweep, which ranks its points by score): also when it scores no epoch and no final FID."""
    if epochs_done(c) == 0:
        n = min(c.train_samples or MNIST_SIZES["train"], MNIST_SIZES["train"])
        return (
            f"--max-steps {c.max_steps} stops before the first epoch ends ({steps_per_epoch(c)} steps: "
            f"{n} images, --batch-size {c.batch_size}), so nothing is scored"
        )
    if ranked and not scored_epochs(c) and c.fid_samples == 0:
        return "--fid-every 0 with --fid-samples 0 scores nothing, and a sweep ranks its points by score"
    return None


def grid_epochs(c: Config) -> list[int]:
    """The epochs that get a sample sheet: every `sheet_every`-th and the last (train.Trainer)."""
    last = epochs_done(c)
    return [e for e in range(1, last + 1) if epoch_due(c.sheet_every, e, last)]


def count(configs: Sequence[Config]) -> Workload:
    """The work of running every config once (one trial each), trainings shared by `training_key()`. An epoch
    due both a grid and a selection FID draws them in one pass (`train.sample_epoch`); others draw what is due."""
    train_by_key: dict[str, int] = {}  # training images per shared training
    passes: dict[str, dict[tuple[int, int, int], float]] = {SELECTION: {}, FINAL: {}, GRIDS: {}}

    def add(phase: str, size: int, calls: int, batch: int, weight: float) -> None:
        if weight:
            key = (size, calls, batch)
            passes[phase][key] = passes[phase].get(key, 0.0) + weight

    scores = 0
    references = set()
    for c in configs:
        key = c.training_key()
        train_by_key[key] = max(train_by_key.get(key, 0), total_steps(c) * c.batch_size)
        calls = network_calls(c.sampler, c.timesteps, c.ddim_steps)
        batch = c.sample_batch_size or 0
        scored, grids = scored_epochs(c), grid_epochs(c)
        both = len(set(scored) & set(grids))
        final = c.fid_samples if c.fid_samples > 0 and epochs_done(c) >= 1 else 0
        shared = c.sheet_images + c.fid_select_samples  # an epoch drawing both: its time split by images
        add(SELECTION, shared, calls, batch, both * c.fid_select_samples / shared)
        add(GRIDS, shared, calls, batch, both * c.sheet_images / shared)
        add(SELECTION, c.fid_select_samples, calls, batch, len(scored) - both)
        add(GRIDS, c.sheet_images, calls, batch, len(grids) - both)
        add(FINAL, final, calls, batch, 1 if final else 0)
        trial_scores = len(scored) + (1 if final else 0)
        scores += trial_scores
        if trial_scores:
            size = MNIST_SIZES[c.fid_ref]
            references.add((c.fid_ref, min(c.fid_ref_samples or size, size)))

    def sampling(name: str) -> Phase:  # images and evaluations follow from the passes (a share of a pass: its images)
        items = sorted(passes[name].items())
        return Phase(
            name,
            round(sum(w * size for (size, _, _), w in items)),
            round(sum(w * size * calls for (size, calls, _), w in items)),
            tuple((*k, w) for k, w in items),
        )

    train_images = sum(train_by_key.values())
    selection, final_phase, grids_phase = sampling(SELECTION), sampling(FINAL), sampling(GRIDS)
    scored_images = selection.images + final_phase.images
    phases = (
        Phase(TRAINING, train_images, train_images),
        selection,
        final_phase,
        grids_phase,
        Phase(INCEPTION, scored_images, scored_images),
    )
    return Workload(
        phases,
        trials=len(configs),
        trainings=len(train_by_key),
        fid_scores=scores,
        reference_images=sum(n for _, n in references),
    )


@dataclass(frozen=True)
class Rates:
    train_images_per_s: float
    sample_evaluations_per_s: float  # UNet evaluations per second while sampling (DDPM = DDIM per call)
    inception_images_per_s: float
    fid_fixed_seconds: float  # per FID score, besides its images
    estimated: tuple[str, ...] = ()  # names of the fields above that are estimates, not measurements
    source: str = ""  # where the measured ones come from
    sample_batch: int = 0  # the batch sample_evaluations_per_s was measured at (0: unknown)
    sample_step_seconds: float = 0.0  # fixed seconds of each sampler step of a batch, besides its images
    sample_pass_seconds: float = 0.0  # fixed seconds of each sampling pass (one batch), besides its steps
    worker_start_seconds: float = WORKER_START_SECONDS_ESTIMATE  # per worker process: start and imports
    compile_seconds: float = 0.0  # per worker process and model: compiling and warming up (first calls)
    # {N: aggregate training rate of N trainings at once in one process / the rate of one} (`bench --concurrent`)
    concurrent_training: dict = field(default_factory=dict)

    def training_speedup(self, trials_at_once: int) -> float:
        """How much faster a worker trains `trials_at_once` trainings together than one after another: measured
        (`bench --concurrent`), else 1 (no gain assumed)."""
        return max(1.0, self.concurrent_training.get(trials_at_once, 1.0)) if trials_at_once > 1 else 1.0

    def sampling_seconds(self, images: int, calls: int, batch: int = 0) -> float:
        """Seconds to draw `images` together at `calls` network calls each, in batches of `batch` (0: the
        measured batch): each step of a batch of b images costs L + b (1/rate - L/B), where B is the measured
        batch, which makes a step of B images cost exactly B/rate; each batch's pass adds its fixed cost."""
        batch = batch or self.sample_batch or images
        latency = self.sample_step_seconds
        per_image = 1 / self.sample_evaluations_per_s - (latency / self.sample_batch if self.sample_batch else 0)
        sizes = batch_sizes(images, batch)
        return calls * sum(latency + b * per_image for b in sizes) + len(sizes) * self.sample_pass_seconds


def rates_from_bench(result: dict, device_type: str, source: str = "") -> Rates:
    """Rates from a `bench` result; what it lacks (Inception, the FID fixed cost) is a stated estimate. The
    per-step latency follows from the sampling rates at two batch sizes (`sample_step_latency`); a bench
    without the small batch gives none (0: every step costs only its images)."""
    if "sample_image_steps_per_s" in result:
        sampling = result["sample_image_steps_per_s"]
    else:  # one network call costs the same in either sampler: their mean is one rate, less noisy
        sampling = statistics.mean([result["ddpm_image_steps_per_s"], result["ddim_image_steps_per_s"]])
    estimated = []
    inception = result.get("inception_images_per_s")
    if not inception:
        inception = INCEPTION_IMAGES_PER_S_ESTIMATE["cpu" if device_type == "cpu" else "gpu"]
        estimated.append("inception_images_per_s")
    fixed = result.get("fid_fixed_seconds")
    if fixed is None:
        fixed = FID_FIXED_SECONDS_ESTIMATE
        estimated.append("fid_fixed_seconds")
    batch = int(result.get("sample_batch") or 0)
    start = result.get("worker_start_s")
    if start is None:
        start = WORKER_START_SECONDS_ESTIMATE
        estimated.append("worker_start_seconds")
    latency = 0.0
    # both batches' steady rates where the bench has them (`fit_pass_time`), else rates of whole passes
    small_rate = result.get("small_sample_image_steps_per_s") or result.get("ddpm_small_image_steps_per_s")
    if batch and result.get("small_sample_batch") and small_rate:
        latency = sample_step_latency(batch, sampling, result["small_sample_batch"], small_rate)
    return Rates(
        result["train_images_per_s"],
        sampling,
        inception,
        fixed,
        tuple(estimated),
        source,
        sample_batch=batch,
        sample_step_seconds=latency,
        sample_pass_seconds=float(result.get("sample_pass_fixed_s") or 0.0),
        worker_start_seconds=start,
        compile_seconds=float(result.get("compile_s") or 0.0),
        concurrent_training=concurrent_speedups(result.get("train_concurrent_images_per_s") or {}),
    )


def concurrent_speedups(rates: Mapping[str, float]) -> dict[int, float]:
    """`bench`'s {"N": aggregate images/s} as {N: speedup over one training}; {} without N = 1."""
    one = rates.get("1")
    return {int(n): r / one for n, r in rates.items() if one} if one else {}


def fit_pass_time(steps1: int, seconds1: float, steps2: int, seconds2: float) -> tuple[float, float]:
    """(fixed seconds of a pass, seconds per step) of the line seconds = fixed + steps x per_step through two
    passes' times at the same batch. Timing noise can tilt it past sense: a negative fixed cost is taken as 0
    and a non-positive slope as none, each step then costing the longer pass's mean."""
    if steps1 == steps2:
        raise ValueError(f"two pass lengths are needed, got {steps1} twice")
    (k1, t1), (k2, t2) = sorted(((steps1, seconds1), (steps2, seconds2)))
    per_step = (t2 - t1) / (k2 - k1)
    fixed = t1 - k1 * per_step
    if per_step <= 0 or fixed < 0:
        return 0.0, t2 / k2
    return fixed, per_step


def sample_step_latency(batch: int, rate: float, small_batch: int, small_rate: float) -> float:
    """The fixed seconds L of a sampler step in the model t(b) = L + b c, from the step times of two batch
    sizes (b / rate each); kept within [0, the small batch's step time]."""
    if batch <= small_batch:
        return 0.0
    t_big, t_small = batch / rate, small_batch / small_rate
    per_image = (t_big - t_small) / (batch - small_batch)
    return min(max(t_small - small_batch * per_image, 0.0), t_small)


def rate_key(c: Config) -> tuple:
    """The values of `RATE_FIELDS`: configs with equal keys run at the same bench rates."""
    return tuple(getattr(c, f) for f in RATE_FIELDS)


def _rates_of(rates: Rates | Mapping[tuple, Rates], c: Config) -> Rates:
    return rates if isinstance(rates, Rates) else rates[rate_key(c)]


def project_configs(configs: Sequence[Config], rates: Rates | Mapping[tuple, Rates]) -> dict[str, float]:
    """Seconds per phase of running every config once (`count`), each group of equal `rate_key` at its own
    rates (`rates`: a `Rates` for all, or a mapping from `rate_key` to `Rates`)."""
    groups: dict[tuple, list[Config]] = {}
    for c in configs:
        groups.setdefault(rate_key(c), []).append(c)
    total = dict.fromkeys(PHASES, 0.0)
    for group in groups.values():
        for phase, seconds in project(count(group), _rates_of(rates, group[0])).items():
            total[phase] += seconds
    return total


def worker_seconds(rates: Rates | Mapping[tuple, Rates]) -> float:
    """Seconds each worker process spends before its first step: its start, and compiling (or warming up)
    every model it trains and samples (one per rate group)."""
    groups = [rates] if isinstance(rates, Rates) else list(rates.values())
    if not groups:
        return 0.0
    return max(r.worker_start_seconds for r in groups) + sum(r.compile_seconds for r in groups)


def overhead_seconds(trials: int) -> float:
    """Seconds besides the phases' work of a study of `trials` trials: its start and each trial's fixed cost
    (the workers' own start: `worker_seconds`)."""
    return START_SECONDS + trials * TRIAL_OVERHEAD_SECONDS


def wall_seconds(
    seconds: Mapping[str, float], trials: int, parallel: int = 1, worker: float = 0.0, training_speedup: float = 1.0
) -> float:
    """The wall time of a study whose phases take `seconds` (serial, at the rates of one worker's share of the
    device), its trials shared by `parallel` workers; the workers start at once, each paying `worker` seconds
    (`worker_seconds`) before its first step. Each worker trains `training_speedup` times faster than one
    training at a time (`--trials-per-worker`, `Rates.training_speedup`); the other phases are counted in full,
    as if nothing overlapped them (an upper bound where scoring overlaps training, `--overlap`)."""
    work = sum(seconds.values()) - seconds.get(TRAINING, 0.0) * (1 - 1 / training_speedup)
    return START_SECONDS + worker + (work + trials * TRIAL_OVERHEAD_SECONDS) / parallel


def project(w: Workload, r: Rates) -> dict[str, float]:
    """Seconds per phase."""

    def sampling(name: str) -> float:
        return sum(
            weight * r.sampling_seconds(size, calls, batch) for size, calls, batch, weight in w.phase(name).passes
        )

    return {
        TRAINING: w.phase(TRAINING).images / r.train_images_per_s,
        SELECTION: sampling(SELECTION),
        FINAL: sampling(FINAL),
        GRIDS: sampling(GRIDS),
        INCEPTION: w.phase(INCEPTION).images / r.inception_images_per_s + w.fid_scores * r.fid_fixed_seconds,
    }


# Reductions of the FID protocol, most faithful first: (selection images per scored epoch, score every N epochs,
# final images). Training (epochs, batch) is never touched; the DDPM-at-T=1000 selection dominates the cost.
PROTOCOL_STEPS = (
    (2000, 1, 10000),
    (1000, 1, 10000),
    (1000, 2, 10000),
    (1000, 2, 5000),
    (500, 2, 5000),
    (500, 4, 5000),
    (500, 4, 2000),
    (250, 5, 2000),
    (250, 10, 1000),
)


PROTOCOL_KNOBS = ("fid_select_samples", "fid_every", "fid_samples", "sheet_every")  # what reduce_protocol sets


def reduce_protocol(c: Config, select: int, every: int, final: int) -> Config:
    """c with at most `select` selection images, scoring (and drawing grids) at most every `every` epochs, at
    most `final` final images: never more work than c asked for."""
    return c.replace(
        fid_select_samples=min(c.fid_select_samples, select),
        fid_every=c.fid_every and max(c.fid_every, every),
        fid_samples=min(c.fid_samples, final),
        sheet_every=c.sheet_every and max(c.sheet_every, every),
    )


def fit_protocol(
    configs: Sequence[Config], rates: Rates | Mapping[tuple, Rates], seconds: float
) -> tuple[tuple[int, int, int], float] | None:
    """The first of PROTOCOL_STEPS whose projected time for `configs` fits in `seconds`, and that time;
    None when even the last does not fit (then the training alone, or nearly, is too long)."""
    for step in PROTOCOL_STEPS:
        total = sum(project_configs([reduce_protocol(c, *step) for c in configs], rates).values())
        if total <= seconds:
            return step, total
    return None


def format_duration(seconds: float) -> str:
    """e.g. '45 s', '6 min 30 s', '21 h 38 min'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _table(rows: Iterable[Sequence[str]], right: Sequence[bool]) -> list[str]:
    rows = [list(r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.rjust(w) if right[i] else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths))).rstrip()
        for r in rows
    ]


def rate_labels(keys: Iterable[tuple]) -> dict[tuple, str]:
    """A short name for each rate group: the `RATE_FIELDS` that differ between them, e.g. 'channels 32'."""
    keys = list(dict.fromkeys(keys))
    varying = [i for i, f in enumerate(RATE_FIELDS) if len({k[i] for k in keys}) > 1]
    return {k: ", ".join(f"{RATE_FIELDS[i]} {k[i]}" for i in varying) for k in keys}


def format_table(
    configs: Sequence[Config],
    rates: Rates | Mapping[tuple, Rates] | None,
    parallel: int = 1,
    trials_per_worker: int = 1,
) -> str:
    """The work of running every config once, per phase, and, with rates, its projected time, the overhead and
    the wall time with `parallel` workers of `trials_per_worker` trials at once: the text `sweep` prints. Where
    the configs run at different rates (a grid over `channels`), the 'at' column names each group's where they
    differ."""
    w = count(configs)
    seconds = project_configs(configs, rates) if rates is not None else {}
    groups: dict[str, Rates] = {}  # a short name of each rate group -> its rates
    if rates is not None:
        labels = rate_labels(rate_key(c) for c in configs)
        groups = {labels[rate_key(c)]: _rates_of(rates, c) for c in configs}

    def est(r: Rates, name: str) -> str:
        return " (estimate)" if name in r.estimated else ""

    def at(text) -> str:
        texts = {label: text(r) for label, r in groups.items()}
        if len(set(texts.values())) == 1:
            return next(iter(texts.values()))
        return "; ".join(f"{t} ({label})" for label, t in texts.items())

    basis = {}
    if groups:
        basis = {
            TRAINING: at(lambda r: f"{r.train_images_per_s:,.0f} images/s"),
            SELECTION: at(
                lambda r: (
                    f"{r.sample_evaluations_per_s:,.0f} evaluations/s"
                    + (f" + {r.sample_step_seconds * 1e3:.2f} ms a batch step" if r.sample_step_seconds else "")
                    + (f" + {r.sample_pass_seconds * 1e3:.0f} ms a pass" if r.sample_pass_seconds else "")
                )
            ),
            INCEPTION: at(
                lambda r: (
                    f"{r.inception_images_per_s:,.0f} images/s"
                    f"{est(r, 'inception_images_per_s')} + {r.fid_fixed_seconds:g} s x {w.fid_scores} "
                    f"scores{est(r, 'fid_fixed_seconds')}"
                )
            ),
        }
        basis[FINAL] = basis[GRIDS] = basis[SELECTION]
    rows = [("phase", "images", "network evals", "projected", "at")]
    for p in w.phases:
        rows.append(
            (
                p.name,
                f"{p.images:,}",
                f"{p.evaluations:,}",
                format_duration(seconds[p.name]) if seconds else "?",
                basis.get(p.name, ""),
            )
        )
    rows.append(("total", "", "", format_duration(sum(seconds.values())) if seconds else "?", ""))
    if seconds:
        workers = f"{parallel} workers at once" if parallel > 1 else "one worker"
        speedup = min(r.training_speedup(trials_per_worker) for r in groups.values())
        lanes = ""
        if trials_per_worker > 1:
            gain = f"training {speedup:.2f}x as measured" if speedup > 1 else "no training gain measured"
            lanes = f", {trials_per_worker} trials at once in each ({gain})"
        rows.append(
            (
                "overhead",
                "",
                "",
                format_duration(overhead_seconds(w.trials)),
                f"{START_SECONDS:g} s start + {TRIAL_OVERHEAD_SECONDS:g} s x {w.trials} trials (estimate)",
            )
        )
        worker = worker_seconds(rates)
        rows.append(
            (
                "worker start",
                "",
                "",
                format_duration(worker),
                at(
                    lambda r: (
                        f"{r.worker_start_seconds:.1f} s process start{est(r, 'worker_start_seconds')} + "
                        f"{r.compile_seconds:.1f} s compiling and first calls"
                    )
                )
                + " per worker, the workers at once",
            )
        )
        rows.append(
            (
                "wall clock",
                "",
                "",
                format_duration(wall_seconds(seconds, w.trials, parallel, worker, speedup)),
                f"total, overhead and worker start, {workers}" + lanes,
            )
        )
    head = (
        f"Study work: {w.trials} trials, {w.trainings} trainings, {w.fid_scores} FID scores; "
        f"{w.sampling_evaluations:,} UNet evaluations for sampling."
    )
    lines = [head, *_table(rows, right=(False, True, True, True, False))]
    sources = at(lambda r: r.source) if groups else ""
    if sources:
        lines.append(f"rates: {sources}")
    if w.reference_images:
        ref = ""
        if groups:  # Inception does not depend on the UNet: the first group's rate
            r = next(iter(groups.values()))
            note = ", estimate" if "inception_images_per_s" in r.estimated else ""
            ref = f" (~{format_duration(w.reference_images / r.inception_images_per_s)}{note})"
        lines.append(
            f"not in the total: the FID reference statistics, {w.reference_images:,} real images through "
            f"Inception{ref}, computed once and then cached on disk."
        )
    return "\n".join(lines)


def long_study_warning(total: float, device: str, suggest_smoke: bool = True) -> str | None:
    """One line when the projected `total` seconds exceed an hour (pointing at the smoke preset); None otherwise."""
    if total <= HOUR:
        return None
    line = f"This study is projected to take {format_duration(total)} on {device}"
    return line + (
        ": to see the whole pipeline in minutes first, try `sweep --preset smoke`." if suggest_smoke else "."
    )
