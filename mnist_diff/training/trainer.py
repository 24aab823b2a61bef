"""The training loop: AdamW, EMA, bf16 autocast where native (device.py), gradient clipping, atomic per-epoch
checkpoints, exact resume. It imports no tracking library: evaluation and logging hook in through `Callback`.

Everything about the data order is derived from (seed, step): epoch e is shuffled with its own seeded
generator, so a run resumed from any step sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mnist_diff.config import Config, epoch_due, training_changes
from mnist_diff.diffusion.forward import training_loss
from mnist_diff.diffusion.samplers import image_seeds
from mnist_diff.diffusion.schedules import make_schedule
from mnist_diff.diffusion.unet import UNet, count_parameters
from mnist_diff.runtime import accel, checkpoint, timing
from mnist_diff.runtime.data import save_sheet, to_model_range
from mnist_diff.runtime.device import autocast
from mnist_diff.runtime.generate import generate_seeds
from mnist_diff.runtime.side_stream import SideStream
from mnist_diff.runtime.step_graph import StepGraph, portable_optimizer_state
from mnist_diff.util import atomic

log = logging.getLogger(__name__)
LOG_EVERY = 50  # optimizer steps between host syncs (loss readout, non-finite check)
SHEET_SEED = 12345  # the per-epoch grids' own seeds (config.sheet_images of them), the same every epoch


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int, value: float):
        super().__init__(f"non-finite training loss {value} at step {step}")
        self.step, self.value = step, value


class Interrupted(KeyboardInterrupt):
    """Stopped by SIGINT or SIGTERM (a KeyboardInterrupt, so trackers mark the run KILLED); `signum` says which."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """While active, SIGINT and SIGTERM raise `Interrupted`, except inside the training loop, where they only
    set a flag that the loop checks between optimizer steps: it then writes a consistent checkpoint and raises.
    A second signal always raises at once."""

    active: StopSignals | None = None

    def __init__(self):
        self.received: str | None = None  # the name of the signal whose stop the training loop defers
        self.received_signum: int = signal.SIGINT
        self.holds = 0  # training loops (and lanes of trials, study/lanes.py) running: each defers a stop
        self._hold_lock = threading.Lock()
        self._previous: dict = {}

    @contextlib.contextmanager
    def deferring(self):
        """While the block runs, a first signal only sets `received` (see the class)."""
        with self._hold_lock:
            self.holds += 1
        try:
            yield self
        finally:
            with self._hold_lock:
                self.holds -= 1

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        StopSignals.active = self
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        StopSignals.active = None

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.holds and self.received is None:
            self.received, self.received_signum = name, signum
            log.warning("%s received: stopping after the current step", name)
            return
        raise Interrupted(name, signum)


@dataclass
class EpochEnd:
    """What a callback sees after each epoch."""

    epoch: int  # 1-based
    step: int  # optimizer steps done
    loss: float  # mean training loss over the epoch
    images_per_sec: float
    sampling_model: torch.nn.Module  # the epoch's EMA weights (or the raw ones with EMA off), in eval mode
    ema_path: Path  # this epoch's sampling weights on disk
    sheet_path: Path | None  # this epoch's 8x8 sample sheet; None where none is due (`sheet_every`)
    metrics: dict = field(default_factory=dict)  # the callbacks' scores (e.g. fid); kept in the history


class Callback:
    """The training loop's hooks, all called in the training thread except `score_epoch_end`."""

    def on_train_start(self, trainer: Trainer) -> None: ...
    def on_log(self, step: int, loss: float, images_per_sec: float) -> None: ...
    def on_ema_saved(self, path: Path, epoch: int) -> None: ...  # an epoch's sampling weights, before its checkpoint
    def on_epoch_end(self, end: EpochEnd) -> None: ...  # the epoch scored (with --overlap: during the next one)
    def on_checkpoint(self, path: Path, step: int, epoch: int) -> None: ...  # a full checkpoint was saved

    def seeds_for_epoch_end(self, epoch: int) -> list[int]:
        """Images (by seed) to draw together with the epoch's grid, handed to `score_epoch_end`."""
        return []

    def score_epoch_end(self, epoch: int, drawn: dict[int, torch.Tensor], seconds: float) -> dict:
        """The epoch's metrics from the images drawn for it (seed -> image) in `seconds`. With --overlap this
        runs on a side thread while training goes on: compute only; record in `on_epoch_end`."""
        return {}


GLOBAL_RNG = threading.Lock()  # torch's global generator, which trainings built at once in one process share


def build_model(config: Config, device) -> UNet:
    with GLOBAL_RNG, torch.random.fork_rng(devices=[]):  # the initial weights depend on the seed alone
        torch.manual_seed(config.seed)
        model = UNet(channels=config.channels)
    model = accel.device_layout(model.to(device))
    return accel.use_fused(model, config.fused, config.precision)  # after the layout: checked as it will run


def lr_at(config: Config, step: int) -> float:
    """Linear warm-up over `warmup_steps`, then constant."""
    if config.warmup_steps <= 0:
        return config.lr
    return config.lr * min(1.0, (step + 1) / config.warmup_steps)


def ema_decay_at(config: Config, step: int) -> float:
    """The decay of the EMA update that follows optimizer step `step` (0-based): ema_decay * step / W over the
    warm-up W = ema_warmup_steps, then ema_decay (W = 0: ema_decay from the first update).

    Why linear in the decay: the first update has decay 0 (the average starts from trained weights, none of
    the random init), and the early, fast-moving weights are forgotten within the warm-up: at its end the
    average spans only the last ~2 sqrt(W) steps (mean age 23 steps for W=400); the nominal EMA takes over from
    there. A ramp linear in the half-life or window that reaches 0.999 as early would still give the first 100
    steps 57% of the average at step 400 and 8% at step 2,340. The former ramp min(decay, (1+step)/(10+step))
    forgot well but reached 0.999 only after ~9,000 steps, which left --ema-decay mostly nominal in the
    study's ~9,400 steps. Default W = 400: within the first epoch at batch 128 (468 steps), so every scored
    epoch's EMA uses the nominal decay."""
    if config.ema_warmup_steps <= 0 or step >= config.ema_warmup_steps:
        return config.ema_decay
    return config.ema_decay * step / config.ema_warmup_steps


def ema_nominal_step(config: Config) -> int:
    """The first optimizer step (0-based, as in `ema_decay_at`) whose EMA update uses the nominal decay."""
    return max(0, config.ema_warmup_steps)


def epoch_permutation(seed: int, epoch: int, n: int, device) -> torch.Tensor:
    gen = torch.Generator(device).manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen, device=device)


@dataclass
class Trainer:
    config: Config
    images: torch.Tensor  # uint8 [N, 1, 28, 28] on the training device
    out_dir: Path
    callbacks: list = field(default_factory=list)
    progress: bool = True
    sheet_dir: Path | None = None  # the per-epoch sample sheets (default out_dir/samples)
    run_id: str | None = None  # who trains (e.g. an MLflow run id), saved in checkpoints as `trained_by`

    def __post_init__(self):
        c = self.config
        self.out_dir = Path(self.out_dir)
        self.device = self.images.device
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.sheet_dir = Path(self.sheet_dir) if self.sheet_dir is not None else self.out_dir / "samples"
        self.schedule = make_schedule(c.schedule, c.timesteps, c.beta_start, c.beta_end).to(self.device)
        self.model = build_model(c, self.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False) if c.ema_decay > 0 else None
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay, fused=fused or None
        )
        self.fast_model = accel.TrainingModel(self.model, c.compile)  # compiled forward (+ backward) or eager
        # on CUDA with compiling on, the whole step as one CUDA graph; it falls back to fast_model
        self.step_graph = (
            StepGraph(self) if accel.compile_enabled(c.compile, self.device) and self.device.type == "cuda" else None
        )
        self.noise_gen = torch.Generator(self.device).manual_seed(c.seed)
        self.steps_per_epoch = self.images.shape[0] // c.batch_size  # drop the last partial batch
        self.total_steps = c.epochs * self.steps_per_epoch
        if c.max_steps is not None:
            self.total_steps = min(self.total_steps, c.max_steps)
        self.step = 0
        self.history: list[dict] = []
        self.epoch_loss = (0.0, 0)  # (sum, steps) of the current epoch's losses; kept across a mid-epoch resume
        self.train_seconds = 0.0  # optimizer steps only (not sampling, FID or checkpoints), across resumes
        self.trained_by: str | None = None  # run_id of whoever made the latest optimizer step, across resumes
        self.num_parameters = count_parameters(self.model)
        self.overlap = accel.on_for_cuda(c.overlap, self.device)  # score an epoch while the next one trains
        self._side: SideStream | None = None
        self._scoring: tuple[Future, EpochEnd, dict] | None = None  # an epoch being scored: (job, end, history entry)

    # -- state ---------------------------------------------------------------------------------
    @property
    def sampling_model(self) -> torch.nn.Module:
        return self.ema if self.ema is not None else self.model

    def state_dict(self) -> dict:
        return {
            "format_version": checkpoint.FORMAT_VERSION,
            "config": self.config.to_dict(),
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": portable_optimizer_state(self.optimizer),
            "noise_gen": self.noise_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "history": self.history,
            "epoch_loss": self.epoch_loss,
            "train_seconds": self.train_seconds,
            "trained_by": self.trained_by,
        }

    def load_state_dict(self, ckpt: dict) -> None:
        diff = training_changes(Config.from_dict(ckpt["config"]), self.config)
        if diff:
            raise ValueError(f"checkpoint was trained with a different config (saved, now): {diff}")
        self.model.load_state_dict(ckpt["model"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.noise_gen.set_state(ckpt["noise_gen"].cpu())
        torch.set_rng_state(ckpt["torch_rng"].cpu())
        if ckpt.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["cuda_rng"]])
        self.step = int(ckpt["step"])
        self.history = list(ckpt.get("history", []))
        self.epoch_loss = tuple(ckpt.get("epoch_loss", (0.0, 0)))
        self.train_seconds = float(ckpt.get("train_seconds", 0.0))
        self.trained_by = ckpt.get("trained_by")

    def resume(self) -> bool:
        """Load the newest good checkpoint in out_dir; False when there is none."""
        ckpt = checkpoint.load_latest(self.ckpt_dir, map_location=self.device)
        if ckpt is None:
            return False
        self.load_state_dict(ckpt)
        log.info("resumed from step %d (epoch %d)", self.step, self.step // self.steps_per_epoch)
        return True

    def save(self) -> Path:
        with timing.phase("checkpoints"):
            path = checkpoint.atomic_save(self.state_dict(), checkpoint.step_path(self.ckpt_dir, self.step))
            checkpoint.prune(self.ckpt_dir)
        for cb in self.callbacks:
            cb.on_checkpoint(path, self.step, self.step // self.steps_per_epoch)
        return path

    # -- loop ----------------------------------------------------------------------------------
    def step_scalars(self, step: int) -> tuple[float, float]:
        """(learning rate, EMA weight = 1 - decay) of optimizer step `step` (0-based)."""
        return lr_at(self.config, step), 1.0 - ema_decay_at(self.config, step)

    def forward_backward(self, model, x0: torch.Tensor, graph_safe: bool = False) -> torch.Tensor:
        """The loss of batch x0 and its gradients, set from scratch: gradients are dropped before the forward
        (so running it twice is the same as once, and a CUDA graph may reuse their memory)."""
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.config.precision, graph_safe=graph_safe):
            loss = training_loss(model, self.schedule, x0, self.noise_gen).mean()
        loss.backward()
        return loss.detach()

    @torch.no_grad()
    def apply_update(self, ema_weight: float | torch.Tensor) -> None:
        """Clipping, AdamW at the learning rate in the optimizer, EMA. No host sync: with the learning rate and
        `ema_weight` as device tensors, a CUDA graph can capture it (step_graph.py)."""
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            ema, params = list(self.ema.parameters()), list(self.model.parameters())
            # a tensor weight must go in as a list: as a lone tensor it would be read back to the host
            torch._foreach_lerp_(ema, params, [ema_weight] * len(ema) if torch.is_tensor(ema_weight) else ema_weight)
            for b_ema, b in zip(self.ema.buffers(), self.model.buffers()):
                b_ema.copy_(b)

    def _train_step(self, x0: torch.Tensor) -> torch.Tensor:
        lr, ema_weight = self.step_scalars(self.step)
        loss = self.step_graph.step(x0, lr, ema_weight) if self.step_graph is not None else None
        if loss is None:  # no graph here (or it fell back): the eager step, its model compiled or not
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss = self.fast_model.step(lambda: self.forward_backward(self.fast_model, x0), self.noise_gen)
            self.apply_update(ema_weight)
        self.step += 1
        self.trained_by = self.run_id
        return loss

    def _check_losses(self, losses: list[torch.Tensor], first_step: int) -> float:
        """One host sync for a window of steps: raise on the first non-finite loss, return the mean."""
        values = torch.stack(losses).float().cpu()
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            i = int(bad[0])
            raise NonFiniteLoss(first_step + i + 1, float(values[i]))
        return float(values.mean())

    def _fold(self, window: list[torch.Tensor], first_step: int, t_window: float) -> tuple[float, float, float]:
        """A window of steps into the epoch's loss sums (raising on a non-finite loss) and its time into
        `train_seconds`. Returns (its mean loss, its images/s, the time it ended)."""
        mean = self._check_losses(window, first_step)
        now = time.perf_counter()
        self.train_seconds += now - t_window
        timing.add("training", now - t_window)
        self.epoch_loss = (self.epoch_loss[0] + mean * len(window), self.epoch_loss[1] + len(window))
        return mean, len(window) * self.config.batch_size / max(now - t_window, 1e-9), now

    def fit(self) -> dict:
        c = self.config
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.sheet_dir.mkdir(parents=True, exist_ok=True)
        for folder in (self.out_dir, self.ckpt_dir):  # a run killed mid-write left its temporary files
            atomic.remove_stale(folder)
        (self.out_dir / "config.json").write_text(json.dumps(c.to_dict(), indent=2))
        for cb in self.callbacks:
            cb.on_train_start(self)
        self.model.train()
        n = self.images.shape[0]
        bs = c.batch_size
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        window: list[torch.Tensor] = []
        window_start, t_window = self.step, time.perf_counter()
        t_epoch, epoch_start_steps = time.perf_counter(), self.epoch_loss[1]
        perm = None
        stop = StopSignals.active
        with self._running(stop), bar:
            while self.step < self.total_steps:
                if stop and stop.received:
                    if window:  # the epoch's loss sums must hold these steps too, or a resume logs another loss
                        self._fold(window, window_start, t_window)
                    self._collect()  # the epoch being scored beside: its scores go in the checkpoint
                    self.save()
                    raise Interrupted(f"{stop.received} at step {self.step}; checkpoint saved", stop.received_signum)
                epoch, b = divmod(self.step, self.steps_per_epoch)
                if perm is None or b == 0:
                    perm = epoch_permutation(c.seed, epoch, n, self.device)
                x0 = to_model_range(self.images[perm[b * bs : (b + 1) * bs]])
                window.append(self._train_step(x0))
                bar.update(1)  # per step, so the bar moves and shows an ETA at once; no host sync (loss stays batched)
                epoch_done = self.step % self.steps_per_epoch == 0
                if len(window) == LOG_EVERY or epoch_done or self.step == self.total_steps:
                    mean, ips, now = self._fold(window, window_start, t_window)
                    bar.set_postfix(loss=f"{mean:.4f}", img_s=f"{ips:.0f}", epoch=epoch + 1)
                    for cb in self.callbacks:
                        cb.on_log(self.step, mean, ips)
                    window, window_start = [], self.step
                    if epoch_done:
                        loss_sum, steps = self.epoch_loss
                        ips = (steps - epoch_start_steps) * bs / max(now - t_epoch, 1e-9)
                        self.epoch_loss = (0.0, 0)
                        self._end_epoch(epoch + 1, loss_sum / steps, ips)
                        t_epoch, epoch_start_steps = time.perf_counter(), 0
                    t_window = time.perf_counter()  # epoch-end work (checkpoint, grid) is not training time
            if self.step % self.steps_per_epoch != 0:  # stopped by --max-steps mid-epoch
                self.save()
            if stop and stop.received:  # came during the last step or the last epoch's scoring: still a stop
                raise Interrupted(f"{stop.received} at step {self.step}; checkpoint saved", stop.received_signum)
        return {"step": self.step, "epochs_done": self.step // self.steps_per_epoch, "history": self.history}

    @contextlib.contextmanager
    def _running(self, stop: StopSignals | None):
        """While the loop runs: a stop signal waits for the step in hand, and epochs are scored beside."""
        with stop.deferring() if stop else contextlib.nullcontext():
            self._side = SideStream(self.device, self.overlap)
            failed = True
            try:
                yield
                failed = False
            finally:
                self._close_side(failed)

    def _end_epoch(self, epoch: int, loss: float, ips: float) -> None:
        """The epoch's sampling weights, its scores (sheet, FID: the callbacks), then the checkpoint. With
        --overlap, while more epochs follow, the epoch is scored beside the next one's training, from a copy of
        its weights; its scores reach the callbacks and the history at the next epoch's end (a checkpoint holds
        the scores of the epochs before it; a resume scores the rest from their saved weights)."""
        c = self.config
        self._collect()
        with timing.phase("checkpoints"):
            ema_path = checkpoint.atomic_save(
                {
                    "format_version": checkpoint.FORMAT_VERSION,
                    "config": c.to_dict(),
                    "epoch": epoch,
                    "step": self.step,
                    "ema": self.sampling_model.state_dict(),
                },
                checkpoint.ema_path(self.ckpt_dir, epoch),
            )
        for cb in self.callbacks:
            cb.on_ema_saved(ema_path, epoch)
        beside = self.overlap and self.step < self.total_steps  # the last epoch has nothing to overlap with
        model = copy.deepcopy(self.sampling_model).eval().requires_grad_(False) if beside else self.sampling_model
        sheet_path = self.sheet_dir / f"epoch-{epoch:03d}.png"
        if not epoch_due(c.sheet_every, epoch, self.total_steps // self.steps_per_epoch):
            sheet_path = None
        entry = {"epoch": epoch, "step": self.step, "loss": loss, "images_per_sec": ips}
        self.history.append(entry)
        job = lambda: self._score(epoch, model, sheet_path, progress=self.progress and not beside)
        scoring = self._side.submit(job, beside=beside)
        self._scoring = (scoring, EpochEnd(epoch, self.step, loss, ips, model, ema_path, sheet_path), entry)
        if not beside:
            self._collect()
        self.save()
        self.model.train()

    def _score(self, epoch: int, model, sheet_path: Path | None, progress: bool) -> tuple[Path | None, dict]:
        """An epoch's sheet and the images the callbacks asked for, in one pass; then their metrics."""
        seeds = [s for cb in self.callbacks for s in cb.seeds_for_epoch_end(epoch)]
        drawn, seconds = [], 0.0
        if sheet_path is not None or seeds:
            sheet_path, drawn, seconds = sample_epoch(model, self.schedule, self.config, sheet_path, seeds, progress)
        metrics: dict = {}
        for cb in self.callbacks:
            metrics.update(cb.score_epoch_end(epoch, dict(zip(seeds, drawn)), seconds))
        return sheet_path, metrics

    def _collect(self) -> None:
        """The epoch being scored (waiting for it): its scores to the callbacks and to its history entry."""
        if self._scoring is None:
            return
        scoring, end, entry = self._scoring
        self._scoring = None
        end.sheet_path, scores = scoring.result()
        end.metrics.update(scores)
        for cb in self.callbacks:
            cb.on_epoch_end(end)
        entry.update(end.metrics)

    def _close_side(self, failed: bool) -> None:
        """After the loop: a crash still records an epoch already scored beside (finished work is not lost); one
        still being scored is left to finish, unrecorded (a resume scores it from its saved weights)."""
        if failed and self._scoring is not None:
            epoch = self._scoring[1].epoch
            if self._scoring[0].done():
                try:
                    self._collect()
                except Exception:  # the crash in hand is the one to report
                    log.exception("recording epoch %d's scores after a crash failed", epoch)
            self._scoring = None
        if self._side is not None:
            self._side.close(wait=not failed)
            self._side = None


def sample_epoch(
    model, schedule, config: Config, path, seeds: Sequence[int] = (), progress: bool = False
) -> tuple[Path | None, torch.Tensor, float]:
    """An epoch's grid at `path` (None: no grid) and the images of `seeds` (e.g. its FID set), drawn in one pass:
    a 64-image grid alone is a small batch, which on a GPU costs about as long as a full one. The grid (8x8 by
    default) has fixed seeds of its own, so epochs compare. Returns the grid's path, the images of `seeds` and
    their share of the pass's seconds (the grid's share counts as "grids")."""
    n = config.sheet_images if path is not None else 0
    grid_seeds = image_seeds(SHEET_SEED, n)
    parts = ([f"grid {Path(path).stem}"] if n else []) + ([f"{len(seeds):,} images"] if seeds else [])
    desc = " + ".join(parts)
    t0 = time.perf_counter()
    images = generate_seeds(
        model,
        schedule,
        [*grid_seeds, *seeds],
        sampler=config.sampler,
        ddim_steps=config.ddim_steps,
        eta=config.eta,
        clip_x0=config.clip_x0,
        batch_size=config.sample_batch_size,
        precision=config.precision,
        progress=progress,
        desc=desc,
        compile=config.compile,
    )
    if images.device.type == "cuda":  # this stream's work only: training may run on another (--overlap)
        torch.cuda.current_stream(images.device).synchronize()
    seconds = time.perf_counter() - t0
    extra_seconds = seconds * len(seeds) / (len(seeds) + n)
    timing.add("grids", seconds - extra_seconds)
    grid = save_sheet(images[:n], path, nrow=math.ceil(math.sqrt(n))) if n else None
    return grid, images[n:], extra_seconds


def load_sampling_model(path, device) -> tuple[UNet, Config, dict]:
    """The model to sample from in a checkpoint: the EMA weights when present. Works for both the full
    training checkpoints and the per-epoch EMA files."""
    ckpt = checkpoint.load(path, map_location=device)
    config = Config.from_dict(ckpt["config"])
    model = UNet(channels=config.channels).to(device)
    model.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"])
    model = accel.use_fused(model.eval().requires_grad_(False), config.fused, config.precision)
    return model, config, ckpt
