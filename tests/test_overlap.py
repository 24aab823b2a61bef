"""--overlap: an epoch sampled and scored on a side thread while the next one trains gives what the serial
loop gives, bit for bit on the CPU; a stop or a crash keeps the scores already made; a resume scores the rest."""

import os
import signal
import threading

import pytest
import torch
from conftest import TINY

from mnist_diff.config import Config
from mnist_diff.fid.engine import Reference
from mnist_diff.runtime import checkpoint
from mnist_diff.runtime.side_stream import SideStream
from mnist_diff.training.experiment import FidSelection, SamplingRecord, run_experiment
from mnist_diff.training.trainer import Callback, Interrupted, StopSignals, Trainer

SCORED = dict(TINY, epochs=3, fid_select_samples=6, fid_samples=0, fid_ref_samples=16, fid_batch_size=16)


@pytest.fixture(scope="module")
def reference(data_dir, fid_weights, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # the reference's statistics computed once for the module
        mp.setenv("MNIST_DIFF_FID_CACHE", str(tmp_path_factory.mktemp("fid-cache")))
        yield Reference("train", 16, data_dir, fid_weights)


def _experiment(folder, images, reference, **changes):
    config = Config(**{**SCORED, **changes})
    return run_experiment(config, images, folder, reference=reference, progress=False)


@pytest.fixture(scope="module")
def serial(tmp_path_factory, mnist_small, reference):
    folder = tmp_path_factory.mktemp("serial")
    return folder, _experiment(folder, mnist_small[:128], reference, overlap="off")


def test_the_overlapped_study_equals_the_serial_one(tmp_path, mnist_small, reference, serial):
    serial_dir, serial = serial
    beside = _experiment(tmp_path, mnist_small[:128], reference, overlap="on")
    assert len(serial.history) == 3 and all("fid" in h for h in serial.history)
    same = lambda h: {k: v for k, v in h.items() if k != "images_per_sec" and not k.endswith("_seconds")}
    assert [same(h) for h in beside.history] == [same(h) for h in serial.history]
    assert beside.epoch_fids == serial.epoch_fids and beside.best_epoch == serial.best_epoch
    for epoch in (1, 2, 3):  # the same weights, and the same sheets drawn from them
        a, b = (checkpoint.load(checkpoint.ema_path(d / "checkpoints", epoch)) for d in (serial_dir, tmp_path))
        assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
        a, b = (d / "samples" / f"epoch-{epoch:03d}.png" for d in (serial_dir, tmp_path))
        assert a.read_bytes() == b.read_bytes()


class Scores(Callback):
    """Which epochs the callbacks heard scored, and in which thread."""

    def __init__(self):
        self.epochs, self.threads = [], set()

    def score_epoch_end(self, epoch, drawn, seconds):
        self.threads.add(threading.current_thread().name)
        return {}

    def on_epoch_end(self, end):
        assert threading.current_thread() is threading.main_thread()
        self.epochs.append(end.epoch)


def test_scoring_runs_beside_the_training_and_is_heard_in_the_training_thread(tmp_path, mnist_small):
    scores = Scores()
    t = Trainer(Config(**{**TINY, "epochs": 3, "overlap": "on"}), mnist_small[:128], tmp_path, [scores], False)
    t.fit()
    assert scores.epochs == [1, 2, 3]
    assert any(name.startswith("mnist-diff-side") for name in scores.threads)  # epochs 1 and 2
    assert threading.main_thread().name in scores.threads  # the last epoch: nothing left to overlap with
    assert checkpoint.load_latest(tmp_path / "checkpoints")["history"] == t.history


class StopAtEpochEnd(Callback):
    """When epoch `epoch` has trained, once the epoch before it is scored beside (not yet recorded): a SIGTERM,
    or a crash."""

    def __init__(self, epoch, crash=False):
        self.epoch, self.crash = epoch, crash

    def on_train_start(self, trainer):
        self.trainer = trainer

    def on_log(self, step, loss, images_per_sec):
        if step != self.epoch * self.trainer.steps_per_epoch:
            return
        self.trainer._scoring[0].result()
        if self.crash:
            raise RuntimeError("forced crash while training")
        os.kill(os.getpid(), signal.SIGTERM)


def _stopping(folder, images, reference, crash):
    config = Config(**{**SCORED, "overlap": "on"})
    record = SamplingRecord(folder, config, reference)
    selection = FidSelection(config, reference, record, progress=False)
    return Trainer(config, images, folder, [selection, StopAtEpochEnd(2, crash)], progress=False), record


def test_a_stop_while_an_epoch_is_scored_beside_waits_for_the_scores_it_saves(tmp_path, mnist_small, reference):
    t, record = _stopping(tmp_path, mnist_small[:128], reference, crash=False)
    with StopSignals(), pytest.raises(Interrupted, match="SIGTERM at step 8"):
        t.fit()
    saved = checkpoint.load_latest(tmp_path / "checkpoints")
    assert saved["step"] == 8 and [h["epoch"] for h in saved["history"]] == [1, 2]
    assert all("fid" in h for h in saved["history"]) and record.fid(1) and record.fid(2)


def test_a_crash_keeps_the_scores_made_beside_and_a_resume_equals_a_straight_run(
    tmp_path, mnist_small, reference, serial
):
    t, record = _stopping(tmp_path / "crashed", mnist_small[:128], reference, crash=True)
    with pytest.raises(RuntimeError, match="forced crash"):
        t.fit()
    assert record.fid(1) is not None and "fid" in t.history[0]  # finished work is kept
    assert checkpoint.load_latest(tmp_path / "crashed" / "checkpoints")["step"] == 4
    config = Config(**{**SCORED, "overlap": "on"})
    resumed = run_experiment(
        config, mnist_small[:128], tmp_path / "crashed", reference=reference, resume=True, progress=False
    )
    straight = serial[1]
    assert resumed.epoch_fids == straight.epoch_fids and resumed.best_epoch == straight.best_epoch


def test_a_failed_job_raises_where_it_is_collected_and_jobs_use_the_callers_threads():
    side = SideStream("cpu", enabled=True)
    try:
        threads = torch.get_num_threads()
        assert side.submit(torch.get_num_threads).result() == threads
        assert side.submit(threading.current_thread).result() is not threading.current_thread()
        assert side.submit(threading.current_thread, beside=False).result() is threading.current_thread()
        failed = side.submit(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failed.result()
    finally:
        side.close()
