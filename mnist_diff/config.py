"""Run configuration: one frozen, validated dataclass, a flat dict for tracking, and stable hashes of the
fields that decide what model gets trained (so a DDPM and a DDIM trial can share one training) and of those
that decide how it is sampled (so each keeps its own per-epoch FIDs of that training)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

from mnist_diff.choices import (
    COMPILE_CHOICES,
    FID_REFS,
    FUSED_CHOICES,
    PRECISIONS,
    SAMPLERS,
    SCHEDULES,
    USES_BETA_RANGE,
)


def _field(default, help: str):
    """A Config field with its help text: one home for a setting's default and what it means."""
    return dataclasses.field(default=default, metadata={"help": help})


MNIST_SIZES = {"train": 60_000, "test": 10_000}  # images per MNIST split


@dataclass(frozen=True)
class Config:
    """One run's settings. Each field's help is the text of its CLI option (`cli.options`)."""

    # diffusion
    schedule: str = _field(
        "linear",
        "Beta schedule. cosine (improved DDPM) is defined by alpha_bar alone and"
        " IGNORES --beta-start/--beta-end: for it only --timesteps matters.",
    )
    timesteps: int = _field(1000, "Diffusion steps T.")
    beta_start: float = _field(1e-4, "First beta (not for cosine).")
    beta_end: float = _field(0.02, "Last beta (not for cosine).")
    # sampling
    sampler: str = _field("ddpm", "ddpm: ancestral, all T steps. ddim: --ddim-steps steps from T-1 to 0.")
    ddim_steps: int = _field(50, "DDIM steps (<= --timesteps).")
    eta: float = _field(0.0, "DDIM noise: 0 is deterministic given x_T, 1 matches DDPM's variance.")
    clip_x0: bool = _field(
        True,
        "Clip each step's predicted x_0 to [-1, 1] (both samplers). It changes DDPM "
        "and DDIM differently, so it is part of any comparison of the two.",
    )
    # training (defaults: the reference study's batch and epochs)
    epochs: int = _field(20, "Training epochs (the reference study: 20).")
    batch_size: int = _field(128, "Training batch (the reference study: 128).")
    lr: float = _field(2e-4, "AdamW learning rate, after a linear warm-up of --warmup-steps; then constant.")
    warmup_steps: int = _field(500, "Optimizer steps of the learning rate's linear warm-up.")
    weight_decay: float = _field(0.0, "AdamW weight decay.")
    grad_clip: float = _field(1.0, "Clip the gradient norm to this (0: no clipping).")
    ema_decay: float = _field(
        0.999, "EMA of the weights used for sampling; 0 turns it off (sampling then uses the raw weights)."
    )
    ema_warmup_steps: int = _field(
        400,
        "The EMA decay ramps linearly from 0 to --ema-decay over these "
        "optimizer steps (0: --ema-decay from the start); logged as the "
        "metric ema_decay.",
    )
    channels: int = _field(64, "UNet base width (multiple of 8); 64 is 2.9M parameters.")
    seed: int = _field(0, "Seed of the weights, the data order and the noise.")
    precision: str = _field(
        "auto",
        "auto: bf16 autocast where the device has native bf16 (GPUs of compute "
        "capability 8.0+, CPUs with AVX512-BF16 or AMX), fp32 elsewhere.",
    )
    train_samples: int | None = _field(None, "Train on the first N MNIST images only (smoke runs, tests).")
    max_steps: int | None = _field(None, "Stop after N optimizer steps.")
    # FID protocol
    fid_every: int = _field(1, "Score the EMA model every N epochs (0: never) and keep the best epoch.")
    fid_select_samples: int = _field(2000, "Images per epoch-selection FID.")
    fid_samples: int = _field(
        10000, "Images for the final FID of the best epoch, not the selection's: best_fid (0: skip)."
    )
    fid_ref: str = _field("train", "MNIST split the samples are compared with.")
    fid_ref_samples: int | None = _field(None, "Use only the first N reference images (default: the whole split).")
    fid_batch_size: int = _field(500, "Batch for the Inception network.")
    kid: bool = _field(False, "Also compute KID.")
    sheet_images: int = _field(64, "Images in each epoch's sample sheet (own seeds; drawn with the selection images).")
    sheet_every: int = _field(
        1,
        "Draw the sample sheet every N epochs and at the last (0: never). Set it to "
        "--fid-every and each sheet is drawn in its epoch's selection pass: small "
        "batches cost GPU time.",
    )
    # how it runs, not what it computes (outside the training key; see RUNTIME_FIELDS)
    compile: str = _field(
        "auto",
        "torch.compile the UNet (on CUDA with CUDA graphs) for sampling and "
        "training. auto: on for CUDA, off elsewhere (compiling costs minutes on a "
        "CPU). If it fails: one warning, then eager.",
    )
    overlap: str = _field(
        "auto",
        "Sample and score each finished epoch on a side thread (on CUDA its own stream) while the next epoch "
        "trains; the same images and FIDs as in turn. auto: on for CUDA, off elsewhere.",
    )
    fused: str = _field(
        "auto",
        "The UNet's fused forward: GroupNorm+SiLU in one pass, tensor-core-shaped 1-channel convolutions, "
        "channels-last attention; same weights and math up to rounding (docs/speed.md). auto: on for CUDA, "
        "off elsewhere. If it cannot run: one warning, then the eager forward.",
    )
    sample_batch_size: int | None = _field(
        None,
        "Images per sampling batch (speed only: image i depends on "
        "(seed, i)). Default: what the device holds (up to 2000 on a"
        " GPU, 64 on CPU).",
    )

    def __post_init__(self):
        validate(self)

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def short_name(self) -> str:
        """e.g. 'cosine-T200-ddpm' or 'linear-T1000-b0.02-ddim' (cosine has no beta range to name)."""
        name = f"{self.schedule}-T{self.timesteps}"
        if USES_BETA_RANGE[self.schedule]:
            name += f"-b{self.beta_end:g}"
        return f"{name}-{self.sampler}"

    def training_dict(self) -> dict:
        """The fields that decide the trained weights (not how they are sampled or scored)."""
        d = self.to_dict()
        for key in SAMPLING_FIELDS + EVAL_FIELDS + RUNTIME_FIELDS:
            d.pop(key)
        if self.max_steps is None:  # left out: the trainings made before max_steps was in the key keep theirs
            d.pop("max_steps")
        return d

    def training_key(self) -> str:
        """A stable 12-hex-digit hash of `training_dict()`."""
        return _stable_hash(self.training_dict())

    def sampling_dict(self) -> dict:
        """The fields that decide how trained weights are sampled (SAMPLING_FIELDS)."""
        return {k: getattr(self, k) for k in SAMPLING_FIELDS}

    def sampling_key(self) -> str:
        """A stable 12-hex-digit hash of `sampling_dict()`."""
        return _stable_hash(self.sampling_dict())


def epoch_due(every: int, epoch: int, last_epoch: int) -> bool:
    """Whether a per-epoch output (selection FID: `fid_every`, sample sheet: `sheet_every`) is due: every
    `every` epochs and at the last one; never when `every` is 0."""
    return every > 0 and (epoch % every == 0 or epoch == last_epoch)


def training_changes(saved: Config, now: Config) -> dict:
    """{field: (saved, now)} of the training fields `now` changes: a resume of `saved`'s training must keep
    them. --epochs and --max-steps may change: the weights at each step don't depend on them."""
    old, new = saved.training_dict(), now.training_dict()
    return {k: (old.get(k), new[k]) for k in new if k not in LENGTH_FIELDS and old.get(k) != new[k]}


def check_reference(split: str, samples: int | None) -> None:
    """Raise ValueError unless `samples` (None: all) reference images can be taken from MNIST's `split`."""
    if split not in FID_REFS:
        raise ValueError(f"unknown --fid-ref {split!r}; choose train or test")
    if samples is not None and not 2 <= samples <= MNIST_SIZES[split]:
        raise ValueError(
            f"--fid-ref-samples must be in [2, {MNIST_SIZES[split]}] (the MNIST {split} split), got {samples}"
        )


def _stable_hash(d: dict) -> str:
    blob = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


SAMPLING_FIELDS = ("sampler", "ddim_steps", "eta", "clip_x0")
EVAL_FIELDS = (
    "fid_every",
    "fid_select_samples",
    "fid_samples",
    "fid_ref",
    "fid_ref_samples",
    "fid_batch_size",
    "kid",
    "sheet_images",
    "sheet_every",
)
# Speed settings. They live in the config (not as separate arguments) because the config is what reaches
# every place that trains or samples, and what config.json and MLflow record; like the sampling and FID fields
# they stay out of the training key and the resume check: a run may resume with other values.
RUNTIME_FIELDS = ("compile", "fused", "overlap", "sample_batch_size")
# How long it trains: in the training key (a training cut at another step is another training), but a resume
# may change them (the weights at each step do not depend on them).
LENGTH_FIELDS = ("epochs", "max_steps")


def validate(c: Config) -> None:
    """Raise ValueError with a one-line reason for any impossible setting."""

    def need(ok: bool, msg: str):
        if not ok:
            raise ValueError(msg)

    for f in dataclasses.fields(c):  # nan and inf pass every range check below: refuse them first
        value = getattr(c, f.name)
        if f.type == "float":
            need(
                isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                f"{_flag(f.name)} must be a finite number, got {value!r}",
            )
    need(c.schedule in SCHEDULES, f"unknown schedule {c.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    need(c.sampler in SAMPLERS, f"unknown sampler {c.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    need(c.timesteps >= 2, f"--timesteps must be >= 2, got {c.timesteps}")
    if USES_BETA_RANGE[c.schedule]:
        need(c.beta_start > 0, f"--beta-start must be > 0, got {c.beta_start}")
        need(c.beta_end > c.beta_start, f"--beta-end ({c.beta_end}) must be greater than --beta-start ({c.beta_start})")
        need(c.beta_end < 1, f"--beta-end must be < 1, got {c.beta_end}")
    need(c.ddim_steps >= 1, f"--ddim-steps must be >= 1, got {c.ddim_steps}")
    need(c.ddim_steps <= c.timesteps, f"--ddim-steps ({c.ddim_steps}) cannot exceed --timesteps ({c.timesteps})")
    need(0 <= c.eta <= 1, f"--eta must be in [0, 1], got {c.eta}")
    need(isinstance(c.clip_x0, bool), f"clip_x0 must be True or False, got {c.clip_x0!r}")
    need(c.epochs >= 1, f"--epochs must be >= 1, got {c.epochs}")
    need(c.batch_size >= 1, f"--batch-size must be >= 1, got {c.batch_size}")
    need(c.lr > 0, f"--lr must be > 0, got {c.lr}")
    need(c.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {c.warmup_steps}")
    need(c.weight_decay >= 0, f"weight_decay must be >= 0, got {c.weight_decay}")
    need(c.grad_clip >= 0, f"grad_clip must be >= 0 (0: no clipping), got {c.grad_clip}")
    need(0 <= c.ema_decay < 1, f"--ema-decay must be in [0, 1), got {c.ema_decay}")
    need(c.ema_warmup_steps >= 0, f"--ema-warmup-steps must be >= 0, got {c.ema_warmup_steps}")
    need(c.channels >= 8 and c.channels % 8 == 0, f"--channels must be a positive multiple of 8, got {c.channels}")
    need(c.precision in PRECISIONS, f"unknown precision {c.precision!r}; choose one of {', '.join(PRECISIONS)}")
    need(
        c.train_samples is None or c.train_samples >= c.batch_size,
        f"--train-samples ({c.train_samples}) must be at least --batch-size ({c.batch_size})",
    )
    need(
        c.train_samples is None or c.train_samples <= MNIST_SIZES["train"],
        f"--train-samples must be <= {MNIST_SIZES['train']} (the MNIST train split), got {c.train_samples}",
    )
    need(c.max_steps is None or c.max_steps >= 1, f"--max-steps must be >= 1, got {c.max_steps}")
    need(c.fid_every >= 0, f"--fid-every must be >= 0, got {c.fid_every}")
    need(c.fid_select_samples >= 2, f"--fid-select-samples must be >= 2, got {c.fid_select_samples}")
    need(
        c.fid_samples == 0 or c.fid_samples >= 2, f"--fid-samples must be 0 (no final FID) or >= 2, got {c.fid_samples}"
    )
    check_reference(c.fid_ref, c.fid_ref_samples)
    need(c.fid_batch_size >= 1, "--fid-batch-size must be >= 1")
    need(1 <= c.sheet_images <= 1024, f"--sheet-images must be in [1, 1024], got {c.sheet_images}")
    need(c.sheet_every >= 0, f"--sheet-every must be >= 0, got {c.sheet_every}")
    need(c.compile in COMPILE_CHOICES, f"unknown --compile {c.compile!r}; choose one of {', '.join(COMPILE_CHOICES)}")
    need(c.overlap in COMPILE_CHOICES, f"unknown --overlap {c.overlap!r}; choose one of {', '.join(COMPILE_CHOICES)}")
    need(c.fused in FUSED_CHOICES, f"unknown --fused {c.fused!r}; choose one of {', '.join(FUSED_CHOICES)}")
    need(c.sample_batch_size is None or c.sample_batch_size >= 1, "--sample-batch-size must be >= 1")


def _flag(field: str) -> str:
    """How a message names a field: its CLI option, else the field itself (a grid may set any field)."""
    return field if field in ("weight_decay", "grad_clip") else "--" + field.replace("_", "-")
