"""`train`: one config, scored as it trains, tracked in MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mnist_diff.cli.checks import check_writable_dir, make_config, open_tracker, own_run_folder, pick_device
from mnist_diff.cli.group import BadInput
from mnist_diff.cli.options import (
    compile_option,
    config_option,
    data_dir_option,
    device_option,
    fid_options,
    fid_weights_option,
    fused_option,
    out_option,
    overlap_option,
    quiet_option,
    sampler_options,
    schedule_options,
    system_metrics_option,
    tracking_options,
    training_options,
)


@click.command()
@schedule_options
@sampler_options
@training_options
@config_option("seed")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in --out.")
@click.option("--dry-run", is_flag=True, help="Print the resolved config and exit.")
@fid_options
@fid_weights_option
@tracking_options
@system_metrics_option
@click.option("--run-name", default=None, help="MLflow run name (default: derived from the config).")
@device_option
@compile_option
@overlap_option
@fused_option
@data_dir_option
@out_option("runs/train")
@quiet_option
def train(
    device,
    data_dir,
    out,
    resume,
    dry_run,
    quiet,
    fid_weights,
    tracking_uri,
    experiment,
    no_tracking,
    system_metrics,
    run_name,
    **fields,
):
    """Train one config; score FID as it trains; write checkpoints and sample sheets into --out; track in MLflow."""
    config = make_config(**fields)
    from mnist_diff.perf.workload import unscored

    if reason := unscored(config):
        raise BadInput(reason)
    out_path = check_writable_dir(out)
    if dry_run:
        click.echo(json.dumps(config.to_dict(), indent=2))
        return
    if resume:
        check_resumable(config, out_path / "checkpoints", out)
    dev = pick_device(device)
    tracker = open_tracker(
        tracking_uri, experiment, no_tracking, run_name=run_name or config.short_name(), system_metrics=system_metrics
    )
    click.get_current_context().with_resource(own_run_folder(out_path, out, resume))

    from mnist_diff.fid.engine import Reference
    from mnist_diff.runtime.data import load_mnist, mnist_dataset
    from mnist_diff.training.experiment import run_experiment
    from mnist_diff.training.trainer import StopSignals

    reference = Reference(config.fid_ref, config.fid_ref_samples, data_dir, fid_weights)
    with StopSignals():
        images = load_mnist(data_dir, train=True, limit=config.train_samples, device=dev)
        run = dict(reference=reference, resume=resume, progress=not quiet)
        if tracker is None:
            result = run_experiment(config, images, out_path, **run)
        else:
            with tracker.run():
                tracker.log_datasets(
                    [
                        mnist_dataset(data_dir, train=True, limit=config.train_samples, context="training"),
                        reference.dataset(),
                    ]
                )
                result = run_experiment(config, images, out_path, tracker=tracker, **run)
    click.echo(summary_line(result))
    if tracker is not None:
        click.echo(tracker.describe())


def check_resumable(config, ckpt_dir: Path, out: str) -> None:
    """--resume must keep the training settings of the checkpoint it continues (exit 2 naming them)."""
    from mnist_diff.config import Config, training_changes
    from mnist_diff.runtime import checkpoint

    ckpt = checkpoint.load_latest(ckpt_dir)
    changes = ckpt and training_changes(Config.from_dict(ckpt["config"]), config)
    if changes:
        said = ", ".join(f"{k} {saved} (now {now})" for k, (saved, now) in changes.items())
        raise BadInput(f"--resume: --out {out} was trained with other settings: {said}; give those, or another --out")


def summary_line(result) -> str:
    line = f"trained {result.steps} steps ({result.epochs_done} epochs) -> {result.out_dir}"
    if result.best_fid is not None:
        line += f"; best epoch {result.best_epoch}: FID {result.best_fid:.2f} ({result.config['fid_samples']} samples)"
    return line
