"""The rules of trainings shared through the tracking server (`shared_trainings`), on a real MLflow store and a
real Optuna study in a temporary folder. The two-machine runs themselves are in test_postgres.py."""

import json

import optuna
import pytest

from mnist_diff.fid.engine import weights_fingerprint
from mnist_diff.runtime import checkpoint
from mnist_diff.study.objective import StoredTrainingIndex
from mnist_diff.study.shared_trainings import DONE_MARKER, Uploader, mark_done, restore
from mnist_diff.tracking.mlflow_store import Tracker


@pytest.fixture
def setup(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/optuna.db", study_name="s")
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "e")
    tracker.start()
    return StoredTrainingIndex(study, "k"), tracker


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _train(folder, uploader, epochs, steps_per_epoch=2, version="A"):
    """What a training writes and uploads: per epoch its EMA weights, then its full checkpoint."""
    ckpt = folder / "checkpoints"
    for epoch in epochs:
        ema = _write(checkpoint.ema_path(ckpt, epoch), f"ema {epoch} {version}")
        uploader.on_ema_saved(ema, epoch)
        step = epoch * steps_per_epoch
        uploader.on_checkpoint(_write(checkpoint.step_path(ckpt, step), f"ckpt {step} {version}"), step, epoch)


def test_checkpoint_slots_alternate_within_a_run_and_the_index_keeps_hashes(setup, tmp_path):
    index, tracker = setup
    uploader = Uploader(tracker, index)
    slots = []
    for epoch in (1, 2, 3):
        _train(tmp_path / "home", uploader, [epoch])
        slots.append(index.read()["checkpoint"]["path"])
    assert slots == ["training/checkpoint-a.pt", "training/checkpoint-b.pt", "training/checkpoint-a.pt"]
    entry = index.read()
    assert entry["checkpoint"]["step"] == 6 and entry["checkpoint"]["epoch"] == 3
    ema3 = tmp_path / "home" / "checkpoints" / "ema-epoch-003.pt"
    assert entry["ema"]["3"] == {
        "run_id": tracker.run_id,
        "path": "training/ema-epoch-003.pt",
        "sha": weights_fingerprint(ema3),
    }


def test_restore_brings_an_empty_folder_up_to_the_index(setup, tmp_path):
    index, tracker = setup
    _train(tmp_path / "home", Uploader(tracker, index), [1, 2])
    # an EMA uploaded after the last checkpoint (the machine died before checkpointing epoch 3) is not fetched
    ema3 = _write(tmp_path / "home" / "checkpoints" / "ema-epoch-003.pt", "ema 3 A")
    Uploader(tracker, index).on_ema_saved(ema3, 3)
    away = tmp_path / "away"
    got = restore(away, index, tracker)
    assert got == {"checkpoint_step": 4, "ema_epochs": [1, 2], "done": False}
    assert (away / "checkpoints" / "ckpt-00000004.pt").read_text() == "ckpt 4 A"
    assert sorted(p.name for p in (away / "checkpoints").iterdir()) == [
        "ckpt-00000004.pt",
        "ema-epoch-001.pt",
        "ema-epoch-002.pt",
    ]
    assert not (away / DONE_MARKER).exists()
    mark_done(index, tracker.run_id)
    assert restore(away, index, tracker) == {"checkpoint_step": None, "ema_epochs": [], "done": True}
    assert json.loads((away / DONE_MARKER).read_text()) == {"run_id": tracker.run_id}


def test_restore_replaces_another_version_when_the_index_is_newer_and_keeps_newer_local_work(setup, tmp_path):
    index, tracker = setup
    _train(tmp_path / "home", Uploader(tracker, index), [1, 2])
    # this machine trained epoch 1 in another version and stopped: the index's checkpoint is newer
    here = tmp_path / "here"
    _write(checkpoint.ema_path(here / "checkpoints", 1), "ema 1 B")
    _write(checkpoint.step_path(here / "checkpoints", 2), "ckpt 2 B")
    assert restore(here, index, tracker)["ema_epochs"] == [1, 2]
    assert checkpoint.ema_path(here / "checkpoints", 1).read_text() == "ema 1 A"
    # a machine whose own checkpoint is newer than the index (its upload failed) keeps its work
    ahead = tmp_path / "ahead"
    _write(checkpoint.ema_path(ahead / "checkpoints", 2), "ema 2 C")
    _write(checkpoint.step_path(ahead / "checkpoints", 6), "ckpt 6 C")
    assert restore(ahead, index, tracker) == {"checkpoint_step": None, "ema_epochs": [1], "done": False}
    assert checkpoint.ema_path(ahead / "checkpoints", 2).read_text() == "ema 2 C"


def test_a_download_that_does_not_match_its_hash_is_refused(setup, tmp_path):
    index, tracker = setup
    _train(tmp_path / "home", Uploader(tracker, index), [1])
    entry = index.read()
    index.write({**entry, "checkpoint": {**entry["checkpoint"], "sha": "0" * 16}})
    with pytest.raises(OSError, match="does not match its recorded hash"):
        restore(tmp_path / "away", index, tracker)
    assert not (tmp_path / "away" / "checkpoints" / "ckpt-00000002.pt").exists()
