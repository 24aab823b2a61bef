"""`sample`: images from a checkpoint, as samples.npz and a PNG sheet."""

from __future__ import annotations

import click

from mnist_diff.choices import SAMPLERS
from mnist_diff.cli.checks import check_writable_dir, load_model_source, pick_device, with_sampling
from mnist_diff.cli.options import (
    apply,
    compile_option,
    config_option,
    device_option,
    fused_option,
    out_option,
    quiet_option,
    tracking_uri_option,
)
from mnist_diff.cli.params import OptionalChoice, OptionalFloat, OptionalInt

CHECKPOINTS = "Default: the checkpoint's."
# The sampling options of `sample` and `evaluate`: None keeps what the checkpoint was trained with.
sampling_options = apply(
    [
        config_option("sampler", type=OptionalChoice(SAMPLERS), default=None, show_default=False, help=CHECKPOINTS),
        config_option("ddim_steps", type=OptionalInt(min=1), default=None, show_default=False, help=CHECKPOINTS),
        config_option("eta", type=OptionalFloat(0, 1), default=None, show_default=False, help=CHECKPOINTS),
        config_option(
            "clip_x0", default=None, show_default=False, help="Clip the predicted x_0 to [-1, 1]. " + CHECKPOINTS
        ),
    ]
)

# `sample` and `evaluate`: a model logged to MLflow, by URI (`tracking.mlflow_model`), instead of --checkpoint.
model_option = click.option(
    "--model",
    "model_uri",
    default=None,
    help="Or an MLflow model URI: models:/mnist-diff@champion, models:/NAME/VERSION, runs:/RUN_ID/model "
    "(read from --tracking-uri).",
)


@click.command()
@click.option(
    "--checkpoint",
    "checkpoint_path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="A training checkpoint (ckpt-*.pt) or per-epoch EMA file (ema-epoch-*.pt).",
)
@model_option
@click.option("--num-samples", type=click.IntRange(min=1), default=64, show_default=True)
@sampling_options
@click.option("--seed", type=int, default=0, show_default=True, help="Image i depends on (seed, i) only.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Images per sampling batch. Default: what the device holds (up to 2000 on a GPU, 64 on CPU).",
)
@tracking_uri_option
@device_option
@compile_option
@fused_option
@out_option("runs/samples")
@quiet_option
def sample(
    checkpoint_path,
    model_uri,
    num_samples,
    sampler,
    ddim_steps,
    eta,
    clip_x0,
    seed,
    batch_size,
    tracking_uri,
    device,
    compile,
    fused,
    out,
    quiet,
):
    """Draw images from a checkpoint or a logged model: a grid PNG and all images as uint8 (samples.npz) into
    --out."""
    out_path = check_writable_dir(out)
    dev = pick_device(device)
    from mnist_diff.diffusion.schedules import make_schedule
    from mnist_diff.runtime import accel
    from mnist_diff.runtime.data import save_samples
    from mnist_diff.runtime.generate import generate

    model, trained, source = load_model_source(checkpoint_path, model_uri, tracking_uri, dev)
    config = with_sampling(trained, sampler, ddim_steps, eta, clip_x0=clip_x0, fused=fused)
    accel.use_fused(model, config.fused, config.precision)  # this command's setting, not the training's
    schedule = make_schedule(config.schedule, config.timesteps, config.beta_start, config.beta_end)
    images = generate(
        model,
        schedule,
        num=num_samples,
        seed=seed,
        sampler=config.sampler,
        ddim_steps=config.ddim_steps,
        eta=config.eta,
        clip_x0=config.clip_x0,
        batch_size=batch_size,
        precision=config.precision,
        progress=not quiet,
        compile=compile,
    )
    npz, sheet = save_samples(images, out_path, config, seed, source)
    click.echo(f"{num_samples} images ({config.sampler}) -> {npz}, {sheet}")
