"""One experiment = train one config, pick its best epoch by FID, score that epoch once with many samples.

The reference study took each config's best FID over its epochs. Scoring 10,000 samples every epoch would
make sampling, not training, the cost of a study, so: every `fid_every` epochs the EMA model is scored with
`fid_select_samples` images; the best epoch's weights are then scored once with `fid_samples` images, and
that is `best_fid`. `fid_select_samples = fid_samples` reproduces the per-epoch protocol exactly.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from .config import Config
from .evaluate import Reference, compute_fid
from .generate import generate
from .schedules import make_schedule
from .train import Callback, EpochEnd, Trainer, load_sampling_model, sample_grid


def score_model(model, config: Config, reference: Reference, num: int, *, progress: bool = True,
                fid_cache=None, desc: str = "FID sampling") -> dict:
    """Sample `num` images with the config's sampler (seed = config.seed) and score them."""
    device = next(model.parameters()).device
    schedule = make_schedule(config.schedule, config.timesteps, config.beta_start, config.beta_end)
    t0 = time.perf_counter()
    images = generate(model, schedule, num=num, seed=config.seed, sampler=config.sampler,
                      ddim_steps=config.ddim_steps, eta=config.eta, batch_size=config.sample_batch_size,
                      precision=config.precision, progress=progress, desc=desc, compile=config.compile)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    sampling_seconds = time.perf_counter() - t0
    metrics = compute_fid(images, reference, device=device, batch_size=config.fid_batch_size, kid=config.kid,
                          cache_dir=fid_cache)
    return {**metrics, "sampling_seconds": sampling_seconds}


class FidSelection(Callback):
    """Scores the EMA model every `fid_every` epochs (and at the last epoch); the scores land in the
    epoch's metrics, hence in the training history and checkpoint."""

    def __init__(self, config: Config, reference: Reference, *, progress: bool = True, fid_cache=None):
        self.config, self.reference, self.progress, self.fid_cache = config, reference, progress, fid_cache
        self.last_epoch = config.epochs

    def on_train_start(self, trainer) -> None:
        self.last_epoch = trainer.total_steps // trainer.steps_per_epoch

    def on_epoch_end(self, end: EpochEnd) -> None:
        every = self.config.fid_every
        if every <= 0 or not (end.epoch % every == 0 or end.epoch == self.last_epoch):
            return
        m = score_model(end.sampling_model, self.config, self.reference, self.config.fid_select_samples,
                        progress=self.progress, fid_cache=self.fid_cache, desc=f"FID epoch {end.epoch}")
        end.metrics.update({"fid": m["fid"], "sampling_seconds": m["sampling_seconds"],
                            "fid_seconds": m["fid_seconds"]})


def best_epoch(history: list[dict]) -> tuple[int, float | None] | None:
    """(epoch, selection FID) of the lowest FID; the last epoch when nothing was scored; None if no epoch."""
    scored = [h for h in history if h.get("fid") is not None]
    if scored:
        best = min(scored, key=lambda h: h["fid"])
        return best["epoch"], best["fid"]
    return (history[-1]["epoch"], None) if history else None


def run_experiment(config: Config, images: torch.Tensor, out_dir, *, reference: Reference, tracker=None,
                   resume: bool = False, progress: bool = True, fid_cache=None, extra_params: dict | None = None,
                   callbacks: list | None = None) -> dict:
    """Train (or resume), select the best epoch, score it; returns and writes `result.json`."""
    out_dir = Path(out_dir)
    cbs = [FidSelection(config, reference, progress=progress, fid_cache=fid_cache)]
    if tracker is not None:
        from .tracking import TrackingCallback
        cbs.append(TrackingCallback(tracker, extra_params))
    trainer = Trainer(config, images, out_dir, callbacks=cbs + list(callbacks or []), progress=progress)
    if resume:
        trainer.resume()
    t0 = time.perf_counter()
    trainer.fit()
    fit_seconds = time.perf_counter() - t0
    result = {"steps": trainer.step, "epochs_done": trainer.step // trainer.steps_per_epoch,
              "train_seconds": trainer.train_seconds, "fit_seconds": fit_seconds}
    last = next(iter(sorted(trainer.ckpt_dir.glob("ckpt-*.pt"), reverse=True)), None)
    return finalize(config, trainer.history, trainer.ckpt_dir, out_dir, result, reference=reference,
                    device=trainer.device, tracker=tracker, progress=progress, fid_cache=fid_cache,
                    last_checkpoint=last)


def finalize(config: Config, history: list[dict], ckpt_dir: Path, out_dir: Path, result: dict, *,
             reference: Reference, device, tracker=None, progress=True, fid_cache=None,
             last_checkpoint: Path | None = None) -> dict:
    """Score the best epoch with `fid_samples` images; write result.json; log the final record."""
    result = {"config": config.to_dict(), "training_key": config.training_key(), "out_dir": str(out_dir),
              **result, "history": history,
              "epoch_fids": {h["epoch"]: h["fid"] for h in history if h.get("fid") is not None},
              "final_loss": history[-1]["loss"] if history else None}
    best = best_epoch(history)
    best_path = None
    if best is not None:
        result["best_epoch"], result["best_fid_select"] = best
        best_path = Path(ckpt_dir) / f"ema-epoch-{best[0]:03d}.pt"
        if config.fid_samples > 0:
            model, _, _ = load_sampling_model(best_path, device)
            m = score_model(model, config, reference, config.fid_samples, progress=progress, fid_cache=fid_cache,
                            desc=f"final FID (epoch {best[0]})")
            result.update(best_fid=m["fid"], final_sampling_seconds=m["sampling_seconds"],
                          final_fid_seconds=m["fid_seconds"], **{k: m[k] for k in ("kid", "kid_std") if k in m})
    write_json(Path(out_dir) / "result.json", result)
    if tracker is not None:
        from .tracking import log_final
        log_final(tracker, result, out_dir, best_path, last_checkpoint, history)
    return result


def score_saved_training(config: Config, train_dir, out_dir, *, reference: Reference, device, tracker=None,
                         progress: bool = True, fid_cache=None) -> dict:
    """Score a model another run trained (same training config, other sampler): per-epoch grids and FIDs
    from its saved EMA weights, then the final FID of the best epoch. Nothing is trained."""
    train_dir, out_dir = Path(train_dir), Path(out_dir)
    trained = json.loads((train_dir / "result.json").read_text())
    (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    schedule = make_schedule(config.schedule, config.timesteps, config.beta_start, config.beta_end)
    if tracker is not None:
        tracker.log_params({**config.to_dict(), "training_key": config.training_key(),
                            "alpha_bar_T": schedule.alpha_bar_T, "trained_in": str(train_dir)})
    history = []
    for h in trained["history"]:
        epoch = h["epoch"]
        model, _, _ = load_sampling_model(train_dir / "checkpoints" / f"ema-epoch-{epoch:03d}.pt", device)
        grid = sample_grid(model, schedule, config, out_dir / "samples" / f"epoch-{epoch:03d}.png")
        entry = {"epoch": epoch, "step": h["step"], "loss": h["loss"]}
        every = config.fid_every
        if every > 0 and (epoch % every == 0 or epoch == trained["history"][-1]["epoch"]):
            m = score_model(model, config, reference, config.fid_select_samples, progress=progress,
                            fid_cache=fid_cache, desc=f"FID epoch {epoch}")
            entry.update(fid=m["fid"], sampling_seconds=m["sampling_seconds"], fid_seconds=m["fid_seconds"])
        history.append(entry)
        if tracker is not None:
            tracker.log_metrics({k: v for k, v in entry.items() if k not in ("epoch", "step")}, step=epoch)
            tracker.log_image(grid, key="samples", step=epoch)
    result = {"steps": trained["steps"], "epochs_done": trained["epochs_done"],
              "train_seconds": trained.get("train_seconds"), "trained_in": str(train_dir)}
    return finalize(config, history, train_dir / "checkpoints", out_dir, result, reference=reference,
                    device=device, tracker=tracker, progress=progress, fid_cache=fid_cache)


def write_json(path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)
