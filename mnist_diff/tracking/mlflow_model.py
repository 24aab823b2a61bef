"""A trained config as an MLflow Model (pyfunc): logged by each training and trial, registered by the study, loaded
by URI (`models:/mnist-diff@champion`, `runs:/RUN/model`, `models:/m-...`) and served by `mlflow models serve`.

The model's one artifact is `data/model.pt`: an mnist-diff checkpoint (the selected epoch's EMA weights and the
run's config, schedule and sampling settings included), so `sample --checkpoint` reads it as well. It is logged
with `loader_module` (this module) rather than a pickled PythonModel: loading it imports the installed
mnist_diff and reads tensors with weights_only=True, and runs no code that came with the artifact.

Input: one row (a DataFrame or a dict) of `num_samples`, `seed` and optionally `sampler`, `ddim_steps`, `eta`.
Output: uint8 digits as an array [num_samples, 28, 28] (0 = black), image i a function of (seed, i) exactly as
in `cli.py sample` (`runtime.generate.generate`), on CUDA when there is one, else on the CPU
(MNIST_DIFF_MODEL_DEVICE overrides)."""

from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service import utils as tracking_utils
from mlflow.types import ColSpec, Schema, TensorSpec

from mnist_diff.config import Config
from mnist_diff.runtime import checkpoint
from mnist_diff.util.redact import redact_text

log = logging.getLogger(__name__)
# MLflow's Model.log and alias lookups read its process-wide tracking URI: trials that log at once in one process
# (--trials-per-worker) each set theirs, and one's restore must not leave another's behind for the process
_TRACKING_URI = threading.RLock()
MODEL_NAME = "model"  # the logged model's name in its run: runs:/RUN_ID/model
WEIGHTS_FILE = "model.pt"
CHAMPION = "champion"
MAX_SAMPLES = 10000  # per request: a served model must not be asked to fill its memory
DEVICE_ENV = "MNIST_DIFF_MODEL_DEVICE"
SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec("long", "num_samples"),
            ColSpec("long", "seed"),
            ColSpec("string", "sampler", required=False),
            ColSpec("long", "ddim_steps", required=False),
            ColSpec("double", "eta", required=False),
        ]
    ),
    outputs=Schema([TensorSpec(np.dtype("uint8"), (-1, 28, 28))]),
)


def input_example(timesteps: int) -> dict:
    """What MLflow draws when it logs a model (every trial): one image in at most 10 DDIM steps, not a
    T-step DDPM chain (1,000 network calls at T=1000, each trial)."""
    return {"num_samples": 1, "seed": 0, "sampler": "ddim", "ddim_steps": min(10, int(timesteps))}


# What the model needs besides mnist_diff itself, which it imports (and which is not on PyPI).
REQUIREMENTS = ["torch", "numpy", "pandas", f"mlflow=={mlflow.__version__}"]


class DigitsModel(mlflow.pyfunc.PythonModel):
    """The EMA UNet of the selected epoch with its config: draws digits as `cli.py sample` does."""

    def __init__(self, weights_path: str | os.PathLike | None = None, device: str | None = None):
        if weights_path is not None:
            self._load(weights_path, device)

    def load_context(self, context):
        self._load(context.artifacts["weights"])

    def _load(self, path, device: str | None = None) -> None:
        from mnist_diff.diffusion.schedules import make_schedule
        from mnist_diff.runtime.device import configure_backend, resolve_device
        from mnist_diff.training.trainer import load_sampling_model

        dev = resolve_device(device or os.environ.get(DEVICE_ENV, "auto"))
        configure_backend(dev)
        self.model, self.config, _ = load_sampling_model(path, dev)
        c = self.config
        self.schedule = make_schedule(c.schedule, c.timesteps, c.beta_start, c.beta_end)

    def predict(self, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        from mnist_diff.runtime.generate import generate

        request = _one_row(model_input)
        num, seed = request.pop("num_samples"), request.pop("seed")
        if not 1 <= num <= MAX_SAMPLES:
            raise MlflowException(f"num_samples must be 1 to {MAX_SAMPLES}, not {num}", INVALID_PARAMETER_VALUE)
        try:
            config = self.config.replace(**request)
        except ValueError as err:
            raise MlflowException(str(err), INVALID_PARAMETER_VALUE) from None
        images = generate(
            self.model,
            self.schedule,
            num=num,
            seed=seed,
            sampler=config.sampler,
            ddim_steps=config.ddim_steps,
            eta=config.eta,
            clip_x0=config.clip_x0,
            precision=config.precision,
            progress=False,
            compile=_default("compile"),  # as `sample` does without --compile
        )
        return images[:, 0].cpu().numpy()


def _default(name: str):
    return next(f.default for f in fields(Config) if f.name == name)


def _one_row(model_input) -> dict:
    """The request's fields, missing optional ones left out."""
    rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else [dict(model_input)]
    if len(rows) != 1:
        raise MlflowException(f"send one request row, not {len(rows)}", INVALID_PARAMETER_VALUE)
    row = {k: v for k, v in rows[0].items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
    missing = {"num_samples", "seed"} - set(row)
    if missing:
        raise MlflowException(f"missing {', '.join(sorted(missing))}", INVALID_PARAMETER_VALUE)
    kinds = {"num_samples": int, "seed": int, "sampler": str, "ddim_steps": int, "eta": float}
    unknown = set(row) - set(kinds)
    if unknown:
        raise MlflowException(f"unknown field(s) {', '.join(sorted(unknown))}", INVALID_PARAMETER_VALUE)
    return {k: kinds[k](v) for k, v in row.items()}


def _load_pyfunc(data_path: str) -> DigitsModel:
    """MLflow's entry point for a model logged with `loader_module` (this module): `data_path` is model.pt."""
    return DigitsModel(data_path)


# -- logging and registering ----------------------------------------------------------------------------------
def log_model(tracker, config: dict, ema_path: Path, epoch: int, metrics: dict) -> str:
    """Log the run's model: `ema_path`'s weights with `config` (the run's own, sampling settings included) as a
    logged model of the run at `step` = the selected epoch, with `metrics` (best_fid, ...) linked to it.
    Returns its model id."""
    ema = checkpoint.load(ema_path)["ema"]
    with tempfile.TemporaryDirectory() as tmp, _registry(tracker.uri):
        weights = checkpoint.atomic_save(
            {"format_version": checkpoint.FORMAT_VERSION, "config": config, "epoch": epoch, "ema": ema},
            Path(tmp) / WEIGHTS_FILE,
        )
        # made here, in the run's experiment (Model.log would make it in the current default experiment)
        logged = tracker.client.create_logged_model(
            tracker.experiment_id or tracker.client.get_run(tracker.run_id).info.experiment_id,
            name=MODEL_NAME,
            source_run_id=tracker.run_id,
            params={k: str(v) for k, v in config.items()},
            tags={"mnist_diff.epoch": str(epoch)},
        )
        info = Model.log(
            None,
            name=MODEL_NAME,
            flavor=mlflow.pyfunc,
            model_id=logged.model_id,
            run_id=tracker.run_id,
            loader_module=__name__,
            data_path=str(weights),
            signature=SIGNATURE,
            input_example=input_example(config["timesteps"]),
            pip_requirements=REQUIREMENTS,
            step=int(epoch),
        )
    now = int(time.time() * 1000)
    linked = [Metric(k, float(v), now, int(epoch), model_id=info.model_id) for k, v in metrics.items() if v is not None]
    if linked:
        tracker.client.log_batch(tracker.run_id, metrics=linked, synchronous=True)
    return info.model_id


def run_model_id(client: MlflowClient, run_id: str) -> str | None:
    """The model a run logged last (its output), or None."""
    outputs = client.get_run(run_id).outputs
    models = outputs.model_outputs if outputs is not None else []
    return models[-1].model_id if models else None


@dataclass(frozen=True)
class Registered:
    """A study's best model as registered: its version, and whether the alias `champion` now points to it."""

    name: str
    version: str
    best_fid: float
    champion: bool  # True when this version is the champion (moved now, or already was)
    moved: bool  # True when the alias moved to it now
    previous: str | None = None  # the champion version before, if any
    previous_fid: float | None = None

    def describe(self) -> str:
        text = f"registered model {self.name!r} version {self.version} (FID {self.best_fid:.2f})"
        if self.moved:
            before = f" (was version {self.previous}, FID {self.previous_fid:.2f})" if self.previous else ""
            return text + f"; alias {CHAMPION!r} moved to it{before}"
        if self.champion:
            return text + f"; already the {CHAMPION!r}"
        return text + f"; {CHAMPION!r} stays version {self.previous} (FID {self.previous_fid:.2f}, not worse)"

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def register_best(uri: str, run_id: str, name: str, best_fid: float, tags: dict) -> Registered | None:
    """Register the model `run_id` logged under `name` (once: a model already registered there keeps its
    version), with `tags` on the version; move the alias `champion` to it when its best_fid is lower than the
    current champion's (a version tag). None when the run logged no model. `uri`: resolved
    (`mlflow_store.resolve_uri`)."""
    with _registry(uri):  # MLflow's SQL registry looks the logged model up through the default client
        return _register(MlflowClient(uri, registry_uri=uri), run_id, name, best_fid, tags)


def _register(client: MlflowClient, run_id: str, name: str, best_fid: float, tags: dict) -> Registered | None:
    model_id = run_model_id(client, run_id)
    if model_id is None:
        return None
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(name)
        except MlflowException:  # another study registered it first
            client.get_registered_model(name)
    version_tags = {
        **{k: str(v) for k, v in tags.items()},
        "mnist_diff.run_id": run_id,
        "mnist_diff.model_id": model_id,
        "mnist_diff.best_fid": repr(float(best_fid)),
    }
    same = [v for v in _versions(client, name) if v.tags.get("mnist_diff.model_id") == model_id]
    if same:
        version = same[0]
    else:
        version = client.create_model_version(
            name, source=f"models:/{model_id}", run_id=run_id, tags=version_tags, model_id=model_id
        )
    current = champion_version(client, name)
    previous = str(current.version) if current is not None else None  # an int from a SQL store, text from a server
    previous_fid = float(current.tags.get("mnist_diff.best_fid", "inf")) if current is not None else None
    number = str(version.version)
    already = previous == number
    moved = not already and (previous_fid is None or best_fid < previous_fid)
    if moved:
        client.set_registered_model_alias(name, CHAMPION, number)
    return Registered(name, number, float(best_fid), already or moved, moved, previous, previous_fid)


def _versions(client: MlflowClient, name: str) -> list:
    quoted = name.replace("'", "\\'")
    return [v for v in client.search_model_versions(f"name = '{quoted}'") if v.name == name]


def champion_version(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):  # no alias yet
            return None
        raise


# -- loading by URI ------------------------------------------------------------------------------------------
class ModelNotFound(LookupError):
    pass


@contextmanager
def _registry(uri: str):
    """MLflow's fluent functions (load_model, download_artifacts) against this store (resolved: see
    `mlflow_store.resolve_uri`), the registry included; one thread at a time (the URI is process-wide)."""
    with _TRACKING_URI, tracking_utils._use_tracking_uri(uri):
        yield


def download_model(model_uri: str, dst_dir, tracking_uri: str) -> Path:
    """The model's weights file (an mnist-diff checkpoint) downloaded into `dst_dir`; ModelNotFound with a
    one-line reason when the URI names no mnist-diff model."""
    try:
        with _registry(tracking_uri):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst_dir)))
        flavor = Model.load(str(local / "MLmodel")).flavors.get("python_function", {})
    except Exception as err:
        raise ModelNotFound(
            f"{model_uri}: {redact_text(str(err).splitlines()[0] if str(err) else repr(err))}"
        ) from None
    if flavor.get("loader_module") != __name__ or not flavor.get("data"):
        raise ModelNotFound(f"{model_uri} is not an mnist-diff model")
    return local / flavor["data"]


def load_model(model_uri: str, tracking_uri: str):
    """`mlflow.pyfunc.load_model` against this store."""
    with _registry(tracking_uri):
        return mlflow.pyfunc.load_model(model_uri)
