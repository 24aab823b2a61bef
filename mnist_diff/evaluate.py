"""FID (and KID) of generated digits against MNIST, through torch-fidelity.

Images go in as uint8 tensors shaped 3x28x28 (gray repeated) through a Dataset: nothing is written to disk
and a generator is never sampled twice. The reference statistics are cached by torch-fidelity under a name
that includes the split, the sample count and a fingerprint of the Inception weights' contents, so a changed
reference or weights file can never reuse a stale entry.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from .data import DEFAULT_DATA_DIR, load_mnist, to_fid_rgb

log = logging.getLogger(__name__)
DEFAULT_CACHE_DIR = DEFAULT_DATA_DIR.parent / "fid-cache"


class ImageDataset(torch.utils.data.Dataset):
    """uint8 [N, 1, H, W] images served as uint8 3xHxW, the layout torch-fidelity expects."""

    def __init__(self, images_u8: torch.Tensor):
        if images_u8.dtype != torch.uint8 or images_u8.ndim != 4:
            raise ValueError(f"expected uint8 [N, C, H, W] images, got {images_u8.dtype} {tuple(images_u8.shape)}")
        self.images = images_u8.cpu()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return to_fid_rgb(self.images[i:i + 1])[0]


@lru_cache(maxsize=8)
def _fingerprint_file(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def weights_fingerprint(weights_path: str | os.PathLike | None) -> str:
    """A short content hash of the Inception weights file ('default' for torch-fidelity's own download)."""
    if not weights_path:
        return "default"
    st = os.stat(weights_path)
    return _fingerprint_file(str(Path(weights_path).resolve()), st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class Reference:
    """Which real images generated ones are compared with."""
    split: str = "train"                 # train | test
    samples: int | None = None           # None: the whole split; else its first N images
    data_dir: str | None = None
    weights_path: str | None = None

    def cache_name(self) -> str:
        count = "all" if self.samples is None else str(self.samples)
        return f"mnist-{self.split}-{count}-w{weights_fingerprint(self.weights_path)}"

    def dataset(self) -> ImageDataset:
        return ImageDataset(load_mnist(self.data_dir, train=self.split == "train", limit=self.samples))


def compute_fid(images_u8: torch.Tensor, reference: Reference, *, device="cpu", batch_size: int = 200,
                kid: bool = False, cache_dir: str | os.PathLike | None = None) -> dict:
    """{'fid': ..., ['kid': ..., 'kid_std': ...], 'fid_seconds': ...} of the images against the reference."""
    import torch_fidelity

    if images_u8.shape[0] < 2:
        raise ValueError("FID needs at least 2 images")
    cache_dir = Path(cache_dir or os.environ.get("MNIST_DIFF_FID_CACHE") or DEFAULT_CACHE_DIR)
    cache_dir.mkdir(parents=True, exist_ok=True)
    n = images_u8.shape[0]
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # torch-fidelity's loader asks for 4 workers whatever the CPU count
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        metrics = torch_fidelity.calculate_metrics(
            input1=ImageDataset(images_u8),
            input2=reference.dataset(),
            input2_cache_name=reference.cache_name(),
            cache_root=str(cache_dir),
            cache=True,
            fid=True,
            kid=kid,
            kid_subset_size=min(1000, n),
            cuda=torch.device(device).type == "cuda",
            batch_size=batch_size,
            feature_extractor_weights_path=reference.weights_path,
            verbose=False,
        )
    out = {"fid": float(metrics["frechet_inception_distance"]), "fid_seconds": time.perf_counter() - t0}
    if kid:
        out["kid"] = float(metrics["kernel_inception_distance_mean"])
        out["kid_std"] = float(metrics["kernel_inception_distance_std"])
    return out


def ensure_reference_stats(reference: Reference, *, device, cache_dir: str | os.PathLike | None = None) -> None:
    """Fetch the Inception weights and compute and cache the reference statistics now, so that later FIDs only
    read them (a sweep calls this once before its workers start: none of them downloads or races). It takes the
    steps `compute_fid` takes for the reference, so the cache entry is the one it looks up, without a FID."""
    from torch_fidelity.metric_fid import fid_input_id_to_statistics_cached
    from torch_fidelity.utils import (create_feature_extractor, resolve_feature_extractor,
                                      resolve_feature_layer_for_metric)

    cache_dir = Path(cache_dir or os.environ.get("MNIST_DIFF_FID_CACHE") or DEFAULT_CACHE_DIR)
    cache_dir.mkdir(parents=True, exist_ok=True)
    kwargs = dict(input2=reference.dataset(), input2_cache_name=reference.cache_name(), cache_root=str(cache_dir),
                  cache=True, fid=True, cuda=torch.device(device).type == "cuda",
                  feature_extractor_weights_path=reference.weights_path, verbose=False)
    layer = resolve_feature_layer_for_metric("fid", **kwargs)
    extractor = create_feature_extractor(resolve_feature_extractor(**kwargs), [layer], **kwargs)
    with warnings.catch_warnings():  # as in compute_fid
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        fid_input_id_to_statistics_cached(2, extractor, layer, **kwargs)
