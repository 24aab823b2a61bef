"""One experiment = train one config, pick its best epoch by FID, score that epoch once with many samples.

The reference study took each config's best FID over its epochs. Scoring 10,000 samples every epoch would
make sampling, not training, the cost of a study, so: every `fid_every` epochs the EMA model is scored with
`fid_select_samples` images; the best epoch's weights are then scored once with `fid_samples` images, and
that is `best_fid`. With `fid_select_samples = fid_samples`, `best_fid_select` is the reference study's
number (the best per-epoch FID).

Which images: image i is drawn from seed (config.seed, i) (see `generate`). The selection scores images
0 .. fid_select_samples-1 (`selection_images`); the final FID scores the next fid_samples images
(`final_images`), which the selection never saw, so `best_fid` does not reward the images that picked the
epoch. The per-epoch grids have their own fixed seed (`train.SHEET_SEED`).

Per-epoch FIDs and grids belong to (training, sampling config). A DDPM and a DDIM run can share one training
folder, whose checkpoints and loss history they share, but each keeps its own record there (`SamplingRecord`)
of the selection FIDs and grids it made, every entry tied to the content hash of the EMA weights it came
from; any `fid` that another sampler's run left in the shared history is dropped. A run that resumes or
inherits a training scores, with its own sampler, every saved epoch it has no FID for, and puts this sampler's
grid of every epoch in its own grid folder (drawn again only where no valid one exists).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mnist_diff.config import Config, epoch_due
from mnist_diff.diffusion.samplers import image_seeds
from mnist_diff.diffusion.schedules import make_schedule
from mnist_diff.fid.engine import Reference, compute_fid, weights_fingerprint
from mnist_diff.runtime import checkpoint, timing
from mnist_diff.runtime.generate import generate
from mnist_diff.training.trainer import (
    Callback,
    EpochEnd,
    Trainer,
    load_sampling_model,
    sample_epoch,
)
from mnist_diff.util.atomic import write_json

SCORE_KEYS = ("fid", "sampling_seconds", "fid_seconds")  # per-epoch values that belong to one sampling config
OnFid = Callable[[int, float], None]  # told each (epoch, selection FID) of this run's sampling config


def selection_images(config: Config) -> range:
    """Indices of the images (of seed config.seed) every per-epoch selection FID scores."""
    return range(0, config.fid_select_samples)


def final_images(config: Config) -> range:
    """Indices of the images the final FID scores: the ones right after the selection's, never seen by it."""
    start = selection_images(config).stop
    return range(start, start + config.fid_samples)


def score_model(
    model,
    config: Config,
    reference: Reference,
    num: int,
    *,
    start: int = 0,
    progress: bool = True,
    fid_cache=None,
    desc: str = "FID sampling",
    phase: str = "selection",
) -> dict:
    """Sample images start..start+num-1 with the config's sampler (seed = config.seed) and score them; the
    seconds count as `phase` ("selection" or "final") in `timing`."""
    device = next(model.parameters()).device
    schedule = make_schedule(config.schedule, config.timesteps, config.beta_start, config.beta_end)
    t0 = time.perf_counter()
    images = generate(
        model,
        schedule,
        num=num,
        seed=config.seed,
        sampler=config.sampler,
        ddim_steps=config.ddim_steps,
        eta=config.eta,
        clip_x0=config.clip_x0,
        batch_size=config.sample_batch_size,
        start=start,
        precision=config.precision,
        progress=progress,
        desc=desc,
        compile=config.compile,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return score_images(images, config, reference, time.perf_counter() - t0, fid_cache=fid_cache, phase=phase)


def score_images(
    images: torch.Tensor,
    config: Config,
    reference: Reference,
    sampling_seconds: float,
    *,
    fid_cache=None,
    phase: str = "selection",
) -> dict:
    """The FID of images drawn in `sampling_seconds`, both times counted as `phase` in `timing`."""
    timing.add(f"{phase}_sampling", sampling_seconds)
    # the Inception batch is the device's own (evaluate.default_batch_size), not the sampling batch
    with timing.phase(f"{phase}_fid"):
        metrics = compute_fid(images, reference, device=images.device, kid=config.kid, cache_dir=fid_cache)
    return {**metrics, "sampling_seconds": sampling_seconds}


def selection_seeds(config: Config) -> list[int]:
    """The seeds of the selection images, for drawing them in an epoch's grid pass (`train.sample_epoch`)."""
    images = selection_images(config)
    return image_seeds(config.seed, len(images), images.start)


def score_drawn_selection(
    images: torch.Tensor, config: Config, reference: Reference, sampling_seconds: float, *, fid_cache=None
) -> dict:
    """An epoch's selection FID of its selection images, drawn in its grid pass."""
    m = score_images(images, config, reference, sampling_seconds, fid_cache=fid_cache)
    return {k: m[k] for k in SCORE_KEYS}


class SamplingRecord:
    """What one sampling config made of one training's per-epoch EMA weights: selection FIDs and sample
    grids, in `<train_dir>/sampling/<sampling key>-n<selection images>-<reference>.json`. An epoch's entry
    holds the content hash of the weights it came from and is dropped once they are rewritten (an epoch
    trained again after a crash); a grid also holds its file's hash, so one overwritten since is never used."""

    def __init__(self, train_dir, config: Config, reference: Reference):
        self.train_dir = Path(train_dir)
        name = f"{config.sampling_key()}-n{config.fid_select_samples}-{reference.cache_name()}"
        self.path = self.train_dir / "sampling" / f"{name}.json"
        self.header = {
            "sampling": config.sampling_dict(),
            "fid_select_samples": config.fid_select_samples,
            "reference": reference.cache_name(),
        }
        doc = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.epochs = {int(e): m for e, m in doc.get("epochs", {}).items()}

    def ema_path(self, epoch: int) -> Path:
        return checkpoint.ema_path(self.train_dir / "checkpoints", epoch)

    def _entry(self, epoch: int) -> dict:
        """The epoch's entry if it is about the weights on disk now, else {}."""
        m = self.epochs.get(epoch)
        path = self.ema_path(epoch)
        return m if m is not None and path.exists() and m["weights"] == weights_fingerprint(path) else {}

    def _update(self, epoch: int, values: dict) -> None:
        entry = self._entry(epoch) or {"weights": weights_fingerprint(self.ema_path(epoch))}
        self.epochs[epoch] = {**entry, **values}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {**self.header, "epochs": dict(sorted(self.epochs.items()))})

    def fid(self, epoch: int) -> dict | None:
        m = self._entry(epoch)
        return {k: m[k] for k in SCORE_KEYS} if "fid" in m else None

    def put_fid(self, epoch: int, metrics: dict) -> None:
        self._update(epoch, {k: metrics[k] for k in SCORE_KEYS})

    def grid(self, epoch: int) -> Path | None:
        """A grid of the epoch this sampling config drew from the current weights, if its file is unchanged."""
        m = self._entry(epoch)
        path = Path(m["grid"]) if "grid" in m else None
        # weights_fingerprint is a content hash of any file: here, the PNG's
        return path if path is not None and path.exists() and weights_fingerprint(path) == m["grid_hash"] else None

    def put_grid(self, epoch: int, path) -> None:
        self._update(epoch, {"grid": str(Path(path).resolve()), "grid_hash": weights_fingerprint(path)})

    def history(self, shared: list[dict]) -> list[dict]:
        """The shared training history (losses) with this sampling config's FIDs, and no one else's."""
        out = []
        for h in shared:
            entry = {k: v for k, v in h.items() if k not in SCORE_KEYS}
            entry.update(self.fid(h["epoch"]) or {})
            out.append(entry)
        return out


def fid_due(config: Config, epoch: int, last_epoch: int) -> bool:
    """Whether an epoch gets a selection FID: every `fid_every` epochs, and the last one."""
    return epoch_due(config.fid_every, epoch, last_epoch)


class FidSelection(Callback):
    """Scores the EMA model every `fid_every` epochs (and at the last epoch); the scores go to the record, to
    the epoch's metrics (hence to tracking) and to `on_fid(epoch, fid)`. Every epoch's grid goes to the record
    too. The selection images are drawn in the grid's pass (`seeds_for_epoch_end`)."""

    def __init__(
        self,
        config: Config,
        reference: Reference,
        record: SamplingRecord,
        *,
        progress: bool = True,
        fid_cache=None,
        on_fid: OnFid | None = None,
    ):
        self.config, self.reference, self.record = config, reference, record
        self.progress, self.fid_cache, self.on_fid = progress, fid_cache, on_fid
        self.last_epoch = config.epochs

    def on_train_start(self, trainer) -> None:
        self.last_epoch = trainer.total_steps // trainer.steps_per_epoch

    def seeds_for_epoch_end(self, epoch: int) -> list[int]:
        return selection_seeds(self.config) if fid_due(self.config, epoch, self.last_epoch) else []

    def score_epoch_end(self, epoch: int, drawn: dict, seconds: float) -> dict:
        seeds = self.seeds_for_epoch_end(epoch)
        if not seeds:
            return {}
        images = torch.stack([drawn[s] for s in seeds])
        return score_drawn_selection(images, self.config, self.reference, seconds, fid_cache=self.fid_cache)

    def on_epoch_end(self, end: EpochEnd) -> None:
        if end.sheet_path is not None:
            self.record.put_grid(end.epoch, end.sheet_path)
        if "fid" in end.metrics:
            self.record.put_fid(end.epoch, end.metrics)
            if self.on_fid is not None:
                self.on_fid(end.epoch, end.metrics["fid"])


def score_past_epochs(
    config: Config,
    history: list[dict],
    record: SamplingRecord,
    sheet_dir,
    *,
    last_epoch: int,
    reference: Reference,
    device,
    tracker=None,
    progress=True,
    fid_cache=None,
    on_fid: OnFid | None = None,
) -> None:
    """Epochs trained before this run, maybe under another sampling config: put this config's grid of each
    epoch due one (`sheet_every`) in `sheet_dir` (a copy of a valid one from the record, else drawn), score the
    due ones the record has no FID for, from the saved per-epoch EMA weights, and log them to this run's
    tracker and `on_fid`, which have not seen them."""
    schedule = make_schedule(config.schedule, config.timesteps, config.beta_start, config.beta_end)
    sheet_dir = Path(sheet_dir)
    sheet_dir.mkdir(parents=True, exist_ok=True)
    for h in history:
        epoch = h["epoch"]
        grid = sheet_dir / f"epoch-{epoch:03d}.png" if epoch_due(config.sheet_every, epoch, last_epoch) else None
        known = record.grid(epoch) if grid is not None else None
        draw_grid = grid is not None and known is None
        score = fid_due(config, epoch, last_epoch) and record.fid(epoch) is None
        if draw_grid or score:  # the grid and the selection images in one pass, as in training
            model, _, _ = load_sampling_model(record.ema_path(epoch), device)
            _, drawn, seconds = sample_epoch(
                model,
                schedule,
                config,
                grid if draw_grid else None,
                selection_seeds(config) if score else (),
                progress=progress,
            )
            if score:
                record.put_fid(epoch, score_drawn_selection(drawn, config, reference, seconds, fid_cache=fid_cache))
        if known is not None and known != grid.resolve():
            shutil.copyfile(known, grid)
        if grid is not None:
            record.put_grid(epoch, grid)
        scored = record.fid(epoch)
        if on_fid is not None and scored is not None:
            on_fid(epoch, scored["fid"])
        if tracker is not None:
            tracker.log_metrics({"epoch_loss": h["loss"], **(scored or {})}, step=epoch)
            if grid is not None:
                tracker.log_image(grid, key="samples", step=epoch)


@dataclass(frozen=True)
class ExperimentResult:
    """What one experiment produced: its training, its best epoch and the scores; `result.json` is `to_dict()`.
    A field is None where it does not apply (no final FID with fid_samples 0; `trained_in` only for a training
    another run did)."""

    config: dict
    training_key: str
    sampling_key: str
    out_dir: str
    steps: int
    epochs_done: int
    history: list  # one dict per epoch: loss, and this sampling config's selection FID where scored
    epoch_fids: dict  # {epoch: selection FID}
    fid_images: dict  # the seed and the [start, stop) image ranges of the selection and the final FID
    final_loss: float | None = None
    train_seconds: float | None = None
    fit_seconds: float | None = None  # this run's wall time in `fit` (training and selection)
    trained_by: str | None = None  # the MLflow run that made the last optimizer step
    trained_in: str | None = None
    best_epoch: int | None = None
    best_fid_select: float | None = None
    best_fid: float | None = None
    final_sampling_seconds: float | None = None
    final_fid_seconds: float | None = None
    kid: float | None = None
    kid_std: float | None = None

    def to_dict(self) -> dict:
        """As `result.json` holds it: the fields that apply."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None or k in _ALWAYS_WRITTEN}


_ALWAYS_WRITTEN = ("final_loss", "train_seconds", "trained_by")


def best_epoch(history: list[dict]) -> tuple[int, float | None] | None:
    """(epoch, selection FID) of the lowest FID; the last epoch when nothing was scored; None if no epoch."""
    scored = [h for h in history if h.get("fid") is not None]
    if scored:
        best = min(scored, key=lambda h: h["fid"])
        return best["epoch"], best["fid"]
    return (history[-1]["epoch"], None) if history else None


def run_experiment(
    config: Config,
    images: torch.Tensor,
    train_dir,
    *,
    reference: Reference,
    out_dir=None,
    tracker=None,
    resume: bool = False,
    progress: bool = True,
    fid_cache=None,
    extra_params: dict | None = None,
    callbacks: list | None = None,
    on_fid: OnFid | None = None,
) -> ExperimentResult:
    """Train (or resume) in `train_dir`, select the best epoch by this config's FIDs, score it. The grids
    (`samples/`) and `result.json` go to `out_dir` (default `train_dir`). A resumed training may have been
    started under another sampling config: its past epochs are scored with this one (`score_past_epochs`).
    `on_fid(epoch, fid)` hears every selection FID of this sampling config, past epochs' included."""
    train_dir = Path(train_dir)
    out_dir = Path(out_dir) if out_dir is not None else train_dir
    record = SamplingRecord(train_dir, config, reference)
    cbs = [FidSelection(config, reference, record, progress=progress, fid_cache=fid_cache, on_fid=on_fid)]
    if tracker is not None:
        cbs.append(tracker.training_callback(extra_params))
    trainer = Trainer(
        config,
        images,
        train_dir,
        callbacks=cbs + list(callbacks or []),
        progress=progress,
        sheet_dir=out_dir / "samples",
        run_id=tracker.run_id if tracker is not None else None,
    )
    if resume and trainer.resume():
        score_past_epochs(
            config,
            trainer.history,
            record,
            out_dir / "samples",
            last_epoch=trainer.total_steps // trainer.steps_per_epoch,
            reference=reference,
            device=trainer.device,
            tracker=tracker,
            progress=progress,
            fid_cache=fid_cache,
            on_fid=on_fid,
        )
    t0 = time.perf_counter()
    trainer.fit()
    fit_seconds = time.perf_counter() - t0
    result = {
        "steps": trainer.step,
        "epochs_done": trainer.step // trainer.steps_per_epoch,
        "train_seconds": trainer.train_seconds,
        "fit_seconds": fit_seconds,
        "trained_by": trainer.trained_by,
    }
    last = next(iter(sorted(trainer.ckpt_dir.glob("ckpt-*.pt"), reverse=True)), None)
    return finalize(
        config,
        record.history(trainer.history),
        trainer.ckpt_dir,
        out_dir,
        result,
        reference=reference,
        device=trainer.device,
        tracker=tracker,
        progress=progress,
        fid_cache=fid_cache,
        last_checkpoint=last,
    )


def finalize(
    config: Config,
    history: list[dict],
    ckpt_dir: Path,
    out_dir: Path,
    result: dict,
    *,
    reference: Reference,
    device,
    tracker=None,
    progress=True,
    fid_cache=None,
    last_checkpoint: Path | None = None,
) -> ExperimentResult:
    """Score the best epoch with the `final_images`; write result.json; log the final record. `history`
    holds this sampling config's FIDs only."""
    select, final = selection_images(config), final_images(config)
    scores = {}
    best = best_epoch(history)
    best_path = None
    if best is not None:
        scores["best_epoch"], scores["best_fid_select"] = best
        best_path = checkpoint.ema_path(ckpt_dir, best[0])
        if config.fid_samples > 0:
            model, _, _ = load_sampling_model(best_path, device)
            m = score_model(
                model,
                config,
                reference,
                len(final),
                start=final.start,
                progress=progress,
                fid_cache=fid_cache,
                desc=f"final FID (epoch {best[0]})",
                phase="final",
            )
            scores.update(
                best_fid=m["fid"],
                final_sampling_seconds=m["sampling_seconds"],
                final_fid_seconds=m["fid_seconds"],
                **{k: m[k] for k in ("kid", "kid_std") if k in m},
            )
    result = ExperimentResult(
        config=config.to_dict(),
        training_key=config.training_key(),
        sampling_key=config.sampling_key(),
        out_dir=str(out_dir),
        **result,
        **scores,
        history=history,
        epoch_fids={h["epoch"]: h["fid"] for h in history if h.get("fid") is not None},
        final_loss=history[-1]["loss"] if history else None,
        fid_images={"seed": config.seed, "selection": [select.start, select.stop], "final": [final.start, final.stop]},
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(out_dir) / "result.json", result.to_dict())
    if tracker is not None:
        tracker.log_final(result, out_dir, best_path, last_checkpoint, history)
    return result


def score_saved_training(
    config: Config,
    train_dir,
    out_dir,
    *,
    reference: Reference,
    device,
    tracker=None,
    progress: bool = True,
    fid_cache=None,
    on_fid: OnFid | None = None,
) -> ExperimentResult:
    """Score a finished training another run did (same training config, maybe another sampler): this config's
    grids and FIDs of every epoch it lacks, from the saved EMA weights, then the final FID. Nothing is trained."""
    train_dir, out_dir = Path(train_dir), Path(out_dir)
    ckpt_dir = train_dir / "checkpoints"
    trained = checkpoint.load_latest(ckpt_dir)
    if trained is None:
        raise FileNotFoundError(f"no training checkpoint in {ckpt_dir}")
    history = trained["history"]
    if tracker is not None:
        schedule = make_schedule(config.schedule, config.timesteps, config.beta_start, config.beta_end)
        tracker.log_params(
            {
                **config.to_dict(),
                "training_key": config.training_key(),
                "alpha_bar_T": schedule.alpha_bar_T,
                "trained_in": str(train_dir),
            }
        )
    record = SamplingRecord(train_dir, config, reference)
    score_past_epochs(
        config,
        history,
        record,
        out_dir / "samples",
        last_epoch=history[-1]["epoch"],
        reference=reference,
        device=device,
        tracker=tracker,
        progress=progress,
        fid_cache=fid_cache,
        on_fid=on_fid,
    )
    result = {
        "steps": trained["step"],
        "epochs_done": trained["epoch"],
        "train_seconds": trained.get("train_seconds"),
        "trained_in": str(train_dir),
        "trained_by": trained.get("trained_by"),
    }
    return finalize(
        config,
        record.history(history),
        ckpt_dir,
        out_dir,
        result,
        reference=reference,
        device=device,
        tracker=tracker,
        progress=progress,
        fid_cache=fid_cache,
    )
