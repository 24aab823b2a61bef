"""Trainings shared through the MLflow tracking server, for machines that share no disk.

A training (`OUT/trainings/<key>/`) is made by whichever trial holds its lock, on any machine. With a tracking
server, that trial also uploads, as artifacts of its own MLflow run, each epoch's EMA weights
(`training/ema-epoch-NNN.pt`) and its latest full checkpoint (`training/checkpoint-a.pt` or `-b.pt`, used in
turn, so an upload cut short never spoils the one the index points at). The index (`TrainingIndex`: which run
holds which file, and its content hash) lives in the study's storage, the one thing every machine shares.

Before a trial uses a training it calls `restore`, under the training lock, which brings the local folder up
to the index: the checkpoint when the index's is newer than any local one (a retry resumes where the last
machine stopped), the EMA weights of every epoch up to that checkpoint that are missing or differ, and the
done marker. A local checkpoint at least as new as the index's (this machine's own work, whose upload failed
or was cut short) is kept, and only missing EMA weights are fetched. Nothing here imports mlflow or optuna:
the tracker uploads and downloads, the index reads and writes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

from mnist_diff.fid.engine import weights_fingerprint
from mnist_diff.runtime import checkpoint, timing
from mnist_diff.training.trainer import Callback
from mnist_diff.util.atomic import write_json

log = logging.getLogger(__name__)

ARTIFACT_DIR = "training"
DONE_MARKER = "training_done.json"


class TrainingIndex(Protocol):
    """{"checkpoint": {run_id, path, step, epoch, sha}, "ema": {"<epoch>": {run_id, path, sha}},
    "done": {"run_id": ...}}; {} for a training nobody has uploaded."""

    def read(self) -> dict: ...
    def write(self, entry: dict) -> None: ...


class Uploader(Callback):
    """Uploads a training's EMA weights after each epoch and each full checkpoint, then records them in the
    index. A failed upload is recorded by the tracker and leaves the index as it was: training goes on."""

    def __init__(self, tracker, index: TrainingIndex):
        self.tracker, self.index = tracker, index

    @timing.phase("checkpoints")
    def _upload(self, path: Path, name: str) -> dict | None:
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # the artifact takes the file's name
            staged = Path(tmp) / name
            try:
                os.link(path, staged)
            except OSError:  # a file system without hard links
                shutil.copyfile(path, staged)
            if not self.tracker.log_artifact(staged, ARTIFACT_DIR):
                return None
        return {"run_id": self.tracker.run_id, "path": f"{ARTIFACT_DIR}/{name}", "sha": weights_fingerprint(path)}

    def on_ema_saved(self, path: Path, epoch: int) -> None:
        item = self._upload(Path(path), Path(path).name)
        if item is not None:
            entry = self.index.read()
            self.index.write({**entry, "ema": {**entry.get("ema", {}), str(epoch): item}})

    def on_checkpoint(self, path: Path, step: int, epoch: int) -> None:
        entry = self.index.read()
        current = entry.get("checkpoint", {})
        mine = current.get("run_id") == self.tracker.run_id
        slot = "b" if mine and current.get("path", "").endswith("-a.pt") else "a"  # never the one in use
        item = self._upload(Path(path), f"checkpoint-{slot}.pt")
        if item is not None:
            self.index.write({**self.index.read(), "checkpoint": {**item, "step": step, "epoch": epoch}})


def mark_done(index: TrainingIndex, run_id: str | None) -> None:
    index.write({**index.read(), "done": {"run_id": run_id}})


@timing.phase("checkpoints")
def _fetch(tracker, item: dict, target: Path) -> None:
    """Download one indexed file to `target`, atomically, checking its content hash."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        got = tracker.download(item["run_id"], item["path"], tmp)
        if weights_fingerprint(got) != item["sha"]:
            raise OSError(f"{item['path']} of run {item['run_id']} does not match its recorded hash")
        os.replace(got, target)


def restore(train_dir, index: TrainingIndex, tracker) -> dict:
    """Bring `train_dir` up to the index (see the module's doc); returns what it fetched:
    {"checkpoint_step": step or None, "ema_epochs": [...], "done": bool}."""
    train_dir = Path(train_dir)
    ckpt_dir = train_dir / "checkpoints"
    entry = index.read()
    fetched = {"checkpoint_step": None, "ema_epochs": [], "done": False}
    ck = entry.get("checkpoint")
    if not ck:
        return fetched
    index_is_newer = ck["step"] > checkpoint.newest_step(ckpt_dir)
    if index_is_newer:
        _fetch(tracker, ck, checkpoint.step_path(ckpt_dir, ck["step"]))
        fetched["checkpoint_step"] = ck["step"]
    for epoch, item in sorted(entry.get("ema", {}).items(), key=lambda kv: int(kv[0])):
        target = checkpoint.ema_path(ckpt_dir, int(epoch))
        if int(epoch) > ck["epoch"]:
            continue  # made after the indexed checkpoint: that epoch is trained again from it
        stale = index_is_newer and target.exists() and weights_fingerprint(target) != item["sha"]
        if not target.exists() or stale:
            _fetch(tracker, item, target)
            fetched["ema_epochs"].append(int(epoch))
    marker = train_dir / DONE_MARKER
    if entry.get("done") and not marker.exists():
        write_json(marker, entry["done"])
        fetched["done"] = True
    if any((fetched["checkpoint_step"] is not None, fetched["ema_epochs"], fetched["done"])):
        log.info("training %s: fetched from the tracking server: %s", train_dir.name, fetched)
    return fetched
