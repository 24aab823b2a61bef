#!/usr/bin/env python
"""mnist-diff command line: train, sample, evaluate, sweep, report, bench.

Heavy libraries (torch, mlflow, optuna) are imported inside the commands, so `--help` answers at once.
Bad input exits with code 2 and a one-line reason before any work starts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
from pathlib import Path

import click

from mnist_diff.choices import DEVICES, SAMPLERS, SCHEDULES
from mnist_diff.presets import PRESETS

RUN_LOCK = ".run.lock"  # in a train or bench --full --out folder: held by the run that writes there


class BadInput(click.ClickException):
    """A one-line usage error, exit code 2."""
    exit_code = 2


class OneLineErrors(click.Group):
    """Every usage error as a single `Error: ...` line (click's default adds usage lines)."""

    def main(self, args=None, prog_name=None, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            rv = super().main(args, prog_name, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.ClickException as e:
            from mnist_diff.util.redact import redact_text
            click.echo(f"Error: {redact_text(e.format_message())}", err=True)
            sys.exit(e.exit_code)
        except (click.Abort, KeyboardInterrupt):
            click.echo("Aborted.", err=True)
            sys.exit(130)
        except Exception:  # a crash: its traceback, less any password a library's error message quotes
            import traceback

            from mnist_diff.util.redact import redact_text
            click.echo(redact_text(traceback.format_exc()), err=True, nl=False)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


# -- parameter types ---------------------------------------------------------------------------------

class BlankIsDefault:
    """Mixin for a click type: an empty value is None, "not given" (the option's default applies). MLproject
    passes every option unconditionally, and an empty string is how `mlflow run` says the user gave none."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            return None
        return super().convert(value, param, ctx)


# click's IntRange, FloatRange and Choice, taking '' for "not given" as well
class OptionalInt(BlankIsDefault, click.IntRange):
    pass


class OptionalFloat(BlankIsDefault, click.FloatRange):
    pass


class OptionalChoice(BlankIsDefault, click.Choice):
    pass


class OptionalPath(BlankIsDefault, click.Path):
    pass


class MnistRoot(click.Path):
    """A torchvision root that holds MNIST (`data.check_mnist_root`): read, never downloaded into."""

    def convert(self, value, param, ctx):
        path = super().convert(value, param, ctx)
        from mnist_diff.runtime.data import check_mnist_root
        try:
            check_mnist_root(path)
        except ValueError as err:
            self.fail(str(err), param, ctx)
        return path


class InceptionWeights(click.Path):
    """torch-fidelity's Inception weights file (`evaluate.check_weights`), checked before any work."""

    def convert(self, value, param, ctx):
        path = super().convert(value, param, ctx)
        from mnist_diff.fid.engine import check_weights
        try:
            check_weights(path)
        except ValueError as err:
            self.fail(f"{path}: {err}", param, ctx)
        return path


class Workers(click.ParamType):
    """`auto` (one worker per visible GPU; 1 without a GPU) or a count >= 1; empty means auto."""
    name = "auto|N"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        text = str(value).strip()
        if text in ("", "auto"):
            return "auto"
        if not text.isdigit() or int(text) < 1:
            self.fail(f"{value!r} is neither auto nor a count >= 1", param, ctx)
        return int(text)


class Duration(click.ParamType):
    """A time span: seconds (`600`), or numbers with units h, m/min, s (`25m`, `1h30m`, `1.5h`); empty: not
    given. Returns seconds."""
    name = "DURATION"
    UNITS = {"h": 3600, "m": 60, "min": 60, "s": 1, "": 1}

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, (int, float)):
            return value
        text = str(value).strip().lower().replace(" ", "")
        if not text:
            return None
        parts = re.findall(r"(\d+(?:\.\d+)?)(h|min|m|s|)", text)
        if not parts or "".join(n + u for n, u in parts) != text or float(parts[0][0]) <= 0:
            self.fail(f"{value!r} is not a time span such as 600, 90s, 25m or 1h30m", param, ctx)
        return sum(float(n) * self.UNITS[u] for n, u in parts)


class ChoiceList(click.ParamType):
    """Some of `choices` as a comma list in one value (`linear,cosine`), or `all`: as a tuple, in the order of
    `choices`, so the same selection always makes the same grid."""
    name = "list"

    def __init__(self, choices):
        self.choices = tuple(choices)

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        items = [v.strip() for v in str(value).split(",")]
        if "all" in items:
            return self.choices
        for item in items:
            if item not in self.choices:
                self.fail(f"{item!r} is not one of {', '.join(map(repr, self.choices))} or 'all'", param, ctx)
        return tuple(c for c in self.choices if c in items)


def selected(values: tuple, choices: tuple) -> tuple:
    """The union of a repeatable ChoiceList option's values, in the order of `choices`."""
    return tuple(c for c in choices if any(c in v for v in values))


# -- shared options ----------------------------------------------------------------------------------

def _apply(options):
    def decorator(f):
        for option in reversed(options):
            f = option(f)
        return f
    return decorator


schedule_options = _apply([
    click.option("--schedule", type=click.Choice(SCHEDULES), default="linear", show_default=True,
                 help="Beta schedule. cosine (improved DDPM) is defined by alpha_bar alone and IGNORES "
                      "--beta-start/--beta-end: for it only --timesteps matters."),
    click.option("--timesteps", type=click.IntRange(min=2), default=1000, show_default=True,
                 help="Diffusion steps T."),
    click.option("--beta-start", type=float, default=1e-4, show_default=True, help="First beta (not for cosine)."),
    click.option("--beta-end", type=float, default=0.02, show_default=True, help="Last beta (not for cosine)."),
])

sampler_options = _apply([
    click.option("--sampler", type=click.Choice(SAMPLERS), default="ddpm", show_default=True,
                 help="ddpm: ancestral, all T steps. ddim: --ddim-steps steps from T-1 to 0."),
    click.option("--ddim-steps", type=click.IntRange(min=1), default=50, show_default=True,
                 help="DDIM steps (<= --timesteps)."),
    click.option("--eta", type=click.FloatRange(0, 1), default=0.0, show_default=True,
                 help="DDIM noise: 0 is deterministic given x_T, 1 matches DDPM's variance."),
    click.option("--clip-x0/--no-clip-x0", default=True, show_default=True,
                 help="Clip each step's predicted x_0 to [-1, 1] (both samplers). It changes DDPM and DDIM "
                      "differently, so it is part of any comparison of the two."),
])

device_option = click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                             help="auto picks CUDA, then MPS, then CPU.")
compile_option = click.option(
    "--compile", type=click.Choice(("auto", "on", "off")), default="auto", show_default=True,
    help="torch.compile the UNet (on CUDA with CUDA graphs) for sampling and training. auto: on for CUDA, off "
         "elsewhere (compiling costs minutes on a CPU). If it fails: one warning, then eager.")
sample_batch_option = click.option(
    "--sample-batch-size", type=click.IntRange(min=1), default=None,
    help="Images per sampling batch (speed only: image i depends on (seed, i)). Default: what the device "
         "holds (up to 2000 on a GPU, 64 on CPU).")
data_dir_option = click.option(
    "--data-dir", type=MnistRoot(exists=True, file_okay=False), envvar="MNIST_DIFF_DATA_DIR",
    help="torchvision root holding MNIST/raw (env MNIST_DIFF_DATA_DIR); read, never downloaded into. "
         "Default: download into ~/.cache/mnist-diff/data on first use.")


fid_options = _apply([
    click.option("--fid-every", type=click.IntRange(min=0), default=1, show_default=True,
                 help="Score the EMA model every N epochs (0: never) and keep the best epoch."),
    click.option("--fid-select-samples", type=OptionalInt(min=2), default=2000, show_default=True,
                 help="Images per epoch-selection FID."),
    click.option("--fid-samples", type=OptionalInt(min=0), default=10000, show_default=True,
                 help="Images for the final FID of the best epoch, not the selection's: best_fid (0: skip)."),
    click.option("--fid-ref", type=click.Choice(("train", "test")), default="train", show_default=True,
                 help="MNIST split the samples are compared with."),
    click.option("--fid-ref-samples", type=OptionalInt(min=2), default=None,
                 help="Use only the first N reference images (default: the whole split)."),
    click.option("--fid-batch-size", type=OptionalInt(min=1), default=500, show_default=True,
                 help="Batch for the Inception network."),
    sample_batch_option,
    click.option("--kid", is_flag=True, help="Also compute KID."),
    click.option("--grid-images", type=OptionalInt(min=1, max=1024), default=64, show_default=True,
                 help="Images in each epoch's sample grid (own seeds; drawn with the selection images)."),
    click.option("--grid-every", type=OptionalInt(min=0), default=1, show_default=True,
                 help="Draw the sample grid every N epochs and at the last (0: never). Set it to --fid-every "
                      "and each grid is drawn in its epoch's selection pass: small batches cost GPU time."),
])

fid_weights_option = click.option(
    "--fid-weights", type=InceptionWeights(exists=True, dir_okay=False), envvar="MNIST_DIFF_FID_WEIGHTS",
    help="torch-fidelity Inception weights file (env MNIST_DIFF_FID_WEIGHTS); default: torch-fidelity downloads them.")

tracking_options = _apply([
    click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
                 help="MLflow tracking URI (env MLFLOW_TRACKING_URI). Default: sqlite:///mlflow.db here."),
    click.option("--experiment", default="mnist-diff", show_default=True, help="MLflow experiment name."),
    click.option("--no-tracking", is_flag=True, help="Don't log to MLflow."),
])


training_options = _apply([
    click.option("--epochs", type=OptionalInt(min=1), default=20, show_default=True),
    click.option("--batch-size", type=OptionalInt(min=1), default=128, show_default=True),
    click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-4, show_default=True,
                 help="AdamW learning rate, after a linear warm-up of --warmup-steps."),
    click.option("--warmup-steps", type=OptionalInt(min=0), default=500, show_default=True),
    click.option("--ema-decay", type=click.FloatRange(0, 1, max_open=True), default=0.999, show_default=True,
                 help="EMA of the weights used for sampling; 0 turns it off."),
    click.option("--ema-warmup-steps", type=OptionalInt(min=0), default=400, show_default=True,
                 help="The EMA decay ramps linearly from 0 to --ema-decay over these optimizer steps "
                      "(0: --ema-decay from the start); logged as the metric ema_decay."),
    click.option("--channels", type=OptionalInt(min=8), default=64, show_default=True,
                 help="UNet base width (multiple of 8); 64 is 2.9M parameters."),
    click.option("--precision", type=click.Choice(("auto", "fp32", "bf16")), default="auto", show_default=True,
                 help="auto: bf16 autocast where the device has native bf16 (GPUs of compute capability "
                      "8.0+, CPUs with AVX512-BF16 or AMX), fp32 elsewhere."),
    click.option("--train-samples", type=OptionalInt(min=1), default=None,
                 help="Train on the first N MNIST images only (smoke runs, tests)."),
    click.option("--max-steps", type=OptionalInt(min=1), default=None, help="Stop after N optimizer steps."),
])


def out_option(default: str):
    return click.option("--out", type=click.Path(file_okay=False), default=default, show_default=True,
                        help="Output folder.")


# -- validation helpers --------------------------------------------------------------------------------

def check_writable_dir(path: str, flag: str = "--out") -> Path:
    """Fail (exit 2) unless `path` is, or could be created as, a writable folder. Creates nothing."""
    p = Path(path).expanduser().absolute()
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise BadInput(f"{flag} {path!r} can't be created: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK) or (os.statvfs(probe).f_flag & os.ST_RDONLY):
        raise BadInput(f"{flag} {path!r} is not writable")
    return p


@contextlib.contextmanager
def own_run_folder(out_path: Path, out: str, resume: bool | None = False):
    """Hold --out for a training run's life (one check for `train` and `bench --full`): exit 2 while another
    run holds it, when it holds a training run this command does not resume (`resume` None: the command
    can't), or, resuming, when none of its checkpoints is readable. The last check: it creates the folder."""
    from mnist_diff.runtime import checkpoint
    from mnist_diff.util.locks import Busy, try_file_lock
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(try_file_lock(out_path / RUN_LOCK))
        except Busy as err:
            raise BadInput(f"--out {out} is in use by another run" + (f" (pid {err.pid})" if err.pid else ""))
        ckpt_dir = out_path / "checkpoints"
        trained = checkpoint.list_steps(ckpt_dir)
        if trained and not resume:
            hint = "choose another --out" if resume is None else "pass --resume, or choose another --out"
            raise BadInput(f"--out {out} already holds a training run: {hint}")
        if trained and checkpoint.load_latest(ckpt_dir, warn=False) is None:
            raise BadInput(f"--out {out}: its checkpoints are unreadable (corrupt, or not mnist-diff ones)")
        yield


def open_tracker(tracking_uri, experiment, no_tracking, **kwargs):
    """A Tracker whose store was checked reachable (exit 2 otherwise), or None with --no-tracking."""
    if no_tracking:
        return None
    from mnist_diff.tracking import mlflow_store as tracking
    return tracking.Tracker(checked_tracking_uri(tracking_uri), experiment, **kwargs)


def refuse_in_memory(url: str | None, flag: str) -> None:
    """Exit 2 for an in-memory SQLite database (`sqlite://`, `sqlite:///:memory:`): what is written to it
    vanishes when the command ends."""
    if url and re.match(r"sqlite(\+\w+)?://", url) and (
            re.fullmatch(r"sqlite(\+\w+)?:///?", url) or ":memory:" in url or "mode=memory" in url):
        raise BadInput(f"{flag} {url} is an in-memory database, lost when the command ends; give a file "
                       "(e.g. sqlite:///mlflow.db)")


def checked_tracking_uri(tracking_uri) -> str:
    """The resolved MLflow URI, once its store is known to be reachable (exit 2 otherwise). Creates nothing."""
    from mnist_diff.tracking import mlflow_store as tracking
    refuse_in_memory(tracking_uri, "--tracking-uri")
    uri = tracking.resolve_uri(tracking_uri)
    try:
        tracking.check_reachable(uri)
    except tracking.TrackingUnavailable as err:
        from mnist_diff.util.redact import redact_text
        raise BadInput(redact_text(str(err), uri))
    return uri


def make_config(**fields):
    """A validated Config (exit 2 otherwise). A None field is one the user did not give: Config's default."""
    from mnist_diff.config import Config
    try:
        return Config(**{k: v for k, v in fields.items() if v is not None})
    except ValueError as err:
        raise BadInput(str(err)) from None


def pick_device(name: str):
    import torch

    from mnist_diff.runtime.device import configure_backend, resolve_device
    if name == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda: CUDA is not available on this machine")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise BadInput("--device mps: MPS is not available")
    device = resolve_device(name)
    configure_backend(device)
    return device


# -- commands ----------------------------------------------------------------------------------------

@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli():
    """Train, sample, score and compare diffusion models on MNIST."""


@cli.command()
@schedule_options
@sampler_options
@training_options
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in --out.")
@click.option("--dry-run", is_flag=True, help="Print the resolved config and exit.")
@fid_options
@fid_weights_option
@tracking_options
@click.option("--run-name", default=None, help="MLflow run name (default: derived from the config).")
@device_option
@compile_option
@data_dir_option
@out_option("runs/train")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train(device, data_dir, out, resume, dry_run, quiet, fid_weights, tracking_uri, experiment, no_tracking,
          run_name, **fields):
    """Train one config; score FID as it trains; write checkpoints and sample grids into --out; track in MLflow."""
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
    tracker = open_tracker(tracking_uri, experiment, no_tracking, run_name=run_name or config.short_name())
    click.get_current_context().with_resource(own_run_folder(out_path, out, resume))

    from mnist_diff.fid.engine import Reference
    from mnist_diff.runtime.data import load_mnist
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
        raise BadInput(f"--resume: --out {out} was trained with other settings: {said}; give those, "
                       "or another --out")


def summary_line(result: dict) -> str:
    line = f"trained {result['steps']} steps ({result['epochs_done']} epochs) -> {result['out_dir']}"
    if result.get("best_fid") is not None:
        line += (f"; best epoch {result['best_epoch']}: FID {result['best_fid']:.2f} "
                 f"({result['config']['fid_samples']} samples)")
    return line


@cli.command()
@click.option("--checkpoint", "checkpoint_path", type=click.Path(exists=True, dir_okay=False), required=True,
              help="A training checkpoint (ckpt-*.pt) or per-epoch EMA file (ema-epoch-*.pt).")
@click.option("--num-samples", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--sampler", type=OptionalChoice(SAMPLERS), default=None,
              help="Default: the checkpoint's own sampler.")
@click.option("--ddim-steps", type=OptionalInt(min=1), default=None, help="Default: the checkpoint's.")
@click.option("--eta", type=OptionalFloat(0, 1), default=None, help="Default: the checkpoint's.")
@click.option("--clip-x0/--no-clip-x0", default=None,
              help="Clip the predicted x_0 to [-1, 1]. Default: the checkpoint's.")
@click.option("--seed", type=int, default=0, show_default=True, help="Image i depends on (seed, i) only.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Images per sampling batch. Default: what the device holds (up to 2000 on a GPU, 64 on CPU).")
@device_option
@compile_option
@out_option("runs/samples")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def sample(checkpoint_path, num_samples, sampler, ddim_steps, eta, clip_x0, seed, batch_size, device, compile, out,
           quiet):
    """Draw images from a checkpoint: a grid PNG and all images as uint8 (samples.npz) into --out."""
    out_path = check_writable_dir(out)
    dev = pick_device(device)
    from mnist_diff.diffusion.schedules import make_schedule
    from mnist_diff.runtime.generate import generate

    model, trained, _ = _load_checkpoint(checkpoint_path, dev)
    config = with_sampling(trained, sampler, ddim_steps, eta, clip_x0=clip_x0)
    schedule = make_schedule(config.schedule, config.timesteps, config.beta_start, config.beta_end)
    images = generate(model, schedule, num=num_samples, seed=seed, sampler=config.sampler,
                      ddim_steps=config.ddim_steps, eta=config.eta, clip_x0=config.clip_x0, batch_size=batch_size,
                      precision=config.precision, progress=not quiet, compile=compile)
    npz, grid = _save_samples(images, out_path, config, seed, checkpoint_path)
    click.echo(f"{num_samples} images ({config.sampler}) -> {npz}, {grid}")


def with_sampling(trained, sampler, ddim_steps, eta, clip_x0=None, **more):
    """A checkpoint's config with the sampling options the user gave (None keeps the checkpoint's), validated:
    e.g. --ddim-steps above the checkpoint's --timesteps is exit 2."""
    given = {"sampler": sampler, "ddim_steps": ddim_steps, "eta": eta, "clip_x0": clip_x0}
    return make_config(**{**trained.to_dict(), **{k: v for k, v in given.items() if v is not None}, **more})


def _load_checkpoint(path, device):
    from mnist_diff.training.trainer import load_sampling_model
    try:
        return load_sampling_model(path, device)
    except Exception as err:  # a truncated, corrupt or foreign file is bad input, not a crash
        raise BadInput(f"--checkpoint {path}: unreadable ({type(err).__name__}: {str(err).splitlines()[0]})")


def _save_samples(images, out_path: Path, config, seed: int, source) -> tuple[Path, Path]:
    import math

    import numpy as np

    from mnist_diff.runtime.data import save_grid
    from mnist_diff.util.atomic import atomic_path

    out_path.mkdir(parents=True, exist_ok=True)
    npz = out_path / "samples.npz"
    with atomic_path(npz) as tmp:
        np.savez_compressed(tmp, images=images.cpu().numpy(), seed=seed, sampler=config.sampler,
                            ddim_steps=config.ddim_steps, eta=config.eta, clip_x0=config.clip_x0,
                            checkpoint=str(source))
    shown = images[:100]
    grid = save_grid(shown, out_path / "samples.png", nrow=math.ceil(math.sqrt(len(shown))))
    return npz, grid




@cli.command()
@click.option("--study-name", default="mnist-diff-study", show_default=True, help="Optuna study name.")
@click.option("--storage", default="sqlite:///optuna.db", show_default=True,
              help="Optuna storage URL: SQLite here, or e.g. postgresql://user:pw@host/db for many workers.")
@click.option("--schedule", "schedules", type=ChoiceList(SCHEDULES), multiple=True, default=["all"],
              show_default=True, help="Narrow the grid to these schedules: a comma list (linear,cosine), "
                                      "repeatable; all: the four.")
@click.option("--timesteps", "timesteps_list", type=ChoiceList(("200", "1000")), multiple=True, default=["all"],
              show_default=True, help="Narrow to these (T, beta_end) settings: 200 is (200, 0.08), 1000 is "
                                      "(1000, 0.02); a comma list or all. cosine ignores beta_end, so for it they "
                                      "differ only in T.")
@click.option("--sampler", "samplers", type=ChoiceList(SAMPLERS), multiple=True, default=["all"],
              show_default=True, help="Narrow to these samplers: ddpm, ddim, ddpm,ddim or all.")
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Run each grid point with seeds 0..K-1 (training shared across samplers as usual).")
@click.option("--grid", "grid_options", multiple=True, metavar="NAME=V1,V2",
              callback=lambda ctx, param, values: tuple(v for v in values if v.strip()),  # '': not given
              help="Vary any config field too: ddim_steps=10,50,100; coupled fields as one dimension: "
                   "timesteps:beta_end=200:0.08,500:0.04. Repeatable; ';' separates several in one value. "
                   "A dimension replaces the reference one it shares a field with (e.g. sampler=ddim).")
@click.option("--grid-file", type=OptionalPath(exists=True, dir_okay=False), default=None,
              help="TOML file of grid dimensions: a [grid] table of field = [values] and \"f1:f2\" = [[a, b], ...].")
@click.option("--max-points", type=click.IntRange(min=1), default=256, show_default=True,
              help="Refuse a grid with more points than this (seeds included).")
@click.option("--beta-start", type=float, default=1e-4, show_default=True)
@click.option("--ddim-steps", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--eta", type=click.FloatRange(0, 1), default=0.0, show_default=True)
@click.option("--clip-x0/--no-clip-x0", default=True, show_default=True,
              help="Clip each step's predicted x_0 to [-1, 1] (both samplers); the report names the setting.")
@training_options
@fid_options
@fid_weights_option
@tracking_options
@click.option("--preset", type=click.Choice(tuple(PRESETS)), default="study", show_default=True,
              help="study: the reference study's settings. smoke: every grid point on CPU in minutes "
                   "(tiny model and data, tiny FID counts); options you give still win.")
@click.option("--workers", type=Workers(), default="auto", show_default=True,
              help="Worker processes on this machine, given its GPUs in turn. auto: one per visible GPU; on a "
                   "CPU 1, or with --preset smoke one per core (at most one per training). More workers than GPUs "
                   "share them (on an H100 no faster than one each). Several workers show one study bar.")
@click.option("--heartbeat", type=click.IntRange(min=1), default=60, show_default=True,
              help="Seconds between trial heartbeats; a trial silent for twice this is retried.")
@click.option("--dry-run", is_flag=True,
              help="Print the study's work per phase and its projected time on this device, then exit: "
                   "creates no study, run or folder.")
@click.option("--time-budget", type=Duration(), default=None,
              help="Fit the study into this time on this device (e.g. 25m, 1h30m): where the projection is longer, "
                   "score fewer selection images, score only every 2nd, 4th, ... epoch, or fewer final images "
                   "(workload.PROTOCOL_STEPS, most faithful first); epochs and training are never cut. Exit 2 "
                   "when even the smallest protocol does not fit.")
@click.option("--rebench", is_flag=True,
              help="Measure this device again for the projection (a quick bench of each model the grid trains) "
                   "instead of using the cached rates, e.g. after the cached ones were measured under load.")
@click.option("--max-retries", type=click.IntRange(min=0), default=2, show_default=True,
              help="Retries per grid point, each resuming from the last checkpoint, after a failure that may pass "
                   "(CUDA OOM, disk, network, tracking or storage errors, a dead worker). A non-finite loss or an "
                   "invalid config is not retried: it would fail again (see --retry-failed).")
@click.option("--retry-failed", is_flag=True,
              help="Queue every FAILed grid point of the study again with a fresh retry budget, including "
                   "deterministic failures (non-finite loss, invalid config), e.g. after changing the code.")
@device_option
@compile_option
@data_dir_option
@out_option("runs/sweep")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def sweep(ctx, study_name, storage, schedules, timesteps_list, samplers, seeds, grid_options, grid_file, max_points,
          preset, workers, heartbeat, dry_run, time_budget, rebench, max_retries, retry_failed, fid_weights, tracking_uri,
          experiment, no_tracking, device, data_dir, out, quiet, **fields):
    """Run (or resume) a study as an Optuna grid, every trial tracked in MLflow: the reference study (4
    schedules x 2 (T, beta_end) x 2 samplers), narrowed by --schedule/--timesteps/--sampler, extended by --grid."""
    if no_tracking:
        raise BadInput("sweep always tracks in MLflow: drop --no-tracking")
    for key, value in PRESETS[preset].items():  # what the user left out or gave empty (MLproject's "not given")
        if fields[key] is None or ctx.get_parameter_source(key) is click.core.ParameterSource.DEFAULT:
            fields[key] = value
    schedules, samplers = selected(schedules, SCHEDULES), selected(samplers, SAMPLERS)
    steps = selected(timesteps_list, ("200", "1000"))
    grid, extra = study_grid(schedules, steps, samplers, seeds, grid_options, grid_file, max_points)
    for dim in extra:  # a typed option the grid would silently override
        for field in dim.fields:
            given = field in fields and fields[field] is not None  # None: MLproject's '' (not given)
            if given and ctx.get_parameter_source(field) is click.core.ParameterSource.COMMANDLINE:
                raise BadInput(f"--{field.replace('_', '-')} {fields[field]} is also the grid dimension "
                               f"'{dim.label}': give {field} in one place")
    base = make_config(**fields)  # the fixed settings; each point then sets its grid fields
    from mnist_diff.perf.workload import unscored
    from mnist_diff.study.grid import GridError
    try:  # every point must be valid, e.g. --ddim-steps <= T, and give a score
        grid.configs(base, max_points, check=lambda c: unscored(c, ranked=True))
    except GridError as err:
        raise BadInput(str(err)) from None
    out_path = check_writable_dir(out)
    check_storage(storage)
    tracking_uri = checked_tracking_uri(tracking_uri)
    dev = pick_device(device)
    if time_budget is not None:
        from mnist_diff.study.storage import budget_protocol
        kept = None if dry_run else budget_protocol(storage, study_name)  # a dry run opens no store
        if kept:  # a resumed study keeps its protocol, whatever the rates cached since would choose
            base = base.replace(**kept)
            click.echo(f"--time-budget: study {study_name!r} goes on with the protocol it was created with: "
                       f"selection FID on {base.fid_select_samples:,} images every {base.fid_every} epoch(s), "
                       f"final FID on {base.fid_samples:,}")
        else:
            base = fit_time_budget(grid, base, max_points, dev, time_budget, rebench)
            rebench = False  # measured now
    if workers == "auto":
        workers = auto_workers(dev, preset, grid.configs(base, max_points))

    from mnist_diff.study.spec import Sweep
    from mnist_diff.study.storage import open_study
    from mnist_diff.study.sweep import SweepFailed, run_sweep
    from mnist_diff.training.trainer import StopSignals

    in_grid = {"schedule", "timesteps", "beta_end", "sampler", "seed", *(f for d in grid.dims for f in d.fields)}
    fixed = {k: v for k, v in base.to_dict().items() if k not in in_grid}
    spec = Sweep(study_name=study_name, out_dir=out_path, base=base, schedules=schedules,
                 pairs=pairs_of(steps), samplers=samplers, seeds=tuple(range(seeds)), extra=tuple(extra), storage=storage,
                 tracking_uri=tracking_uri, experiment=experiment, data_dir=data_dir, fid_weights=fid_weights,
                 device=device, progress=not quiet, heartbeat=heartbeat, max_retries=max_retries,
                 fixed={**fixed, "preset": preset,
                        **({"time_budget": time_budget} if time_budget is not None else {})})
    if not dry_run:
        try:  # run_sweep opens it first too; here so a study with another grid is refused before the projection
            open_study(spec)
        except ValueError as err:
            raise BadInput(str(err))
    projection = print_projection(spec, dev, workers, rebench)
    if dry_run:
        return
    spec = dataclasses.replace(spec, projection=projection)
    failed = None
    try:
        with StopSignals():
            doc = run_sweep(spec, workers=workers, retry_failed=retry_failed)
    except SweepFailed as err:  # the results are written; say what they hold, then fail
        doc, failed = err.doc, err
    except ValueError as err:  # e.g. the study exists with another grid
        raise BadInput(str(err))
    click.echo(f"study {study_name}: {doc['complete']}/{doc['grid_size']} grid points complete "
               f"-> {out_path / 'grid_search_results.json'}")
    if doc["best"]:
        b = doc["best"]
        click.echo(f"best: {b['params']} FID {b['best_fid']:.2f} (epoch {b['best_epoch']})")
    from mnist_diff.tracking import mlflow_store as tracking
    click.echo(f"browse: {tracking.ui_command(tracking_uri)}  (experiment {experiment!r})")
    if failed is not None:
        raise click.ClickException(str(failed))


def auto_workers(dev, preset: str, configs) -> int:
    """`--workers auto`: one per visible GPU. On a CPU, 1, except for the smoke preset: its width-8 model gains
    little from PyTorch's threads, so one single-threaded worker per core (at most one per training) is
    faster (docs/BENCHMARKS.md, smoke study)."""
    if dev.type == "cuda":
        import torch
        return max(1, torch.cuda.device_count())
    if preset == "smoke" and dev.type == "cpu":
        return max(1, min(os.cpu_count() or 1, len({c.training_key() for c in configs})))
    return 1


def pairs_of(steps: tuple) -> tuple:
    """The reference (T, beta_end) settings named by `--timesteps` (200, 1000)."""
    from mnist_diff.presets import STUDY_PAIRS
    return tuple(p for p in STUDY_PAIRS if str(p[0]) in steps)


def study_grid(schedules, steps, samplers, seeds: int, grid_options, grid_file, max_points):
    """(Grid, extra dimensions) of a sweep: the reference grid narrowed by the shorthands, then --grid and
    --grid-file dimensions. Every error is a one-line BadInput before anything starts."""
    from mnist_diff.study.grid import (
        Grid,
        GridError,
        load_file,
        parse_option,
        reference_dims,
    )
    try:
        extra = [parse_option(part) for text in grid_options for part in text.split(";") if part.strip()]
        if grid_file:
            extra += load_file(grid_file)
        if seeds != 1 and any("seed" in d.fields for d in extra):  # the grid's seeds would replace them
            raise BadInput(f"--seeds {seeds} and the grid dimension 'seed' both set the seeds: give them in one place")
        grid = Grid.build(reference_dims(schedules, pairs_of(steps), samplers), extra, range(seeds))
    except GridError as err:
        raise BadInput(str(err)) from None
    if grid.size > max_points:
        raise BadInput(f"the grid has {grid.size} points, more than --max-points {max_points}")
    return grid, extra


def fit_time_budget(grid, base, max_points: int, dev, seconds: float, rebench: bool = False):
    """`base` with the most faithful FID protocol that fits `seconds` on this device (`projection.fit_to_budget`),
    said in one line; BadInput when the grid varies the protocol, nothing fits or nothing can be measured."""
    from mnist_diff.perf import workload
    from mnist_diff.study import projection
    varied = sorted(set(workload.PROTOCOL_KNOBS) & {f for d in grid.dims for f in d.fields})
    if varied:
        raise BadInput(f"--time-budget chooses the FID protocol, which the grid varies ({', '.join(varied)}): "
                       "drop one of them")
    configs = grid.configs(base, max_points)
    try:
        rates = projection.device_rates(configs, dev, say=click.echo, remeasure=rebench)
    except Exception as err:
        raise BadInput(f"--time-budget {workload.format_duration(seconds)}: measuring this device failed "
                       f"({type(err).__name__}: {err})")
    try:
        base, said = projection.fit_to_budget(configs, base, rates, seconds)
    except projection.BudgetError as err:
        raise BadInput(str(err)) from None
    click.echo(said)
    return base


def print_projection(spec, dev, workers: int = 1, rebench: bool = False) -> dict | None:
    """Print the study's work per phase and its projected time at this device's bench rates in one of `workers`
    worker processes (measured and cached on first use, or again with `rebench`), and its wall time with them;
    the full grid, whatever a resumed study has done. Returns the record for study.json."""
    from itertools import product

    from mnist_diff.study import projection

    space = spec.search_space()
    configs = [spec.config_for(dict(zip(space, values))) for values in product(*space.values())]
    try:
        rates = projection.device_rates(configs, dev, say=click.echo, remeasure=rebench, workers=workers)
    except Exception as err:  # a projection is advice: it never stops the study
        click.echo(f"no time projection: measuring this device failed ({type(err).__name__}: {err})")
        rates = None
    text, record = projection.study_projection(configs, rates, dev,
                                               suggest_smoke=spec.fixed.get("preset") != "smoke", workers=workers)
    click.echo(text)
    return record


def check_storage(url: str) -> None:
    """The Optuna storage must be reachable before any training starts. Creates nothing for SQLite."""
    refuse_in_memory(url, "--storage")
    if url.startswith("sqlite:///"):
        folder = Path(url[len("sqlite:///"):]).expanduser().absolute().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise BadInput(f"--storage {url}: folder {folder} does not exist or is not writable")
        return
    try:
        import sqlalchemy
        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 5} if "postgres" in url else {})
        with engine.connect():
            pass
    except Exception as err:
        from mnist_diff.util.redact import redact_text, redact_url
        raise BadInput(f"--storage {redact_url(url)} is unreachable: {redact_text(str(err).splitlines()[0], url)}")


@cli.command()
@click.option("--study", "study_name", default=None, help="The study to report on (read from MLflow).")
@click.option("--results", "results_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Or a grid_search_results.json written by `sweep`.")
@click.option("--storage", default="sqlite:///optuna.db", show_default=True,
              help="Accepted for symmetry with `sweep`; the report reads the study's runs from MLflow.")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
              help="MLflow tracking URI (env MLFLOW_TRACKING_URI). Default: sqlite:///mlflow.db here.")
@click.option("--no-tracking", is_flag=True, help="Don't log the report to the study's parent run.")
@out_option("runs/report")
def report(study_name, results_path, storage, tracking_uri, no_tracking, out):
    """The study's findings: tables, the reference study's claims checked, figures (report.md/html + PNGs)."""
    if (study_name is None) == (results_path is None):
        raise BadInput("give exactly one of --study and --results")
    out_path = check_writable_dir(out)
    refuse_in_memory(storage, "--storage")
    from mnist_diff.report import analysis as report_mod
    from mnist_diff.report.reader import load_study_from_mlflow
    from mnist_diff.report.write import write_report
    from mnist_diff.tracking import mlflow_store as tracking

    tracker = None
    if results_path is not None:
        try:
            records, study = report_mod.load_records_from_json(results_path)
        except (ValueError, KeyError) as err:
            raise BadInput(f"--results {results_path}: not a grid_search_results.json ({err})")
    else:
        uri = checked_tracking_uri(tracking_uri)
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
            raise BadInput(f"no MLflow run tagged as study {study_name!r}: there is no store at {uri}")
        try:
            records, study, parent_id = load_study_from_mlflow(uri, study_name)
        except LookupError as err:
            raise BadInput(str(err).strip("'\""))
        if not no_tracking:
            tracker = tracking.Tracker(uri)
            tracker.run_id = parent_id
    out_path.mkdir(parents=True, exist_ok=True)
    write_report(records, study, out_path, tracker=tracker)
    click.echo(f"report -> {out_path / 'report.md'} ({out_path / 'report.html'})")
    if tracker is not None:
        click.echo(f"logged to the study's parent run {tracker.run_id} under report/")


@cli.command()
@click.option("--checkpoint", "checkpoint_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Score a checkpoint: sample --num-samples images from it first.")
@click.option("--images", "images_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Score the images in a samples.npz written by `sample`.")
@click.option("--num-samples", type=click.IntRange(min=2), default=10000, show_default=True)
@click.option("--sampler", type=OptionalChoice(SAMPLERS), default=None, help="Default: the checkpoint's.")
@click.option("--ddim-steps", type=OptionalInt(min=1), default=None, help="Default: the checkpoint's.")
@click.option("--eta", type=OptionalFloat(0, 1), default=None, help="Default: the checkpoint's.")
@click.option("--clip-x0/--no-clip-x0", default=None,
              help="Clip the predicted x_0 to [-1, 1]. Default: the checkpoint's.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--fid-ref", type=click.Choice(("train", "test")), default="train", show_default=True)
@click.option("--fid-ref-samples", type=OptionalInt(min=2), default=None,
              help="Use only the first N reference images (default: the whole split).")
@click.option("--fid-batch-size", type=click.IntRange(min=1), default=500, show_default=True)
@sample_batch_option
@click.option("--kid", is_flag=True, help="Also compute KID.")
@fid_weights_option
@tracking_options
@device_option
@compile_option
@data_dir_option
@click.option("--quiet", is_flag=True, help="No progress bars.")
def evaluate(checkpoint_path, images_path, num_samples, sampler, ddim_steps, eta, clip_x0, seed, fid_ref,
             fid_ref_samples, fid_batch_size, sample_batch_size, kid, fid_weights, tracking_uri, experiment,
             no_tracking, device, compile, data_dir, quiet):
    """FID of a checkpoint (sampled with the chosen sampler) or of a samples.npz, printed and tracked."""
    if (checkpoint_path is None) == (images_path is None):
        raise BadInput("give exactly one of --checkpoint and --images")
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
        model, trained, _ = _load_checkpoint(checkpoint_path, dev)
        config = with_sampling(trained, sampler, ddim_steps, eta, clip_x0, fid_batch_size=fid_batch_size, seed=seed,
                               compile=compile, sample_batch_size=sample_batch_size)
        params = {**config.to_dict(), "checkpoint": checkpoint_path, "num_samples": num_samples}
    tracker = open_tracker(tracking_uri, experiment, no_tracking, run_name="evaluate",
                           tags={"mnist_diff.command": "evaluate"})

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


@cli.command()
@device_option
@click.option("--channels", type=click.IntRange(min=8), default=64, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="Training batch.")
@click.option("--sample-batch", type=click.IntRange(min=1), default=None,
              help="Sampling batch. Default: what the device holds (as for sampling: up to 2000 on a GPU, 64 on CPU).")
@click.option("--train-steps", type=click.IntRange(min=1), default=None,
              help="Optimizer steps per timed repeat. Default: 50 on a GPU, 5 on CPU.")
@click.option("--sample-steps", type=click.IntRange(min=2), default=None,
              help="Sampler steps per timed repeat. Default: 50 on a GPU, 5 on CPU.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--precision", type=click.Choice(("auto", "fp32", "bf16")), default="auto", show_default=True)
@click.option("--compile", type=click.Choice(("auto", "on", "off")), default="auto", show_default=True,
              help="Also measure compiled (auto: on CUDA; on a CPU compiling takes minutes). Eager is always measured.")
@click.option("--inception/--no-inception", default=True, show_default=True,
              help="Also measure the FID engine: Inception images/s and the fixed cost of a score.")
@click.option("--fid-batch-size", type=click.IntRange(min=1), default=None,
              help="Inception batch. Default: 500 on a GPU, 32 on CPU.")
@fid_weights_option
@click.option("--full", is_flag=True,
              help="Then check the whole GPU path: one real training of a study config (cosine, T=200, DDPM) "
                   "with a selection FID after every epoch and a final FID; one summary table (~3 min on an H100).")
@click.option("--epochs", type=click.IntRange(min=1), default=2, show_default=True, help="--full: epochs.")
@click.option("--fid-select-samples", type=click.IntRange(min=2), default=2000, show_default=True,
              help="--full: images per selection FID.")
@click.option("--fid-samples", type=click.IntRange(min=2), default=10000, show_default=True,
              help="--full: images of the final FID.")
@click.option("--train-samples", type=click.IntRange(min=1), default=None,
              help="--full: train on the first N MNIST images (default: all 60,000).")
@click.option("--fid-ref-samples", type=click.IntRange(min=2), default=None,
              help="--full: reference images (default: the whole training split).")
@data_dir_option
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="--full: where the training goes (default: a temporary folder, removed after).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the JSON result to this file.")
def bench(device, channels, batch_size, sample_batch, train_steps, sample_steps, repeats, precision, compile,
          inception, fid_batch_size, fid_weights, full, epochs, fid_select_samples, fid_samples, train_samples,
          fid_ref_samples, data_dir, out, json_path):
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
            full_config(epochs=epochs, batch_size=batch_size, channels=channels, precision=precision,
                        compile=compile, fid_select_samples=fid_select_samples, fid_samples=fid_samples,
                        train_samples=train_samples, fid_ref_samples=fid_ref_samples)
        except ValueError as err:
            raise BadInput(str(err)) from None
    dev = pick_device(device)
    if full and out:
        click.get_current_context().with_resource(own_run_folder(Path(out), out, resume=None))
    from mnist_diff.perf.bench import format_table, run_bench

    gpu = dev.type != "cpu"
    result = run_bench(dev, channels=channels, batch_size=batch_size,
                       train_steps=train_steps or (50 if gpu else 5),
                       sample_batch=sample_batch, sample_steps=sample_steps or (50 if gpu else 5),
                       repeats=repeats, precision=precision, compile=compile, inception=inception,
                       fid_weights=fid_weights, fid_batch_size=fid_batch_size)
    from mnist_diff.perf.bench_cache import save
    click.echo(format_table(result))
    click.echo(f"cached for `sweep` projections: {save(result, dev, precision)}")
    from mnist_diff.study.projection import reference_projection
    click.echo(reference_projection(result, dev, channels, batch_size, precision))
    if full:
        import tempfile

        from mnist_diff.perf.bench import format_full, run_full
        with tempfile.TemporaryDirectory() as tmp:
            result["full"] = run_full(dev, Path(out or tmp), data_dir=data_dir, fid_weights=fid_weights,
                                      epochs=epochs, fid_select_samples=fid_select_samples, fid_samples=fid_samples,
                                      train_samples=train_samples, fid_ref_samples=fid_ref_samples,
                                      channels=channels, batch_size=batch_size, precision=precision,
                                      compile=compile)
        click.echo(format_table(result))
        click.echo(format_full(result["full"]))
    text = json.dumps(result)
    click.echo(text)
    if json_path:
        Path(json_path).write_text(text + "\n")


if __name__ == "__main__":
    cli()
