"""`bench`: this device's training and sampling rates (eager and compiled) and the FID engine's, cached for
`sweep`'s projections; `--full` then runs the study's path once."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mnist_diff.choices import COMPILE_CHOICES, FID_PRECISIONS, PRECISIONS
from mnist_diff.cli.checks import check_writable_dir, own_run_folder, pick_device
from mnist_diff.cli.group import BadInput
from mnist_diff.cli.options import data_dir_option, device_option, fid_weights_option, fused_option
from mnist_diff.cli.params import CountList


@click.command()
@device_option
@click.option("--channels", type=click.IntRange(min=8), default=64, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True, help="Training batch.")
@click.option(
    "--sample-batch",
    type=click.IntRange(min=1),
    default=None,
    help="Sampling batch. Default: what the device holds (as for sampling: up to 2000 on a GPU, 64 on CPU).",
)
@click.option(
    "--train-steps",
    type=click.IntRange(min=1),
    default=None,
    help="Optimizer steps per timed repeat. Default: 50 on a GPU, 5 on CPU.",
)
@click.option(
    "--sample-steps",
    type=click.IntRange(min=3),
    default=None,
    help="Steps of the long sampling pass (a short one of a tenth, at least 2, is timed too: their difference "
    "gives the steady rate per step and the fixed cost per pass; 1000 measures a T=1000 pass). "
    "Default: 50 on a GPU, 5 on CPU.",
)
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True)
@click.option(
    "--compile",
    type=click.Choice(COMPILE_CHOICES),
    default="auto",
    show_default=True,
    help="Also measure compiled (auto: on CUDA; on a CPU compiling takes minutes). Eager is always measured.",
)
@fused_option
@click.option(
    "--inception/--no-inception",
    default=True,
    show_default=True,
    help="Also measure the FID engine: Inception images/s and the fixed cost of a score.",
)
@click.option(
    "--fid-batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Inception batch. Default: 500 on a GPU, 32 on CPU.",
)
@click.option(
    "--fid-precision",
    type=click.Choice(FID_PRECISIONS),
    default="fp32",
    show_default=True,
    help="Inception's precision for its images/s: fp32 (what scores use) or bf16 (autocast, channels-last).",
)
@click.option(
    "--fid-precision-check",
    type=click.IntRange(min=2),
    default=None,
    metavar="N",
    help="Also score the first N MNIST test images against the reference statistics with Inception in fp32 "
    "and in bf16 (fid_fp32, fid_bf16, fid_bf16_diff). The rule: bf16 may become the default only if the "
    "difference is at most 0.05 at N=10000 on the GPU.",
)
@click.option(
    "--concurrent",
    type=CountList(),
    default=None,
    help="Also measure N training loops at once (one thread, model, optimizer and CUDA stream each) for each N "
    "of a comma list, e.g. 1,2,4: train_concurrent_images_per_s, their aggregate images/s.",
)
@fid_weights_option
@click.option(
    "--full",
    is_flag=True,
    help="Then check the whole GPU path: one real training of a study config (cosine, T=200, DDPM) "
    "with a selection FID after every epoch and a final FID; one summary table (~3 min on an H100).",
)
@click.option("--epochs", type=click.IntRange(min=1), default=2, show_default=True, help="--full: epochs.")
@click.option(
    "--fid-select-samples",
    type=click.IntRange(min=2),
    default=2000,
    show_default=True,
    help="--full: images per selection FID.",
)
@click.option(
    "--fid-samples",
    type=click.IntRange(min=2),
    default=10000,
    show_default=True,
    help="--full: images of the final FID.",
)
@click.option(
    "--train-samples",
    type=click.IntRange(min=1),
    default=None,
    help="--full: train on the first N MNIST images (default: all 60,000).",
)
@click.option(
    "--fid-ref-samples",
    type=click.IntRange(min=2),
    default=None,
    help="--full and --fid-precision-check: reference images (default: the whole training split).",
)
@data_dir_option
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="--full: where the training goes (default: a temporary folder, removed after).",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the JSON result to this file.",
)
def bench(
    device,
    channels,
    batch_size,
    sample_batch,
    train_steps,
    sample_steps,
    repeats,
    precision,
    compile,
    fused,
    inception,
    fid_batch_size,
    fid_precision,
    fid_precision_check,
    concurrent,
    fid_weights,
    full,
    epochs,
    fid_select_samples,
    fid_samples,
    train_samples,
    fid_ref_samples,
    data_dir,
    out,
    json_path,
):
    """Training images/s, sampling image-evaluations/s (eager and compiled side by side) and Inception
    images/s on this device; cached for `sweep`'s projections. `--full` then runs the study's path once."""
    if channels % 8:
        raise BadInput(f"--channels must be a multiple of 8, got {channels}")
    if json_path:
        folder = check_writable_dir(str(Path(json_path).parent), "--json")
        if not folder.is_dir():  # written after all the work: its folder must be there now
            raise BadInput(f"--json {json_path}: folder {folder} does not exist")
    if full and out:
        check_writable_dir(out)
    if full and batch_size > (train_samples or 60_000):
        raise BadInput(f"--batch-size {batch_size} is larger than --train-samples {train_samples}")
    if full:  # checked now, not after the bench: e.g. --fid-ref-samples beyond the split
        from mnist_diff.perf.bench import full_config

        try:
            full_config(
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
        except ValueError as err:
            raise BadInput(str(err)) from None
    dev = pick_device(device)
    if full and out:
        click.get_current_context().with_resource(own_run_folder(Path(out), out, resume=None))
    from mnist_diff.perf.bench import format_table, run_bench

    gpu = dev.type != "cpu"
    result = run_bench(
        dev,
        channels=channels,
        batch_size=batch_size,
        train_steps=train_steps or (50 if gpu else 5),
        sample_batch=sample_batch,
        sample_steps=sample_steps or (50 if gpu else 5),
        repeats=repeats,
        precision=precision,
        compile=compile,
        inception=inception,
        fid_weights=fid_weights,
        fid_batch_size=fid_batch_size,
        fused=fused,
        fid_precision=fid_precision,
        concurrent=concurrent or (),
    )
    if fid_precision_check:
        from mnist_diff.perf.bench import fid_precision_check as check

        try:
            result.update(
                check(
                    dev,
                    fid_precision_check,
                    data_dir=data_dir,
                    fid_weights=fid_weights,
                    fid_ref_samples=fid_ref_samples,
                    batch_size=fid_batch_size,
                )
            )
        except Exception as err:  # e.g. offline without MNIST or the weights: the rates still stand
            result["fid_check_error"] = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"
    from mnist_diff.perf.bench_cache import save
    from mnist_diff.study.projection import reference_projection, reference_seconds

    # the reference study as `sweep --dry-run` projects it at these rates: one home, study.projection
    result["projected_reference_study_s"] = reference_seconds(result, dev, channels, batch_size, precision)[1]
    click.echo(format_table(result))
    click.echo(f"cached for `sweep` projections: {save(result, dev, precision)}")
    click.echo(reference_projection(result, dev, channels, batch_size, precision))
    if full:
        import tempfile

        from mnist_diff.perf.bench import format_full, run_full

        with tempfile.TemporaryDirectory() as tmp:
            result["full"] = run_full(
                dev,
                Path(out or tmp),
                data_dir=data_dir,
                fid_weights=fid_weights,
                epochs=epochs,
                fid_select_samples=fid_select_samples,
                fid_samples=fid_samples,
                train_samples=train_samples,
                fid_ref_samples=fid_ref_samples,
                channels=channels,
                batch_size=batch_size,
                precision=precision,
                compile=compile,
            )
        click.echo(format_table(result))
        click.echo(format_full(result["full"]))
    text = json.dumps(result)
    click.echo(text)
    if json_path:
        Path(json_path).write_text(text + "\n")
