"""`sweep`: run (or resume) a study, an Optuna grid whose every trial is tracked in MLflow."""

from __future__ import annotations

import dataclasses
import time

import click

from mnist_diff.choices import REGISTERED_MODEL, SAMPLERS, SCHEDULES
from mnist_diff.cli.checks import check_writable_dir, checked_tracking_uri, make_config, pick_device
from mnist_diff.cli.group import BadInput
from mnist_diff.cli.options import (
    compile_option,
    config_options,
    data_dir_option,
    device_option,
    fid_options,
    fid_weights_option,
    fused_option,
    out_option,
    overlap_option,
    quiet_option,
    system_metrics_option,
    tracking_options,
    training_options,
)
from mnist_diff.cli.params import ChoiceList, Duration, OptionalPath, Workers, selected
from mnist_diff.presets import PRESETS


@click.command()
@click.option("--study-name", default="mnist-diff-study", show_default=True, help="Optuna study name.")
@click.option(
    "--storage",
    default="sqlite:///optuna.db",
    show_default=True,
    help="Optuna storage URL: SQLite here, or e.g. postgresql://user:pw@host/db for many workers.",
)
@click.option(
    "--schedule",
    "schedules",
    type=ChoiceList(SCHEDULES),
    multiple=True,
    default=["all"],
    show_default=True,
    help="Narrow the grid to these schedules: a comma list (linear,cosine), repeatable; all: the four.",
)
@click.option(
    "--timesteps",
    "timesteps_list",
    type=ChoiceList(("200", "1000")),
    multiple=True,
    default=["all"],
    show_default=True,
    help="Narrow to these (T, beta_end) settings: 200 is (200, 0.08), 1000 is "
    "(1000, 0.02); a comma list or all. cosine ignores beta_end, so for it they "
    "differ only in T.",
)
@click.option(
    "--sampler",
    "samplers",
    type=ChoiceList(SAMPLERS),
    multiple=True,
    default=["all"],
    show_default=True,
    help="Narrow to these samplers: ddpm, ddim, ddpm,ddim or all.",
)
@click.option(
    "--seeds",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Run each grid point with seeds 0..K-1 (training shared across samplers as usual).",
)
@click.option(
    "--grid",
    "grid_options",
    multiple=True,
    metavar="NAME=V1,V2",
    callback=lambda ctx, param, values: tuple(v for v in values if v.strip()),  # '': not given
    help="Vary any config field too: ddim_steps=10,50,100; coupled fields as one dimension: "
    "timesteps:beta_end=200:0.08,500:0.04. Repeatable; ';' separates several in one value. "
    "A dimension replaces the reference one it shares a field with (e.g. sampler=ddim).",
)
@click.option(
    "--grid-file",
    type=OptionalPath(exists=True, dir_okay=False),
    default=None,
    help='TOML file of grid dimensions: a [grid] table of field = [values] and "f1:f2" = [[a, b], ...].',
)
@click.option(
    "--max-points",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Refuse a grid with more points than this (seeds included).",
)
@config_options("beta_start", "ddim_steps", "eta", "clip_x0")
@training_options
@fid_options
@fid_weights_option
@tracking_options
@system_metrics_option
@click.option(
    "--registered-model",
    default=REGISTERED_MODEL,
    show_default=True,
    help="Register the finished study's best model under this name; the alias 'champion' moves to it when "
    "its FID beats the current champion's.",
)
@click.option(
    "--preset",
    type=click.Choice(tuple(PRESETS)),
    default="study",
    show_default=True,
    help="study: the reference study's settings. smoke: every grid point on CPU in minutes "
    "(tiny model and data, tiny FID counts); options you give still win.",
)
@click.option(
    "--workers",
    type=Workers(),
    default="auto",
    show_default=True,
    help="Worker processes on this machine, given its GPUs in turn. auto: one per visible GPU; on a "
    "CPU 1, or with --preset smoke one per core (at most one per training). More workers than GPUs "
    "share them (on an H100 no faster than one each). Several workers show one study bar.",
)
@click.option(
    "--trials-per-worker",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Trials each worker runs at once, in threads of one process (on CUDA each on a CUDA stream of its "
    "own): one worker then fills a GPU that one training at batch 128 leaves mostly idle, and compiles each "
    "graph once. Each trial is still one Optuna trial and one MLflow run.",
)
@click.option(
    "--heartbeat",
    type=click.IntRange(min=1),
    default=60,
    show_default=True,
    help="Seconds between trial heartbeats; a trial silent for twice this is retried.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the study's work per phase and its projected time on this device, then exit: "
    "creates no study, run or folder.",
)
@click.option(
    "--time-budget",
    type=Duration(),
    default=None,
    help="Fit the study into this time on this device (e.g. 25m, 1h30m): where the projection is longer, "
    "score fewer selection images, score only every 2nd, 4th, ... epoch, or fewer final images "
    "(workload.PROTOCOL_STEPS, most faithful first); epochs and training are never cut. Exit 2 "
    "when even the smallest protocol does not fit.",
)
@click.option(
    "--stop-after",
    type=Duration(),
    default=None,
    help="End cleanly within this time from the command's start (e.g. 9m; a Slurm job: a few minutes below its "
    "limit): start no trial that the projection says would end later, let running ones finish, exit 0. The "
    "same command goes on with the points left.",
)
@click.option(
    "--rebench",
    is_flag=True,
    help="Measure this device again for the projection (a quick bench of each model the grid trains) "
    "instead of using the cached rates, e.g. after the cached ones were measured under load.",
)
@click.option(
    "--max-retries",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Retries per grid point, each resuming from the last checkpoint, after a failure that may pass "
    "(CUDA OOM, disk, network, tracking or storage errors, a dead worker). A non-finite loss or an "
    "invalid config is not retried: it would fail again (see --retry-failed).",
)
@click.option(
    "--retry-failed",
    is_flag=True,
    help="Queue every FAILed grid point of the study again with a fresh retry budget, including "
    "deterministic failures (non-finite loss, invalid config), e.g. after changing the code.",
)
@device_option
@compile_option
@overlap_option
@fused_option
@data_dir_option
@out_option("runs/sweep")
@quiet_option
@click.pass_context
def sweep(
    ctx,
    study_name,
    storage,
    schedules,
    timesteps_list,
    samplers,
    seeds,
    grid_options,
    grid_file,
    max_points,
    preset,
    workers,
    trials_per_worker,
    heartbeat,
    dry_run,
    time_budget,
    stop_after,
    rebench,
    max_retries,
    retry_failed,
    fid_weights,
    tracking_uri,
    experiment,
    no_tracking,
    system_metrics,
    registered_model,
    device,
    data_dir,
    out,
    quiet,
    **fields,
):
    """Run (or resume) a study as an Optuna grid, every trial tracked in MLflow: the reference study (4
    schedules x 2 (T, beta_end) x 2 samplers), narrowed by --schedule/--timesteps/--sampler, extended by --grid."""
    started = time.time()  # --stop-after counts from here: the setup below is part of the slot
    if no_tracking:
        raise BadInput("sweep always tracks in MLflow: drop --no-tracking")
    from mnist_diff.perf.workload import format_duration as workload_duration
    from mnist_diff.perf.workload import unscored
    from mnist_diff.study.grid import GridError
    from mnist_diff.study.plan import auto_workers, pairs_of, study_grid

    for key, value in PRESETS[preset].items():  # what the user left out or gave empty (MLproject's "not given")
        if fields[key] is None or ctx.get_parameter_source(key) is click.core.ParameterSource.DEFAULT:
            fields[key] = value
    schedules, samplers = selected(schedules, SCHEDULES), selected(samplers, SAMPLERS)
    steps = selected(timesteps_list, ("200", "1000"))
    try:
        grid, extra = study_grid(schedules, steps, samplers, seeds, grid_options, grid_file, max_points)
    except GridError as err:
        raise BadInput(str(err)) from None
    for dim in extra:  # a typed option the grid would silently override
        for field in dim.fields:
            given = field in fields and fields[field] is not None  # None: MLproject's '' (not given)
            if given and ctx.get_parameter_source(field) is click.core.ParameterSource.COMMANDLINE:
                raise BadInput(
                    f"--{field.replace('_', '-')} {fields[field]} is also the grid dimension "
                    f"'{dim.label}': give {field} in one place"
                )
    base = make_config(**fields)  # the fixed settings; each point then sets its grid fields
    try:  # every point must be valid, e.g. --ddim-steps <= T, and give a score
        grid.configs(base, max_points, check=lambda c: unscored(c, ranked=True))
    except GridError as err:
        raise BadInput(str(err)) from None
    out_path = check_writable_dir(out)
    from mnist_diff.study.storage import StorageUnavailable, budget_protocol, check_storage, open_study

    try:
        check_storage(storage)
    except StorageUnavailable as err:
        raise BadInput(str(err)) from None
    tracking_uri = checked_tracking_uri(tracking_uri)
    dev = pick_device(device)
    from mnist_diff.study.projection import BudgetError, fit_time_budget, sweep_projection

    if time_budget is not None:
        kept = None if dry_run else budget_protocol(storage, study_name)  # a dry run opens no store
        if kept:  # a resumed study keeps its protocol, whatever the rates cached since would choose
            base = base.replace(**kept)
            click.echo(
                f"--time-budget: study {study_name!r} goes on with the protocol it was created with: "
                f"selection FID on {base.fid_select_samples:,} images every {base.fid_every} epoch(s), "
                f"final FID on {base.fid_samples:,}"
            )
        else:
            try:
                base = fit_time_budget(grid.configs(base, max_points), base, dev, time_budget, rebench, say=click.echo)
            except BudgetError as err:
                raise BadInput(str(err)) from None
            rebench = False  # measured now
    if workers == "auto":
        workers = auto_workers(dev, preset, grid.configs(base, max_points))

    from mnist_diff.study.spec import Sweep
    from mnist_diff.study.sweep import SweepFailed, run_sweep
    from mnist_diff.training.trainer import StopSignals

    in_grid = {"schedule", "timesteps", "beta_end", "sampler", "seed", *(f for d in grid.dims for f in d.fields)}
    fixed = {k: v for k, v in base.to_dict().items() if k not in in_grid}
    spec = Sweep(
        study_name=study_name,
        out_dir=out_path,
        base=base,
        schedules=schedules,
        pairs=pairs_of(steps),
        samplers=samplers,
        seeds=tuple(range(seeds)),
        extra=tuple(extra),
        storage=storage,
        tracking_uri=tracking_uri,
        experiment=experiment,
        system_metrics=system_metrics,
        registered_model=registered_model,
        data_dir=data_dir,
        fid_weights=fid_weights,
        device=device,
        progress=not quiet,
        heartbeat=heartbeat,
        max_retries=max_retries,
        trials_per_worker=trials_per_worker,
        fixed={**fixed, "preset": preset, **({"time_budget": time_budget} if time_budget is not None else {})},
    )
    if not dry_run:
        try:  # run_sweep opens it first too; here so a study with another grid is refused before the projection
            open_study(spec)
        except ValueError as err:
            raise BadInput(str(err)) from None
    projection = sweep_projection(
        spec.configs(),
        dev,
        workers,
        rebench,
        suggest_smoke=preset != "smoke",
        say=click.echo,
        trials_per_worker=trials_per_worker,
    )
    if dry_run:
        return
    deadline = None if stop_after is None else started + stop_after
    if stop_after is not None and projection and projection.get("trial_seconds"):
        shortest = min(sum(seconds) for seconds in projection["trial_seconds"])
        if shortest > stop_after:  # every command would stop at once, the study never advancing
            click.echo(
                f"warning: --stop-after {workload_duration(stop_after)}: the shortest trial is projected at "
                f"{workload_duration(shortest)} on this device, so no trial that trains will start"
            )
    spec = dataclasses.replace(spec, projection=projection, deadline=deadline)
    failed = None
    try:
        with StopSignals():
            doc = run_sweep(spec, workers=workers, retry_failed=retry_failed)
    except SweepFailed as err:  # the results are written; say what they hold, then fail
        doc, failed = err.doc, err
    except ValueError as err:  # e.g. the study exists with another grid
        raise BadInput(str(err)) from None
    click.echo(
        f"study {study_name}: {doc['complete']}/{doc['grid_size']} grid points complete "
        f"-> {out_path / 'grid_search_results.json'}"
    )
    if doc.get("stopped"):
        click.echo(f"--stop-after {workload_duration(stop_after)}: {doc['stopped']}")
    if doc["best"]:
        b = doc["best"]
        click.echo(f"best: {b['params']} FID {b['best_fid']:.2f} (epoch {b['best_epoch']})")
    if doc.get("registered_model"):
        r = doc["registered_model"]
        click.echo(r["text"] + f"; load it: models:/{r['name']}/{r['version']}")
    from mnist_diff.tracking.mlflow_store import experiment_url, ui_command

    click.echo(f"browse: {ui_command(tracking_uri)}  (experiment {experiment!r})")
    click.echo(f"  then open {experiment_url(tracking_uri, experiment)}")
    if failed is not None:
        raise click.ClickException(str(failed))
