"""Options shared by several commands. An option that sets a `Config` field is built from that field: its
default and help text live on the field (`config.Config`), only the click type (ranges, '' as "not given")
lives here."""

from __future__ import annotations

import dataclasses

import click

from mnist_diff.choices import COMPILE_CHOICES, DEVICES, FID_REFS, FUSED_CHOICES, PRECISIONS, SAMPLERS, SCHEDULES
from mnist_diff.cli.params import InceptionWeights, MnistRoot, OptionalInt
from mnist_diff.config import Config

FIELDS = {f.name: f for f in dataclasses.fields(Config)}
# The click type of each Config field a command takes. OptionalInt: MLproject passes '' for "not given".
FIELD_TYPES = {
    "schedule": click.Choice(SCHEDULES),
    "timesteps": click.IntRange(min=2),
    "beta_start": float,
    "beta_end": float,
    "sampler": click.Choice(SAMPLERS),
    "ddim_steps": click.IntRange(min=1),
    "eta": click.FloatRange(0, 1),
    "clip_x0": bool,
    "epochs": OptionalInt(min=1),
    "batch_size": OptionalInt(min=1),
    "lr": click.FloatRange(min=0, min_open=True),
    "warmup_steps": OptionalInt(min=0),
    "ema_decay": click.FloatRange(0, 1, max_open=True),
    "ema_warmup_steps": OptionalInt(min=0),
    "channels": OptionalInt(min=8),
    "seed": int,
    "precision": click.Choice(PRECISIONS),
    "train_samples": OptionalInt(min=1),
    "max_steps": OptionalInt(min=1),
    "fid_every": click.IntRange(min=0),
    "fid_select_samples": OptionalInt(min=2),
    "fid_samples": OptionalInt(min=0),
    "fid_ref": click.Choice(FID_REFS),
    "fid_ref_samples": OptionalInt(min=2),
    "fid_batch_size": OptionalInt(min=1),
    "kid": bool,
    "sheet_images": OptionalInt(min=1, max=1024),
    "sheet_every": OptionalInt(min=0),
    "compile": click.Choice(COMPILE_CHOICES),
    "overlap": click.Choice(COMPILE_CHOICES),
    "fused": click.Choice(FUSED_CHOICES),
    "sample_batch_size": click.IntRange(min=1),
}


# Old option names that keep working, hidden from --help: the 8x8 picture was a "grid" before "grid" meant
# only the study's.
OLD_NAMES = {"sheet_images": ["--grid-images"], "sheet_every": ["--grid-every"]}


class RenamedOption(click.Option):
    """An option whose old names still parse; --help shows only its own."""

    def get_help_record(self, ctx):
        opts, self.opts = self.opts, self.opts[:1]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = opts


def config_option(name: str, **overrides):
    """The option `--name` for the Config field `name`: its type, the field's default and help; `overrides`
    replace any of them (e.g. a command whose default is the checkpoint's)."""
    field, flag = FIELDS[name], "--" + name.replace("_", "-")
    kwargs = {
        "type": FIELD_TYPES[name],
        "default": field.default,
        "show_default": field.default is not None,
        "help": field.metadata["help"],
    }
    decls = [flag, *OLD_NAMES.get(name, []), name]
    if FIELD_TYPES[name] is bool:  # on/off: a flag when off by default, else a --x/--no-x pair
        del kwargs["type"]
        if field.default is False:
            kwargs.update(is_flag=True, show_default=False)
        else:
            decls = [f"{flag}/--no-{flag[2:]}", name]
    kwargs.update(overrides)
    return click.option(*decls, cls=RenamedOption, **kwargs)


def apply(options):
    """Several options as one decorator, in the order given."""

    def decorator(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorator


def config_options(*names: str):
    return apply([config_option(name) for name in names])


schedule_options = config_options("schedule", "timesteps", "beta_start", "beta_end")
sampler_options = config_options("sampler", "ddim_steps", "eta", "clip_x0")
training_options = config_options(
    "epochs",
    "batch_size",
    "lr",
    "warmup_steps",
    "ema_decay",
    "ema_warmup_steps",
    "channels",
    "precision",
    "train_samples",
    "max_steps",
)
fid_options = config_options(
    "fid_every",
    "fid_select_samples",
    "fid_samples",
    "fid_ref",
    "fid_ref_samples",
    "fid_batch_size",
    "sample_batch_size",
    "kid",
    "sheet_images",
    "sheet_every",
)
compile_option = config_option("compile")
overlap_option = config_option("overlap")
fused_option = config_option("fused")
sample_batch_option = config_option("sample_batch_size")

device_option = click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="auto",
    show_default=True,
    help="auto picks CUDA, then MPS, then CPU.",
)
data_dir_option = click.option(
    "--data-dir",
    type=MnistRoot(exists=True, file_okay=False),
    envvar="MNIST_DIFF_DATA_DIR",
    help="torchvision root holding MNIST/raw (env MNIST_DIFF_DATA_DIR); read, never downloaded into. "
    "Default: download into ~/.cache/mnist-diff/data on first use.",
)
fid_weights_option = click.option(
    "--fid-weights",
    type=InceptionWeights(exists=True, dir_okay=False),
    envvar="MNIST_DIFF_FID_WEIGHTS",
    help="torch-fidelity Inception weights file (env MNIST_DIFF_FID_WEIGHTS); default: torch-fidelity downloads them.",
)
tracking_uri_option = click.option(
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    default=None,
    help="MLflow tracking URI (env MLFLOW_TRACKING_URI). Default: sqlite:///mlflow.db here.",
)
tracking_options = apply(
    [
        tracking_uri_option,
        click.option("--experiment", default="mnist-diff", show_default=True, help="MLflow experiment name."),
        click.option("--no-tracking", is_flag=True, help="Don't log to MLflow."),
    ]
)
system_metrics_option = click.option(
    "--system-metrics/--no-system-metrics",
    default=True,
    show_default=True,
    help="Log the machine's CPU, RAM, disk, network and (NVIDIA) GPU use to each run as system/... metrics.",
)
quiet_option = click.option("--quiet", is_flag=True, help="No progress bars.")


def out_option(default: str):
    return click.option(
        "--out", type=click.Path(file_okay=False), default=default, show_default=True, help="Output folder."
    )
