"""MLflow tracking: runs written, and a study's runs read back (with `mlflow_model`, the only mlflow imports).

A `Tracker` owns one MLflow run through an explicit `MlflowClient` (no fluent global state), so the run's
end status is always ours to set: FINISHED on success, FAILED with the error as tags when something raises,
KILLED on SIGTERM or Ctrl-C. Artifact uploads that fail are recorded and never stop training.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
from mlflow.store.db.db_types import DATABASE_ENGINES
from mlflow.tracking import MlflowClient

from mnist_diff.util.redact import redact_text, redact_url

log = logging.getLogger(__name__)
DEFAULT_URI = "sqlite:///mlflow.db"  # MLflow 3's own default store, in the working directory
DEFAULT_EXPERIMENT = "mnist-diff"
SYSTEM_METRICS_INTERVAL_S = 5.0  # seconds between samples of the machine (MLflow's default: 10)


class TrackingUnavailable(RuntimeError):
    pass


def resolve_uri(uri: str | None) -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith(("http://", "https://")):
        uri = _credentials_to_env(uri)
    if uri.startswith("sqlite:///"):  # make it absolute so the printed `mlflow ui` command works anywhere
        path = uri[len("sqlite:///") :]
        if not path.startswith("/"):
            uri = "sqlite:///" + str(Path(path).absolute())
    return uri


def _credentials_to_env(uri: str) -> str:
    """A server URI's `user:password@` moved into MLflow's own MLFLOW_TRACKING_USERNAME/PASSWORD (which the
    workers inherit): the URI left holds no secret for an error message, a log line or a record to show, and
    the health check reaches the host itself."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    if parts.username is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username)
    if parts.password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def is_server(uri: str | None) -> bool:
    """Whether runs and their artifacts go to a tracking server (reachable from other machines)."""
    return resolve_uri(uri).startswith(("http://", "https://"))


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingUnavailable, with a one-line reason, unless the store can be used. Creates nothing."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingUnavailable(f"tracking store {uri}: folder {folder} does not exist or is not writable")
        return
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
                if r.status != 200:
                    raise TrackingUnavailable(f"tracking server {uri} answered HTTP {r.status}")
        except (OSError, ValueError) as err:
            raise TrackingUnavailable(f"tracking server {uri} is unreachable: {err}") from None
        return
    if uri.startswith(("postgresql", "mysql", "mssql")):
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except Exception as err:
            raise TrackingUnavailable(f"tracking store {uri} is unreachable: {str(err).splitlines()[0]}") from None
        return
    if uri.split(":", 1)[0] in ("databricks", "databricks-uc", "uc"):  # MLflow checks the credentials on use
        return
    if uri.startswith("file:") or "://" not in uri:
        if not MLFLOW_ALLOW_FILE_STORE.get():  # MLflow 3 refuses its file store (when it first writes)
            raise TrackingUnavailable(
                f"tracking store {uri}: MLflow 3 no longer opens folder (file:) "
                "stores; use a database such as sqlite:///mlflow.db (or set "
                "MLFLOW_ALLOW_FILE_STORE=true)"
            )
        folder = Path(uri[len("file:") :] if uri.startswith("file:") else uri)
        probe = folder if folder.exists() else folder.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK):
            raise TrackingUnavailable(f"tracking store {uri} is not a writable folder")
        return
    scheme = uri.split(":", 1)[0]
    if scheme.split("+")[0] not in DATABASE_ENGINES:  # any other scheme MLflow refuses on first use
        raise TrackingUnavailable(
            f"tracking URI {redact_url(uri)}: MLflow does not support the scheme "
            f"{scheme!r}; use sqlite:///..., postgresql://... or http(s)://..."
        )


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {redact_url(uri)}"
    return f"mlflow ui --backend-store-uri {redact_url(uri)}"


# MLflow 3.17's UI shows an experiment in the view this URL parameter names, else in the view last chosen
# (GenAI by default), whatever the experiment's kind tag says: the addresses we print name the training view.
TRAINING_VIEW = "workflowType=machine_learning"


def _ui_base(uri: str) -> str:
    return redact_url(uri).rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    return f"{_ui_base(uri)}/#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_VIEW}"


def experiment_url(uri: str, experiment: str) -> str:
    """The UI's address of the experiment's runs, in its model-training view (any experiment when unknown)."""
    try:
        found = MlflowClient(resolve_uri(uri)).get_experiment_by_name(experiment)
    except Exception:  # an address is advice: never a reason to fail a finished command
        found = None
    path = f"experiments/{found.experiment_id}/runs" if found else "experiments"
    return f"{_ui_base(uri)}/#/{path}?{TRAINING_VIEW}"


# MLflow 3's UI opens an experiment without this tag in its GenAI (traces) view; these are model trainings.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
EXPERIMENT_NOTE = (
    "mnist-diff: DDPM/DDIM diffusion models trained on MNIST and scored by FID. A study's trials are child runs "
    "of its parent run (tag mnist_diff.study); each run logs its config as params, per-epoch loss and selection "
    "FID as metrics, system metrics (system/...), the training set and FID reference as dataset inputs, and its "
    "checkpoints and sample grids as artifacts."
)


def ensure_experiment(client: MlflowClient, uri: str, name: str) -> str:
    """The experiment's id, creating it if needed, tagged as model development (`EXPERIMENT_KIND`) and given a
    description unless it has one. With a SQLite store its artifacts go in `mlruns/` beside the database file
    (MLflow would otherwise put them in whatever the working directory is)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri[len("sqlite:///") :]).parent / "mlruns").as_uri()
        try:
            client.create_experiment(name, artifact_location=location)
        except mlflow.exceptions.MlflowException:  # another worker created it first
            pass
        exp = client.get_experiment_by_name(name)
    key, kind = EXPERIMENT_KIND
    if exp.tags.get(key) != kind:
        client.set_experiment_tag(exp.experiment_id, key, kind)
    if not exp.tags.get("mlflow.note.content"):  # the user's own description stays
        client.set_experiment_tag(exp.experiment_id, "mlflow.note.content", EXPERIMENT_NOTE)
    return exp.experiment_id


def find_study_run(client: MlflowClient, uri: str, experiment: str, study_name: str):
    """The parent run of a study, or None."""
    exp_id = ensure_experiment(client, uri, experiment)
    runs = search_tagged(client, [exp_id], {"mnist_diff.role": "study", "mnist_diff.study": study_name})
    return min(runs, key=lambda r: r.info.start_time or 0, default=None)


def reconcile_orphans(client: MlflowClient, uri: str, experiment: str, study_name: str, live_run_ids: set) -> list:
    """Runs of a study left RUNNING by a process that died (kill -9, power loss): mark them KILLED."""
    exp_id = ensure_experiment(client, uri, experiment)
    runs = search_tagged(
        client, [exp_id], {"mnist_diff.study": study_name, "mnist_diff.role": "trial"}, "attributes.status = 'RUNNING'"
    )
    fixed = []
    for run in runs:
        if run.info.run_id not in live_run_ids:
            client.set_tag(run.info.run_id, "error_message", "the worker died; reconciled on restart")
            client.set_terminated(run.info.run_id, status="KILLED")
            fixed.append(run.info.run_id)
    return fixed


def tag_run(uri: str | None, run_id: str, tags: dict) -> None:
    """Add tags to a run, ended or not (e.g. a failed trial's retry outcome)."""
    MlflowClient(resolve_uri(uri)).log_batch(run_id, tags=_run_tags(tags), synchronous=True)


def _run_tags(tags: dict) -> list:
    """Tags as MLflow records them; an error quoted in one (a driver's message) may quote a URL."""
    return [RunTag(k, redact_text(str(v))) for k, v in tags.items()]


def kill_run(uri: str | None, run_id: str, tags: dict) -> bool:
    """Tag the run of a process that died and mark it KILLED; True if it was still RUNNING (a run that had
    already ended keeps its status)."""
    tag_run(uri, run_id, tags)
    client = MlflowClient(resolve_uri(uri))
    if client.get_run(run_id).info.status != "RUNNING":
        return False
    client.set_terminated(run_id, status="KILLED")
    return True


class Tracker:
    """One MLflow run. Use `with tracker.run(): ...` so its end status always gets set."""

    def __init__(
        self,
        uri: str | None = None,
        experiment: str = DEFAULT_EXPERIMENT,
        run_name: str | None = None,
        tags: dict | None = None,
        parent_run_id: str | None = None,
        system_metrics: bool = False,
    ):
        self.uri = resolve_uri(uri)
        self.system_metrics = system_metrics  # sample CPU, RAM, disk, network (and GPU) while `run()` runs
        self._monitor = None
        self.client = MlflowClient(self.uri)
        self.experiment_name = experiment
        self.run_name = run_name
        self.tags = dict(tags or {})
        if parent_run_id:
            self.tags["mlflow.parentRunId"] = parent_run_id
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.upload_errors = 0
        self.model_id: str | None = None  # the model this run logged (`log_model`)
        self.given_params: dict = {}  # params an adopted run already holds (`mlflow run` logs its -P values)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> str:
        """Create the run; under `mlflow run` (MLFLOW_RUN_ID set), adopt the run it made instead, once."""
        adopted = os.environ.pop("MLFLOW_RUN_ID", None)
        if adopted and "mlflow.parentRunId" not in self.tags:
            run = self.client.get_run(adopted)
            self.run_id, self.experiment_id = adopted, run.info.experiment_id
            self.given_params = dict(run.data.params)
            self.set_tags({**self.tags, **({"mlflow.runName": self.run_name} if self.run_name else {})})
            return self.run_id
        self.experiment_id = ensure_experiment(self.client, self.uri, self.experiment_name)
        run = self.client.create_run(
            self.experiment_id, run_name=self.run_name, tags={k: str(v) for k, v in self.tags.items()}
        )
        self.run_id = run.info.run_id
        return self.run_id

    def end(self, status: str, error: BaseException | None = None) -> None:
        if error is not None:
            message = str(error).splitlines()[0][:4000] if str(error) else ""
            self.set_tags({"error_type": type(error).__name__, "error_message": message})
        self.client.set_terminated(self.run_id, status=status)

    def set_status(self, status: str, reason: str | None = None, error_type: str | None = None) -> None:
        """Set the run's status (RUNNING reopens it) with `reason` as its error tags; without a reason, error tags
        left by an earlier end are removed, so a run that ends well later does not carry a stale error."""
        if reason:
            self.set_tags({"error_type": error_type or status, "error_message": reason[:4000]})
        else:
            for key in set(self.client.get_run(self.run_id).data.tags) & {"error_type", "error_message"}:
                self.client.delete_tag(self.run_id, key)
        if status == "RUNNING":
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.client.set_terminated(self.run_id, status=status)

    @contextmanager
    def run(self):
        """Start the run; end it FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED (anything else). With
        `system_metrics`, MLflow's monitor samples the machine into `system/...` metrics meanwhile."""
        self.start()
        self._start_system_metrics()
        try:
            yield self
        except KeyboardInterrupt as err:
            self._stop_system_metrics()
            self.end("KILLED", err)
            raise
        except BaseException as err:
            self._stop_system_metrics()
            self.end("FAILED", err)
            raise
        self._stop_system_metrics()
        self.end("FINISHED")

    def _start_system_metrics(self) -> None:
        if not self.system_metrics:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # MLflow's fluent API starts this for its active run only; ours goes through a client, so it is started
        # here, for this run. MLflow's environment variables (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, ...)
        # still override the interval.
        try:
            monitor = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                resume_logging=True,  # a resumed trial's samples go on after its earlier ones
                tracking_uri=self.uri,
            )
            monitor.start()
            self._monitor = monitor
        except Exception as err:  # psutil missing, an odd platform: the run goes on without them
            log.warning("system metrics are off for this run (%s: %s)", type(err).__name__, err)

    def _stop_system_metrics(self) -> None:
        """Stop sampling, and log the samples taken since the last logged one (a short run logs at least one)."""
        monitor, self._monitor = self._monitor, None
        if monitor is None:
            return
        try:
            monitor.finish()  # waits for the sampling thread, flushes what it logged
            if monitor.monitors and any(m._metrics for m in monitor.monitors):
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()
        except Exception as err:
            log.warning("system metrics: the last samples were not logged (%s: %s)", type(err).__name__, err)

    # -- logging -------------------------------------------------------------------------------
    def log_params(self, params: dict) -> None:
        """Log params. MLflow never changes a logged param: where `mlflow run` logged the value as typed
        (`''` for "not given", `2e-4`) and ours differs (`20`, `0.0002`), ours goes in `<name>.resolved`."""
        values = {k: "None" if v is None else str(v)[:6000] for k, v in params.items()}
        items = [Param(k if self.given_params.get(k, v) == v else f"{k}.resolved", v) for k, v in values.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100], synchronous=True)

    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if v is not None]
        if items:
            self.client.log_batch(self.run_id, metrics=items, synchronous=True)

    def set_tags(self, tags: dict) -> None:
        self.client.log_batch(self.run_id, tags=_run_tags(tags), synchronous=True)

    def log_datasets(self, datasets: list) -> None:
        """The data the run used as MLflow dataset inputs (`runtime.data.DatasetRef`s): a name, a digest (the
        first 32 hex digits of the images' sha256: MLflow keeps 36 characters) and the whole sha256 in the
        profile; the context tag says what the run used each for."""
        inputs = [
            DatasetInput(
                Dataset(
                    name=d.name,
                    digest=d.sha256[:32],
                    source_type="local",
                    source=json.dumps({"uri": d.source}),
                    profile=json.dumps({"num_images": d.count, "sha256": d.sha256}),
                ),
                tags=[InputTag("mlflow.data.context", d.context)],
            )
            for d in datasets
        ]
        try:
            self.client.log_inputs(self.run_id, datasets=inputs)
        except (
            mlflow.exceptions.MlflowException
        ):  # two runs inserting the same new dataset at once: one loses the race; now it exists
            self.client.log_inputs(self.run_id, datasets=inputs)

    def _guard(self, what: str, fn, *args, **kwargs) -> bool:
        """Artifacts are a copy of files kept locally: a failed upload is recorded, and training goes on."""
        try:
            fn(*args, **kwargs)
            return True
        except Exception as err:
            self.upload_errors += 1
            log.warning(
                "MLflow upload of %s failed (%s: %s); the local file is kept",
                what,
                type(err).__name__,
                redact_text(str(err)),
            )
            try:
                self.set_tags(
                    {
                        "artifact_upload_errors": self.upload_errors,
                        "artifact_upload_last_error": f"{what}: {type(err).__name__}: {err}"[:4000],
                    }
                )
            except Exception:
                pass
            return False

    def log_artifact(self, path, artifact_path: str | None = None) -> bool:
        return self._guard(str(path), self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_image(self, path, key: str, step: int) -> bool:
        from PIL import Image

        with Image.open(path) as im:
            return self._guard(
                f"{key} step {step}",
                self.client.log_image,
                self.run_id,
                im.convert("RGB"),
                key=key,
                step=step,
                synchronous=True,
            )

    def log_figure(self, fig, artifact_file: str) -> bool:
        return self._guard(artifact_file, self.client.log_figure, self.run_id, fig, artifact_file)

    def log_dict(self, d: dict, artifact_file: str) -> bool:
        return self._guard(artifact_file, self.client.log_dict, self.run_id, d, artifact_file)

    def download(self, run_id: str, artifact_path: str, dst_dir) -> Path:
        """One artifact of any run, into `dst_dir`; raises when it cannot (unlike the uploads)."""
        return Path(self.client.download_artifacts(run_id, artifact_path, str(dst_dir)))

    def training_callback(self, extra_params: dict | None = None):
        """A trainer callback that logs the training to this run (`callback.TrackingCallback`)."""
        from mnist_diff.tracking.callback import TrackingCallback

        return TrackingCallback(self, extra_params)

    def log_final(
        self, result, out_dir: Path, best_checkpoint: Path | None, last_checkpoint: Path | None, history: list[dict]
    ) -> None:
        """The end-of-training record (`callback.log_final`)."""
        from mnist_diff.tracking.callback import log_final

        log_final(self, result, out_dir, best_checkpoint, last_checkpoint, history)

    def log_model(self, config: dict, ema_path: Path, epoch: int, metrics: dict) -> str | None:
        """The run's model (`mlflow_model.log_model`); its id, or None when logging failed (recorded, as a
        failed artifact upload is: training goes on)."""
        from mnist_diff.tracking import mlflow_model

        ids = []
        self._guard("model", lambda: ids.append(mlflow_model.log_model(self, config, ema_path, epoch, metrics)))
        self.model_id = ids[0] if ids else None
        return self.model_id

    def describe(self) -> str:
        return (
            f"MLflow run {self.run_id}\n  browse: {ui_command(self.uri)}\n"
            f"  then open {run_url(self.uri, self.experiment_id, self.run_id)}"
        )


# -- reading a study back (for `report`) -----------------------------------------------------------------
def _tag_clause(key: str, value: str) -> str:
    """An MLflow filter clause for runs whose tag `key` is `value`, or a few more (`search_tagged` checks).
    MLflow unescapes nothing in a quoted value, and its tokenizer takes a backslash before a closing quote
    as escaping that quote: a value is quoted with a quote it does not hold; where none will do (it holds
    both, or ends in a backslash), it is matched with LIKE, '_' standing for each quote and backslash."""
    for quote in ("'", '"'):
        if quote not in value and not value.endswith("\\"):
            return f"tags.`{key}` = {quote}{value}{quote}"
    pattern = re.sub(r"['\\\\]", "_", value)
    return f"tags.`{key}` LIKE '{pattern}'"


def search_tagged(client: MlflowClient, experiment_ids: list[str], tags: dict, more: str = "") -> list:
    """Every run (all pages) whose tags have exactly the given values and that matches the filter
    clause `more`."""
    clauses = [_tag_clause(k, v) for k, v in tags.items()]
    filter_string = " and ".join(clauses + ([more] if more else []))
    runs, token = [], None
    while True:  # search_runs pages; a big study has more runs than one page
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return [r for r in runs if all(r.data.tags.get(k) == v for k, v in tags.items())]


@dataclass(frozen=True)
class TrialRun:
    """One trial's child run as MLflow keeps it (params are text)."""

    run_id: str
    status: str  # MLflow's: FINISHED, FAILED, KILLED, RUNNING, SCHEDULED
    tags: dict
    params: dict
    metrics: dict
    fid_history: list  # [(epoch, selection FID)] in epoch order


@dataclass(frozen=True)
class StudyRuns:
    """A study logged as a parent run (its study.json) with one child run per trial, retries included."""

    parent_run_id: str
    study: dict
    trials: list  # [TrialRun]
    parent_tags: dict = field(default_factory=dict)

    def registered_model(self) -> dict | None:
        """{name, version, champion} of the model the finished study registered (`study.sweep`), or None."""
        t = self.parent_tags
        if "mnist_diff.registered_model" not in t:
            return None
        return {
            "name": t["mnist_diff.registered_model"],
            "version": t.get("mnist_diff.registered_version"),
            "champion": t.get("mnist_diff.champion") == "true",
        }


def read_study(tracking_uri: str, study_name: str) -> StudyRuns:
    """The study's parent run and every child run; LookupError when no run is tagged as the study."""
    from mlflow.entities import ViewType

    client = MlflowClient(resolve_uri(tracking_uri))
    exp_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    parents = search_tagged(client, exp_ids, {"mnist_diff.study": study_name, "mnist_diff.role": "study"})
    if not parents:
        raise LookupError(f"no MLflow run tagged as study {study_name!r} in {redact_url(tracking_uri)}")
    if len(parents) > 1:
        log.warning("%d parent runs for study %r; using the first, as the sweep does", len(parents), study_name)
    parent = min(parents, key=lambda r: r.info.start_time or 0)
    pid = parent.info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        study = json.loads(Path(client.download_artifacts(pid, "study.json", tmp)).read_text())
    trials = []
    for run in search_tagged(client, exp_ids, {"mlflow.parentRunId": pid, "mnist_diff.role": "trial"}):
        history = client.get_metric_history(run.info.run_id, "fid")
        trials.append(
            TrialRun(
                run.info.run_id,
                run.info.status,
                dict(run.data.tags),
                dict(run.data.params),
                dict(run.data.metrics),
                [(m.step, m.value) for m in sorted(history, key=lambda m: (m.step, m.timestamp))],
            )
        )
    return StudyRuns(pid, study, trials, dict(parent.data.tags))
