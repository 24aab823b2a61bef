"""The FID protocol of one experiment: which images the selection and the final FID score, and whose
per-epoch FIDs and grids a run may use."""

import pytest
import torch
from conftest import TINY

from mnist_diff.config import Config
from mnist_diff.diffusion.samplers import image_seeds
from mnist_diff.diffusion.schedules import make_schedule
from mnist_diff.fid.engine import Reference, compute_fid
from mnist_diff.runtime import checkpoint
from mnist_diff.runtime.generate import generate
from mnist_diff.training.experiment import (
    SamplingRecord,
    final_images,
    run_experiment,
    score_saved_training,
    selection_images,
)
from mnist_diff.training.trainer import SHEET_SEED, load_sampling_model


def test_final_fid_never_scores_the_selection_images(tmp_path, mnist_small, data_dir, fid_weights, monkeypatch):
    monkeypatch.setenv("MNIST_DIFF_FID_CACHE", str(tmp_path / "fid-cache"))
    config = Config(
        **{**TINY, "epochs": 1, "fid_select_samples": 6, "fid_samples": 8, "fid_ref_samples": 16, "fid_batch_size": 16}
    )
    select, final = selection_images(config), final_images(config)
    assert (len(select), len(final)) == (6, 8) and not set(select) & set(final)
    seeds = {name: set(image_seeds(config.seed, len(r), r.start)) for name, r in (("select", select), ("final", final))}
    seeds["grid"] = set(image_seeds(SHEET_SEED, config.sheet_images))
    assert not seeds["select"] & seeds["final"] and not (seeds["select"] | seeds["final"]) & seeds["grid"]

    reference = Reference("train", 16, data_dir, fid_weights)
    result = run_experiment(config, mnist_small[:128], tmp_path / "run", reference=reference, progress=False)
    assert result.fid_images == {"seed": 0, "selection": [0, 6], "final": [6, 14]}

    model, _, _ = load_sampling_model(checkpoint.ema_path(tmp_path / "run" / "checkpoints", 1), "cpu")
    schedule = make_schedule(config.schedule, config.timesteps, config.beta_start, config.beta_end)
    draw = lambda num, start: generate(
        model,
        schedule,
        num=num,
        seed=config.seed,
        start=start,  # noqa: E731
        sampler=config.sampler,
        ddim_steps=config.ddim_steps,
        progress=False,
    )
    selection_set, final_set = draw(6, 0), draw(8, 6)
    assert not any(torch.equal(a, b) for a in final_set for b in selection_set)
    # the final FID is that of images 6..13 (not 0..7, as before). One FID recomputed: each costs seconds on CPU
    assert result.best_fid == pytest.approx(compute_fid(final_set, reference, batch_size=16)["fid"], rel=1e-4)


def test_sampling_record_keeps_each_sampler_apart_and_drops_stale_entries(tmp_path, data_dir, fid_weights):
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    checkpoint.atomic_save({"format_version": 1, "ema": torch.zeros(3)}, checkpoint.ema_path(ckpt_dir, 1))
    reference = Reference("train", 16, data_dir, fid_weights)
    ddim, ddpm = Config(**TINY), Config(**{**TINY, "sampler": "ddpm"})
    record = SamplingRecord(tmp_path, ddim, reference)
    grid = tmp_path / "samples" / "epoch-001.png"
    grid.parent.mkdir()
    grid.write_bytes(b"ddim grid")
    record.put_fid(1, {"fid": 12.5, "sampling_seconds": 1.0, "fid_seconds": 2.0})
    record.put_grid(1, grid)
    again = SamplingRecord(tmp_path, ddim, reference)  # read back from disk
    assert again.fid(1)["fid"] == 12.5 and again.grid(1) == grid.resolve()
    assert again.history([{"epoch": 1, "loss": 0.3, "fid": 99.0}]) == [
        {"epoch": 1, "loss": 0.3, "fid": 12.5, "sampling_seconds": 1.0, "fid_seconds": 2.0}
    ]
    other = SamplingRecord(tmp_path, ddpm, reference)
    assert other.fid(1) is None and other.grid(1) is None  # another sampler's FID is never this one's
    assert other.history([{"epoch": 1, "loss": 0.3, "fid": 99.0}]) == [{"epoch": 1, "loss": 0.3}]

    grid.write_bytes(b"ddpm grid, drawn over it")
    assert again.grid(1) is None and again.fid(1) is not None  # an overwritten grid is not ddim's any more
    checkpoint.atomic_save({"format_version": 1, "ema": torch.ones(3)}, checkpoint.ema_path(ckpt_dir, 1))
    assert again.fid(1) is None  # the epoch was trained again: its old FID is not about these weights


def test_grid_every_draws_grids_on_due_epochs_only_in_training_and_in_a_shared_training(
    tmp_path, data_dir, fid_weights, mnist_small
):
    """--sheet-every 2 over 3 epochs: grids at epochs 2 and 3 (the last), in the training run and in a run of
    another sampler that scores the saved training; the selection FID still every epoch."""
    reference = Reference("train", 16, data_dir, fid_weights)
    config = Config(
        **{
            **TINY,
            "epochs": 3,
            "sheet_every": 2,
            "sheet_images": 4,
            "fid_select_samples": 4,
            "fid_samples": 0,
            "fid_ref_samples": 16,
            "fid_batch_size": 16,
        }
    )
    result = run_experiment(
        config,
        mnist_small[:128],
        tmp_path / "run",
        reference=reference,
        progress=False,
        fid_cache=tmp_path / "fid-cache",
    )
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == ["epoch-002.png", "epoch-003.png"]
    assert sorted(result.epoch_fids) == [1, 2, 3]
    ddpm = config.replace(sampler="ddpm")
    other = score_saved_training(
        ddpm,
        tmp_path / "run",
        tmp_path / "ddpm",
        reference=reference,
        device="cpu",
        progress=False,
        fid_cache=tmp_path / "fid-cache",
    )
    assert sorted(p.name for p in (tmp_path / "ddpm" / "samples").iterdir()) == ["epoch-002.png", "epoch-003.png"]
    assert sorted(other.epoch_fids) == [1, 2, 3] and other.epoch_fids != result.epoch_fids
