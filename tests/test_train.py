import os
import signal

import pytest
import torch
from conftest import TINY, malicious_checkpoint

from mnist_diff.config import Config
from mnist_diff.runtime import checkpoint
from mnist_diff.training.trainer import (
    Callback,
    Interrupted,
    NonFiniteLoss,
    StopSignals,
    Trainer,
    ema_decay_at,
    ema_nominal_step,
)


def tiny(**kw):
    return Config(**{**TINY, **kw})


def weights(trainer):
    return {
        k: v.clone()
        for k, v in {
            **trainer.model.state_dict(),
            **{"ema." + k: v for k, v in trainer.ema.state_dict().items()},
        }.items()
    }


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fit_writes_checkpoints_grids_and_history(tmp_path, mnist_small):
    t = Trainer(tiny(epochs=2), mnist_small[:128], tmp_path, progress=False)
    result = t.fit()
    assert result["step"] == 8 and result["epochs_done"] == 2
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert (tmp_path / "samples" / "epoch-001.png").stat().st_size > 0
    assert (tmp_path / "checkpoints" / "ema-epoch-002.pt").exists()
    ckpt = checkpoint.load_latest(tmp_path / "checkpoints")
    assert ckpt["step"] == 8 and {"model", "ema", "optimizer", "noise_gen", "torch_rng", "config"} <= ckpt.keys()


@pytest.mark.parametrize("stop_at", [4, 6])  # after epoch 1, and in the middle of epoch 2
def test_resume_gives_identical_weights(tmp_path, mnist_small, stop_at):
    images = mnist_small[:128]
    straight = Trainer(tiny(epochs=3), images, tmp_path / "a", progress=False)
    straight.fit()
    first = Trainer(tiny(epochs=3, max_steps=stop_at), images, tmp_path / "b", progress=False)
    first.fit()
    resumed = Trainer(tiny(epochs=3), images, tmp_path / "b", progress=False)
    assert resumed.resume() and resumed.step == stop_at
    resumed.fit()
    assert_same(weights(straight), weights(resumed))
    assert [h["loss"] for h in straight.history] == pytest.approx([h["loss"] for h in resumed.history])


class SigtermAfterStep(Trainer):
    """Sends itself a real SIGTERM right after optimizer step `at`: in the loop, where it only sets the stop flag."""

    at = -1

    def _train_step(self, x0):
        loss = super()._train_step(x0)
        if self.step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss


def test_sigterm_mid_epoch_then_resume_logs_the_uninterrupted_losses(tmp_path, mnist_small):
    images = mnist_small[:128]
    straight = Trainer(tiny(epochs=2), images, tmp_path / "a", progress=False)
    straight.fit()
    stopped = SigtermAfterStep(tiny(epochs=2), images, tmp_path / "b", progress=False)
    stopped.at = 6  # in the middle of epoch 2 (4 steps an epoch), between two loss readouts
    with StopSignals(), pytest.raises(Interrupted):
        stopped.fit()
    resumed = Trainer(tiny(epochs=2), images, tmp_path / "b", progress=False)
    assert resumed.resume() and resumed.step == 6
    resumed.fit()
    assert_same(weights(straight), weights(resumed))
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in straight.history])


class SigtermAtEpochEnd(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, end):  # where the FID of the epoch is scored
        if end.epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_while_the_last_epoch_is_scored_still_stops(tmp_path, mnist_small):
    t = Trainer(tiny(epochs=2), mnist_small[:128], tmp_path, callbacks=[SigtermAtEpochEnd(2)], progress=False)
    with StopSignals(), pytest.raises(Interrupted, match="SIGTERM at step 8"):
        t.fit()
    assert checkpoint.load_latest(tmp_path / "checkpoints")["step"] == 8  # all of it saved for a rerun


def test_resume_refuses_a_different_training_config(tmp_path, mnist_small):
    Trainer(tiny(epochs=1), mnist_small[:128], tmp_path, progress=False).fit()
    other = Trainer(tiny(epochs=1, lr=1e-3), mnist_small[:128], tmp_path, progress=False)
    with pytest.raises(ValueError, match="different config"):
        other.resume()


def test_non_finite_loss_stops_with_step_and_value(tmp_path, mnist_small):
    t = Trainer(tiny(epochs=2, lr=1e30, grad_clip=0.0, warmup_steps=0), mnist_small[:128], tmp_path, progress=False)
    with torch.no_grad():
        for p in t.model.parameters():
            p.mul_(1e20)
    with pytest.raises(NonFiniteLoss) as err:
        t.fit()
    assert err.value.step >= 1 and not torch.isfinite(torch.tensor(err.value.value))
    assert "step" in str(err.value)
    assert checkpoint.list_steps(tmp_path / "checkpoints") == []  # nothing non-finite was saved


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("simulated crash in the middle of torch.save")


def test_atomic_save_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt-00000001.pt"
    checkpoint.atomic_save({"format_version": 1, "step": 1, "w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="simulated"):
        checkpoint.atomic_save({"format_version": 1, "step": 2, "bad": Unpicklable()}, path)
    assert checkpoint.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_truncated_newest_checkpoint_falls_back_to_previous(tmp_path, caplog):
    for step in (1, 2):
        checkpoint.atomic_save(
            {"format_version": 1, "step": step, "w": torch.ones(1000)}, checkpoint.step_path(tmp_path, step)
        )
    newest = checkpoint.step_path(tmp_path, 2)
    newest.write_bytes(newest.read_bytes()[:100])
    assert checkpoint.load_latest(tmp_path)["step"] == 1
    assert "skipping unreadable checkpoint" in caplog.text


def test_loading_a_checkpoint_never_runs_its_code(tmp_path):
    marker = tmp_path / "code-ran"
    evil = malicious_checkpoint(checkpoint.step_path(tmp_path, 2), marker)
    with pytest.raises(ValueError, match="more than tensors and plain data"):
        checkpoint.load(evil)
    assert checkpoint.load_latest(tmp_path) is None  # skipped as unreadable
    checkpoint.atomic_save({"format_version": 1, "step": 1}, checkpoint.step_path(tmp_path, 1))
    assert checkpoint.load_latest(tmp_path)["step"] == 1  # the previous good one
    assert not marker.exists()


def test_a_new_start_removes_temporary_files_of_killed_writers_only(tmp_path, mnist_small):
    import subprocess
    import sys

    from mnist_diff.util.atomic import temporary_name

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    stale = [
        temporary_name(ckpts / "ckpt-00000004.pt", int(gone.stdout)),
        temporary_name(tmp_path / "result.json", int(gone.stdout)),
    ]
    live = temporary_name(ckpts / "ckpt-00000008.pt", os.getppid())  # a live process may be writing it now
    for p in (*stale, live):
        p.write_bytes(b"part of a checkpoint")
    Trainer(tiny(epochs=1, max_steps=1), mnist_small[:128], tmp_path, progress=False).fit()
    assert not any(p.exists() for p in stale) and live.exists()


def test_prune_keeps_two_newest(tmp_path):
    for step in (1, 2, 3):
        checkpoint.atomic_save({"format_version": 1, "step": step}, checkpoint.step_path(tmp_path, step))
    checkpoint.prune(tmp_path)
    assert [p.name for p in checkpoint.list_steps(tmp_path)] == ["ckpt-00000003.pt", "ckpt-00000002.pt"]


def test_training_key_ignores_sampler_and_fid_settings():
    a = tiny()
    assert a.training_key() == tiny(sampler="ddpm", eta=0.5, fid_samples=50, clip_x0=False).training_key()
    assert a.training_key() != tiny(ema_warmup_steps=7).training_key()
    assert a.training_key() != tiny(schedule="cosine").training_key()
    assert a.training_key() != tiny(seed=1).training_key()
    assert len(a.training_key()) == 12


# Every Config field's place: in the training key (the trained weights depend on it: points that differ in it
# never share a training), in the sampling key (how trained weights are sampled), or in neither (what is scored,
# or speed). A field added to Config without a place here fails the test below; each entry: (place, other value).
FIELD_PLACES = {
    "schedule": ("training", "cosine"),
    "timesteps": ("training", 500),
    "beta_start": ("training", 2e-4),
    "beta_end": ("training", 0.03),
    "epochs": ("training", 3),
    "batch_size": ("training", 64),
    "lr": ("training", 1e-3),
    "warmup_steps": ("training", 10),
    "weight_decay": ("training", 0.01),
    "grad_clip": ("training", 0.5),
    "ema_decay": ("training", 0.99),
    "ema_warmup_steps": ("training", 7),
    "channels": ("training", 32),
    "seed": ("training", 1),
    "precision": ("training", "fp32"),
    "train_samples": ("training", 1000),
    "max_steps": ("training", 100),
    "sampler": ("sampling", "ddim"),
    "ddim_steps": ("sampling", 10),
    "eta": ("sampling", 0.5),
    "clip_x0": ("sampling", False),
    "fid_every": ("neither", 2),
    "fid_select_samples": ("neither", 100),
    "fid_samples": ("neither", 0),
    "fid_ref": ("neither", "test"),
    "fid_ref_samples": ("neither", 100),
    "fid_batch_size": ("neither", 50),
    "kid": ("neither", True),
    "sheet_images": ("neither", 16),
    "sheet_every": ("neither", 0),
    "compile": ("neither", "off"),
    "overlap": ("neither", "on"),
    "fused": ("neither", "on"),
    "sample_batch_size": ("neither", 100),
}


def test_every_config_field_has_its_place_in_the_keys():
    import dataclasses

    assert set(FIELD_PLACES) == {f.name for f in dataclasses.fields(Config)}
    base = Config()
    for name, (place, other) in FIELD_PLACES.items():
        changed = base.replace(**{name: other})
        assert getattr(changed, name) != getattr(base, name), name
        moved = {
            "training": changed.training_key() != base.training_key(),
            "sampling": changed.sampling_key() != base.sampling_key(),
        }
        assert moved == {"training": place == "training", "sampling": place == "sampling"}, name
    # max_steps sets where a training stops: 4 and 8 steps are two trainings (a resume may still change it)
    assert base.replace(max_steps=4).training_key() != base.replace(max_steps=8).training_key()


def test_resume_skips_a_truncated_newest_checkpoint(tmp_path, mnist_small):
    images = mnist_small[:128]
    Trainer(tiny(epochs=2), images, tmp_path, progress=False).fit()
    newest = checkpoint.list_steps(tmp_path / "checkpoints")[0]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 3])
    again = Trainer(tiny(epochs=2), images, tmp_path, progress=False)
    assert again.resume() and again.step == 4  # the epoch-1 checkpoint, not the torn epoch-2 one
    again.fit()
    reference = Trainer(tiny(epochs=2), images, tmp_path / "ref", progress=False)
    reference.fit()
    assert_same(weights(reference), weights(again))


def test_same_seed_same_loss_curve_and_samples(tmp_path, mnist_small):
    from mnist_diff.runtime.generate import generate

    runs = []
    for name in ("a", "b"):
        t = Trainer(tiny(epochs=2), mnist_small[:128], tmp_path / name, progress=False)
        t.fit()
        runs.append(t)
    assert [h["loss"] for h in runs[0].history] == [h["loss"] for h in runs[1].history]
    draw = lambda t: generate(t.sampling_model, t.schedule, num=6, seed=1, sampler="ddpm", progress=False)  # noqa: E731
    assert torch.equal(draw(runs[0]), draw(runs[1]))
    other = Trainer(tiny(epochs=2, seed=1), mnist_small[:128], tmp_path / "c", progress=False)
    other.fit()
    assert [h["loss"] for h in other.history] != [h["loss"] for h in runs[0].history]


def test_ema_warmup_ramp_golden_values():
    c = Config(ema_decay=0.999, ema_warmup_steps=400)
    assert Config().ema_warmup_steps == 400  # the documented default
    golden = {0: 0.0, 1: 0.0024975, 100: 0.24975, 200: 0.4995, 399: 0.9965025, 400: 0.999, 9000: 0.999}
    assert {s: ema_decay_at(c, s) for s in golden} == pytest.approx(golden, abs=1e-12)
    assert ema_nominal_step(c) == 400
    assert ema_decay_at(c, ema_nominal_step(c)) == 0.999 and ema_decay_at(c, ema_nominal_step(c) - 1) < 0.999
    none = Config(ema_decay=0.99, ema_warmup_steps=0)  # no warm-up: the nominal decay from the first update
    assert ema_nominal_step(none) == 0 and ema_decay_at(none, 0) == 0.99


@pytest.mark.parametrize("warmup", [0, 5])
def test_first_ema_update_forgets_the_random_init_only_with_a_warmup(tmp_path, mnist_small, warmup):
    t = Trainer(tiny(epochs=1, ema_warmup_steps=warmup), mnist_small[:128], tmp_path, progress=False)
    init = {k: v.clone() for k, v in t.ema.state_dict().items()}
    x0 = mnist_small[:32].float() / 127.5 - 1
    t._train_step(x0)
    ema, model = t.ema.state_dict(), t.model.state_dict()
    for k in ema:
        if warmup:  # decay 0 at step 0: the average is the trained weights, none of the init
            assert torch.equal(ema[k], model[k]), k
        elif ema[k].is_floating_point() and not torch.equal(model[k], init[k]):
            assert torch.allclose(ema[k], 0.999 * init[k] + 0.001 * model[k], atol=1e-7), k


def test_progress_bar_moves_every_step(tmp_path, mnist_small, capsys, monkeypatch):
    # every refresh printed (tqdm reads TQDM_* defaults from the environment), so the counts it showed are seen
    monkeypatch.setenv("TQDM_MININTERVAL", "0")
    monkeypatch.setenv("TQDM_MINITERS", "1")
    Trainer(tiny(epochs=1), mnist_small[:128], tmp_path / "run", progress=True).fit()  # 4 steps, one loss sync
    shown = capsys.readouterr().err
    # the bar moves before the epoch's one loss readout (not only 0/4 then 4/4); tqdm may coalesce fast redraws
    assert any(f"{k}/4" in shown for k in (1, 2, 3)), shown
