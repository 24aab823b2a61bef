"""`evaluate`: the FID of a checkpoint or of a samples.npz, printed and tracked."""

from __future__ import annotations

import json

import click

from mnist_diff.cli.checks import load_model_source, open_tracker, pick_device, with_sampling
from mnist_diff.cli.group import BadInput
from mnist_diff.cli.options import (
    compile_option,
    config_option,
    data_dir_option,
    device_option,
    fid_weights_option,
    fused_option,
    quiet_option,
    sample_batch_option,
    tracking_options,
)
from mnist_diff.cli.sample import model_option, sampling_options


@click.command()
@click.option(
    "--checkpoint",
    "checkpoint_path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Score a checkpoint: sample --num-samples images from it first.",
)
@click.option(
    "--images",
    "images_path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Score the images in a samples.npz written by `sample`.",
)
@model_option
@click.option("--num-samples", type=click.IntRange(min=2), default=10000, show_default=True)
@sampling_options
@click.option("--seed", type=int, default=0, show_default=True)
@config_option("fid_ref")
@config_option("fid_ref_samples")
@config_option("fid_batch_size", type=click.IntRange(min=1))
@sample_batch_option
@config_option("kid")
@fid_weights_option
@tracking_options
@device_option
@compile_option
@fused_option
@data_dir_option
@quiet_option
def evaluate(
    checkpoint_path,
    images_path,
    model_uri,
    num_samples,
    sampler,
    ddim_steps,
    eta,
    clip_x0,
    seed,
    fid_ref,
    fid_ref_samples,
    fid_batch_size,
    sample_batch_size,
    kid,
    fid_weights,
    tracking_uri,
    experiment,
    no_tracking,
    device,
    compile,
    fused,
    data_dir,
    quiet,
):
    """FID of a checkpoint (sampled with the chosen sampler) or of a samples.npz, printed and tracked."""
    if [checkpoint_path, images_path, model_uri].count(None) != 2:
        raise BadInput("give exactly one of --checkpoint, --images and --model")
    dev = pick_device(device)
    from mnist_diff.fid.engine import Reference

    try:
        reference = Reference(fid_ref, fid_ref_samples, data_dir, fid_weights)
    except ValueError as err:
        raise BadInput(str(err)) from None
    if images_path is not None:
        from mnist_diff.runtime.data import load_samples

        try:
            images = load_samples(images_path)
        except ValueError as err:
            raise BadInput(f"--images {images_path}: {err}") from None
        params = {"images": images_path, "num_samples": images.shape[0]}
    else:
        model, trained, source = load_model_source(checkpoint_path, model_uri, tracking_uri, dev)
        config = with_sampling(
            trained,
            sampler,
            ddim_steps,
            eta,
            clip_x0,
            fid_batch_size=fid_batch_size,
            seed=seed,
            compile=compile,
            fused=fused,
            sample_batch_size=sample_batch_size,
        )
        from mnist_diff.runtime import accel

        accel.use_fused(model, config.fused, config.precision)  # this command's setting, not the training's
        params = {**config.to_dict(), "checkpoint": source, "num_samples": num_samples}
    tracker = open_tracker(
        tracking_uri, experiment, no_tracking, run_name="evaluate", tags={"mnist_diff.command": "evaluate"}
    )

    from mnist_diff.fid.engine import compute_fid
    from mnist_diff.training.experiment import score_model
    from mnist_diff.training.trainer import StopSignals

    params.update(fid_ref=fid_ref, fid_ref_samples=fid_ref_samples, fid_weights=fid_weights)

    def score():
        if images_path is not None:
            return compute_fid(images.to(dev), reference, device=dev, kid=kid)
        return score_model(model, config.replace(kid=kid), reference, num_samples, progress=not quiet)

    with StopSignals():
        if tracker is None:
            metrics = score()
        else:
            with tracker.run():
                tracker.log_params(params)
                metrics = score()
                tracker.log_metrics(metrics)
    click.echo(json.dumps(metrics))
    click.echo(f"FID {metrics['fid']:.3f}" + (f", KID {metrics['kid']:.5f}" if "kid" in metrics else ""))
    if tracker is not None:
        click.echo(tracker.describe())
