"""A study's projected time on this device: the bench rates of each model a grid trains (cached per device by
`bench_cache`, measured briefly when missing), the projection `sweep` prints and records, and the FID protocol
that fits a time budget. The arithmetic is `workload`'s; this module adds the device and the words. No click.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch

from mnist_diff.config import Config
from mnist_diff.perf import bench_cache, workload
from mnist_diff.perf.bench import quick_bench
from mnist_diff.study.grid import reference_configs
from mnist_diff.study.workers import worker_threads


class BudgetError(ValueError):
    """A time budget that no FID protocol meets, with a one-line reason."""


def parallel_workers(device, workers: int) -> int:
    """How many of `workers` worker processes run at once: one per core on a CPU, one per GPU on CUDA."""
    units = torch.cuda.device_count() if device.type == "cuda" else (os.cpu_count() or 1)
    return max(1, min(workers, units))


@contextmanager
def _threads(device, workers: int):
    """Torch threads as each of `workers` worker processes has them on a CPU (`workers.worker_threads`): the
    rates a worker gets, and the cache entry they are kept under (`bench_cache.entry_key`)."""
    before = torch.get_num_threads()
    if device.type == "cpu" and workers > 1:
        torch.set_num_threads(worker_threads(workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def device_rates(
    configs: Sequence[Config], device, say: Callable[[str], None] = print, remeasure: bool = False, workers: int = 1
) -> dict:
    """This device's bench rates for each model the configs train (`workload.rate_key`: a grid over widths has
    several) in one of `workers` worker processes, from the bench cache, or measured (a short bench, announced
    through `say`) and cached: when missing, when `remeasure`, or when a cached quick bench is outdated (a
    full one is kept, and said so)."""
    with _threads(device, workers):
        return _device_rates(configs, device, say, remeasure)


def _device_rates(configs, device, say, remeasure: bool) -> dict:
    name, rates = bench_cache.device_name(device), {}
    for key, c in {workload.rate_key(c): c for c in configs}.items():
        bench = None if remeasure else bench_cache.load(device, c.channels, c.batch_size, c.precision)
        stale = bench and bench_cache.outdated(bench)
        if bench is None or (stale and bench.get("quick")):  # a quick bench costs seconds: measure again
            say(
                f"measuring this device for the projection (channels {c.channels}, batch {c.batch_size}"
                f"{'; the cached figure was ' + stale if stale else ''}; a few seconds, then cached)..."
            )
            bench = quick_bench(device, c.channels, c.batch_size, c.precision)
        how = "quick bench" if bench.get("quick") else "bench"
        notes = [n for n in (bench_cache.outdated(bench), bench_cache.busy(bench)) if n]
        caveat = f" ({'; '.join(notes)}: `sweep --rebench` measures again)" if notes else ""
        rates[key] = workload.rates_from_bench(
            bench, device.type, source=f"{how} of {name}, cached in {bench_cache.cache_path(device)}{caveat}"
        )
    return rates


def fit_to_budget(configs: Sequence[Config], base: Config, rates, seconds: float) -> tuple[Config, str]:
    """(base with the most faithful FID protocol of `workload.PROTOCOL_STEPS` whose projection for `configs`, the
    grid's points of `base`, fits in `seconds`; one line saying what was chosen). Base itself when it fits as it
    is. Raises BudgetError when even the smallest protocol does not fit."""
    budget, duration = workload.format_duration(seconds), workload.format_duration
    asked = sum(workload.project_configs(configs, rates).values())
    if asked <= seconds:
        return base, f"--time-budget {budget}: the protocol as given fits (projected {duration(asked)})"
    fit = workload.fit_protocol(configs, rates, seconds)
    if fit is None:
        smallest = [workload.reduce_protocol(c, *workload.PROTOCOL_STEPS[-1]) for c in configs]
        least = sum(workload.project_configs(smallest, rates).values())
        raise BudgetError(
            f"--time-budget {budget}: even the smallest FID protocol is projected at {duration(least)} "
            "on this device; give more time, fewer --epochs or a smaller grid"
        )
    step, projected = fit
    fitted = workload.reduce_protocol(base, *step)
    return fitted, (
        f"--time-budget {budget}: the protocol as given is projected at {duration(asked)}; running "
        f"selection FID on {fitted.fid_select_samples:,} images every {fitted.fid_every} epoch(s) "
        f"(grids with them), final FID on {fitted.fid_samples:,} (projected {duration(projected)})"
    )


def study_projection(
    configs: Sequence[Config],
    rates: dict | None,
    device,
    suggest_smoke: bool = True,
    workers: int = 1,
    trials_per_worker: int = 1,
) -> tuple[str, dict | None]:
    """(The text `sweep` prints: the work per phase, its projected time, the wall time with `workers` worker
    processes, one line more when that exceeds an hour; the record kept in study.json: device, rates, seconds
    per phase (serial), workers at once and projected wall seconds; None without rates)."""
    parallel = parallel_workers(device, workers)
    table = workload.format_table(configs, rates, parallel, trials_per_worker)
    if rates is None:
        return table, None
    where = f"{device.type} ({bench_cache.device_name(device)})"
    seconds, wall = projected_seconds(configs, rates, device, workers, trials_per_worker)
    warning = workload.long_study_warning(wall, where, suggest_smoke=suggest_smoke)
    sources = "; ".join(dict.fromkeys(r.source for r in rates.values()))
    return "\n".join([table, *([warning] if warning else [])]), {
        "device": where,
        "rates": sources,
        "seconds": seconds,
        "workers": parallel,
        "trials_per_worker": trials_per_worker,
        "wall_seconds": wall,
        "trial_seconds": trial_seconds(configs, rates),
    }


def projected_seconds(
    configs: Sequence[Config], rates, device, workers: int = 1, trials_per_worker: int = 1
) -> tuple[dict[str, float], float]:
    """(Seconds per phase, serial; the wall seconds with `workers` worker processes of `trials_per_worker` trials
    at once, their start and compiling included): the projection `sweep` prints and records, and `bench` gives
    for the reference study."""
    seconds = workload.project_configs(configs, rates)
    parallel = parallel_workers(device, workers)
    speedup = min(r.training_speedup(trials_per_worker) for r in rates.values())
    return seconds, workload.wall_seconds(seconds, len(configs), parallel, workload.worker_seconds(rates), speedup)


def trial_seconds(configs: Sequence[Config], rates: dict) -> list[list[float]]:
    """Per config, in the grid's order: [its training, the rest of its trial] in projected seconds. A trial whose
    training another trial already made costs only the rest (`deadline.next_trial_seconds`)."""
    out = []
    for c in configs:
        seconds = workload.project_configs([c], rates)
        training = seconds.pop(workload.TRAINING)
        out.append([training, sum(seconds.values()) + workload.TRIAL_OVERHEAD_SECONDS])
    return out


def reference_seconds(
    bench_result: dict, device, channels: int, batch_size: int, precision: str
) -> tuple[dict[str, float], float]:
    """The reference study's (16 configs, default protocol) `projected_seconds` at a bench's rates, one worker:
    what `sweep --dry-run` projects for it with this bench cached."""
    base = Config(channels=channels, batch_size=batch_size, precision=precision)
    configs = reference_configs(base)
    rates = {workload.rate_key(base): workload.rates_from_bench(bench_result, device.type)}
    return projected_seconds(configs, rates, device, workers=1)


def reference_projection(bench_result: dict, device, channels: int, batch_size: int, precision: str) -> str:
    """One line: the reference study's projected time at a bench's rates (what `sweep --dry-run` details)."""
    seconds, wall = reference_seconds(bench_result, device, channels, batch_size, precision)
    parts = ", ".join(f"{k} {workload.format_duration(v)}" for k, v in seconds.items())
    return (
        f"the reference study (16 configs, default protocol) on this device: "
        f"{workload.format_duration(sum(seconds.values()))} ({parts}); {workload.format_duration(wall)} wall "
        "clock with one worker, its start, compiling and overhead included (`sweep --dry-run` for details)"
    )


def fit_time_budget(
    configs: Sequence[Config],
    base: Config,
    device,
    seconds: float,
    rebench: bool = False,
    say: Callable[[str], None] = print,
) -> Config:
    """`base` with the most faithful FID protocol that fits `seconds` on this device (`fit_to_budget`), said
    through `say`; BudgetError when the configs vary the protocol, nothing fits or the device can't be
    measured."""
    varied = sorted(k for k in workload.PROTOCOL_KNOBS if len({getattr(c, k) for c in configs}) > 1)
    if varied:
        raise BudgetError(
            f"--time-budget chooses the FID protocol, which the grid varies ({', '.join(varied)}): drop one of them"
        )
    try:
        rates = device_rates(configs, device, say=say, remeasure=rebench)
    except Exception as err:
        raise BudgetError(
            f"--time-budget {workload.format_duration(seconds)}: measuring this device failed "
            f"({type(err).__name__}: {err})"
        ) from None
    base, said = fit_to_budget(configs, base, rates, seconds)
    say(said)
    return base


def sweep_projection(
    configs: Sequence[Config],
    device,
    workers: int = 1,
    rebench: bool = False,
    suggest_smoke: bool = True,
    say: Callable[[str], None] = print,
    trials_per_worker: int = 1,
) -> dict | None:
    """Say the study's work per phase and its projected time at this device's bench rates in one of `workers`
    worker processes (measured and cached on first use, or again with `rebench`), and its wall time with them.
    Returns the record for study.json. A projection is advice: a device that can't be measured stops nothing."""
    try:
        rates = device_rates(configs, device, say=say, remeasure=rebench, workers=workers)
    except Exception as err:
        say(f"no time projection: measuring this device failed ({type(err).__name__}: {err})")
        rates = None
    text, record = study_projection(
        configs, rates, device, suggest_smoke=suggest_smoke, workers=workers, trials_per_worker=trials_per_worker
    )
    say(text)
    return record
