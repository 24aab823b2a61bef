"""Checkpoints: everything a resume needs, written atomically (temporary file, fsync, rename), and
loaded with a fallback to the previous good file when the newest is truncated or unreadable.

A checkpoint holds tensors and plain data only (dicts, lists, numbers, strings), and is loaded as such
(`weights_only=True`): sweeps load checkpoints fetched from a tracking server, and a pickle that names any
other object could run code."""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path

import torch

from mnist_diff.util.atomic import atomic_path

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
_STEP_FILE = re.compile(r"^ckpt-(\d{8})\.pt$")


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """torch.save, written atomically (see `atomic.atomic_path`)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:  # torch's message suggests weights_only=False: never here
        found = next((line for line in str(err).splitlines() if "GLOBAL" in line), "")
        raise ValueError(
            f"{path} is not an mnist-diff checkpoint: it holds more than tensors and plain data"
            + (f" ({found.strip()})" if found else "")
        ) from None
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise ValueError(f"{path} is not an mnist-diff checkpoint")
    return ckpt


def step_path(folder: str | os.PathLike, step: int) -> Path:
    return Path(folder) / f"ckpt-{step:08d}.pt"


def ema_path(folder: str | os.PathLike, epoch: int) -> Path:
    """An epoch's sampling (EMA) weights, kept for every epoch so any sampler can score it later."""
    return Path(folder) / f"ema-epoch-{epoch:03d}.pt"


def newest_step(folder: str | os.PathLike) -> int:
    """The step of the newest training checkpoint file in `folder` (by name; not loaded); -1 if none."""
    found = list_steps(folder)
    return int(_STEP_FILE.match(found[0].name).group(1)) if found else -1


def list_steps(folder: str | os.PathLike) -> list[Path]:
    """Training checkpoints in `folder`, newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _STEP_FILE.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def load_latest(folder: str | os.PathLike, map_location="cpu", warn: bool = True) -> dict | None:
    """The newest loadable training checkpoint in `folder`; unreadable ones are skipped (with a warning)."""
    for path in list_steps(folder):
        try:
            return load(path, map_location)
        except Exception as err:  # truncated, corrupt, or foreign: fall back to the previous one
            if warn:
                log.warning("skipping unreadable checkpoint %s (%s: %s)", path, type(err).__name__, err)
    return None


def prune(folder: str | os.PathLike, keep: int = 2) -> None:
    """Delete all but the `keep` newest training checkpoints (two, so a corrupt newest one has a fallback)."""
    for path in list_steps(folder)[keep:]:
        path.unlink(missing_ok=True)
