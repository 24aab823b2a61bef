"""What a training logs to its MLflow run: a trainer callback and the end-of-training record. Duck-types the
tracker (`mlflow_store.Tracker`): no mlflow import here."""

from __future__ import annotations

import subprocess
from pathlib import Path

from mnist_diff.tracking import figures as plots
from mnist_diff.training.experiment import ExperimentResult
from mnist_diff.training.trainer import (
    Callback,
    EpochEnd,
    ema_decay_at,
    ema_nominal_step,
)


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


class TrackingCallback(Callback):
    """Logs what a training run produces: params at start, loss as it goes, per-epoch metrics and grids."""

    def __init__(self, tracker, extra_params: dict | None = None):
        self.tracker = tracker
        self.extra_params = extra_params or {}
        self.config = None

    def on_train_start(self, trainer) -> None:
        import torch

        c = self.config = trainer.config
        device = trainer.device
        params = {
            **c.to_dict(),
            **self.extra_params,
            "alpha_bar_T": trainer.schedule.alpha_bar_T,
            "parameters": trainer.num_parameters,
            "training_key": c.training_key(),
            "steps_per_epoch": trainer.steps_per_epoch,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "torch_version": torch.__version__,
            "cuda_version": torch.version.cuda,
            "git_commit": git_commit(),
            "resumed_from_step": trainer.step,
            "ema_nominal_step": ema_nominal_step(c) if c.ema_decay > 0 else None,
        }
        self.tracker.log_params(params)
        self.tracker.log_dict(c.to_dict(), "config.json")
        fig = plots.schedule_figure([(c.schedule, c.timesteps, c.beta_start, c.beta_end)])
        self.tracker.log_figure(fig, "schedule.png")
        plots.plt.close(fig)

    def on_log(self, step: int, loss: float, images_per_sec: float) -> None:
        metrics = {"train_loss": loss}
        if self.config.ema_decay > 0:  # the decay of the latest EMA update (after step `step` - 1)
            metrics["ema_decay"] = ema_decay_at(self.config, step - 1)
        self.tracker.log_metrics(metrics, step=step)

    def on_epoch_end(self, end: EpochEnd) -> None:
        self.tracker.log_metrics(
            {"epoch_loss": end.loss, "train_images_per_sec": end.images_per_sec, **end.metrics}, step=end.epoch
        )
        if end.sheet_path is not None:
            self.tracker.log_image(end.sheet_path, key="samples", step=end.epoch)


def log_final(
    tracker,
    result: ExperimentResult,
    out_dir: Path,
    best_checkpoint: Path | None,
    last_checkpoint: Path | None,
    history: list[dict],
) -> None:
    """The end-of-training record: summary metrics, curves, the resolved config, the checkpoints, and the
    selected epoch as an MLflow Model (`mlflow_model`) with its scores linked."""
    summary = {
        k: getattr(result, k)
        for k in (
            "best_fid",
            "best_epoch",
            "best_fid_select",
            "final_sampling_seconds",
            "final_fid_seconds",
            "train_seconds",
            "kid",
            "kid_std",
        )
    }
    tracker.log_metrics(summary)
    if best_checkpoint is not None and result.best_epoch is not None:
        tracker.log_model(
            result.config,
            best_checkpoint,
            result.best_epoch,
            {k: summary[k] for k in ("best_fid", "best_fid_select", "kid")},
        )
    if history:
        fig = plots.curves_figure(history)
        tracker.log_figure(fig, "curves.png")
        plots.plt.close(fig)
    tracker.log_dict(result.to_dict(), "result.json")
    if best_checkpoint is not None:
        tracker.log_artifact(best_checkpoint, "checkpoints/best")
    if last_checkpoint is not None:
        tracker.log_artifact(last_checkpoint, "checkpoints/last")
