"""Checks a command makes before any work starts, each ending in a one-line `BadInput` (exit 2): folders,
stores, the device, the config, a checkpoint."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from mnist_diff.cli.group import BadInput
from mnist_diff.util.urls import in_memory_reason, in_memory_sqlite

RUN_LOCK = ".run.lock"  # in a train or bench --full --out folder: held by the run that writes there


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
            raise BadInput(f"--out {out} is in use by another run" + (f" (pid {err.pid})" if err.pid else "")) from None
        ckpt_dir = out_path / "checkpoints"
        trained = checkpoint.list_steps(ckpt_dir)
        if trained and not resume:
            hint = "choose another --out" if resume is None else "pass --resume, or choose another --out"
            raise BadInput(f"--out {out} already holds a training run: {hint}")
        if trained and checkpoint.load_latest(ckpt_dir, warn=False) is None:
            raise BadInput(f"--out {out}: its checkpoints are unreadable (corrupt, or not mnist-diff ones)")
        yield


def refuse_in_memory(url: str | None, flag: str) -> None:
    """Exit 2 for an in-memory SQLite database: what is written to it vanishes when the command ends."""
    if in_memory_sqlite(url):
        raise BadInput(in_memory_reason(url, flag))


def checked_tracking_uri(tracking_uri) -> str:
    """The resolved MLflow URI, once its store is known to be reachable (exit 2 otherwise). Creates nothing."""
    from mnist_diff.tracking import mlflow_store as tracking
    from mnist_diff.util.redact import redact_text

    refuse_in_memory(tracking_uri, "--tracking-uri")
    uri = tracking.resolve_uri(tracking_uri)
    try:
        tracking.check_reachable(uri)
    except tracking.TrackingUnavailable as err:
        raise BadInput(redact_text(str(err), uri)) from None
    return uri


def open_tracker(tracking_uri, experiment, no_tracking, **kwargs):
    """A Tracker whose store was checked reachable (exit 2 otherwise), or None with --no-tracking."""
    if no_tracking:
        return None
    from mnist_diff.tracking.mlflow_store import Tracker

    return Tracker(checked_tracking_uri(tracking_uri), experiment, **kwargs)


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


def load_checkpoint(path, device):
    """(model, config, checkpoint) of a checkpoint for sampling; exit 2 for a file that is not one."""
    from mnist_diff.training.trainer import load_sampling_model

    try:
        return load_sampling_model(path, device)
    except Exception as err:  # a truncated, corrupt or foreign file is bad input, not a crash
        raise BadInput(f"--checkpoint {path}: unreadable ({type(err).__name__}: {str(err).splitlines()[0]})") from None


def with_sampling(trained, sampler, ddim_steps, eta, clip_x0=None, **more):
    """A checkpoint's config with the sampling options the user gave (None keeps the checkpoint's), validated:
    e.g. --ddim-steps above the checkpoint's --timesteps is exit 2."""
    given = {"sampler": sampler, "ddim_steps": ddim_steps, "eta": eta, "clip_x0": clip_x0}
    return make_config(**{**trained.to_dict(), **{k: v for k, v in given.items() if v is not None}, **more})


def load_model_source(checkpoint_path, model_uri, tracking_uri, device):
    """(model, config, source) from exactly one of --checkpoint and --model (exit 2 otherwise, or for a URI that
    names no mnist-diff model): a model URI (models:/NAME@champion, models:/NAME/3, runs:/RUN/model,
    models:/m-...) is fetched through MLflow as its weights file, then loaded exactly as a checkpoint."""
    if (checkpoint_path is None) == (model_uri is None):
        raise BadInput("give exactly one of --checkpoint and --model")
    if model_uri is None:
        model, config, _ = load_checkpoint(checkpoint_path, device)
        return model, config, checkpoint_path
    import tempfile

    from mnist_diff.tracking import mlflow_model

    uri = checked_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            weights = mlflow_model.download_model(model_uri, tmp, uri)
        except mlflow_model.ModelNotFound as err:
            raise BadInput(f"--model {err}") from None
        model, config, _ = load_checkpoint(weights, device)
    return model, config, model_uri
