"""FID (and KID) of generated digits against MNIST, with torch-fidelity's own Inception network.

One engine per process and device: torch-fidelity's `inception-v3-compat` feature extractor (2048 pool
features, the one `calculate_metrics` uses for FID) is built once and kept on the device; the reference
statistics are computed once per (split, count, weights content), cached on disk in torch-fidelity's layout
under a name holding all three (a changed reference or weights file never reuses a stale entry), and kept in
memory. Generated images stay on their device as uint8 and go through Inception in large batches. The
Fréchet distance is torch-fidelity's formula with an exact, faster trace term (`trace_sqrt_product`),
computed in float64 on the GPU when there is one. Inception runs in fp32 (torch-fidelity's numbers); bf16
autocast with a channels-last copy is an option (`precision`), checked against fp32 by `bench
--fid-precision-check`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from mnist_diff.choices import FID_PRECISIONS
from mnist_diff.config import check_reference
from mnist_diff.runtime.data import DatasetRef, load_mnist, mnist_dataset, to_fid_rgb
from mnist_diff.util.paths import CACHE_ROOT

log = logging.getLogger(__name__)
DEFAULT_CACHE_DIR = CACHE_ROOT / "fid-cache"
FEATURE_EXTRACTOR = "inception-v3-compat"  # torch-fidelity's default for FID and KID
FEATURE_LAYER = "2048"


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


# A few tensors of torch-fidelity's FeatureExtractorInceptionV3 state dict, first to last block, that tell its
# weights from any other file (its 472 tensors are then checked by load_state_dict itself).
INCEPTION_SIGNATURE = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Mixed_6e.branch7x7_1.conv.weight": (192, 768, 1, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
}


def check_weights(weights_path: str | os.PathLike) -> None:
    """Raise ValueError, with a one-line reason, unless the file is torch-fidelity's Inception state dict.
    Read as data only (weights_only): torch-fidelity itself unpickles the file, which could run code."""
    import pickle
    import zipfile

    try:  # mapped, not read, where torch.save's zip format allows: the file is ~100 MB
        state = torch.load(weights_path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(weights_path))
    except Exception as err:  # an UnpicklingError's text is a page of advice: its name says enough
        first = "" if isinstance(err, pickle.UnpicklingError) else (str(err).strip().splitlines() or [""])[0]
        raise ValueError(
            f"not a torch weights file of tensors ({type(err).__name__}{': ' + first[:200] if first else ''})"
        ) from None
    for key, shape in INCEPTION_SIGNATURE.items():
        tensor = state.get(key) if isinstance(state, dict) else None
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            raise ValueError(f"not torch-fidelity's Inception weights (no {key} of shape {list(shape)})")


@dataclass(frozen=True)
class Reference:
    """Which real images generated ones are compared with."""

    split: str = "train"  # train | test
    samples: int | None = None  # None: the whole split; else its first N images
    data_dir: str | None = None
    weights_path: str | None = None

    def __post_init__(self):
        check_reference(self.split, self.samples)  # e.g. 20,000 test images: the split has 10,000

    def cache_name(self) -> str:
        count = "all" if self.samples is None else str(self.samples)
        return f"mnist-{self.split}-{count}-w{weights_fingerprint(self.weights_path)}"

    def images(self, device="cpu") -> torch.Tensor:
        return load_mnist(self.data_dir, train=self.split == "train", limit=self.samples, device=device)

    def dataset(self) -> DatasetRef:
        """The reference images, for a run's lineage."""
        return mnist_dataset(self.data_dir, train=self.split == "train", limit=self.samples, context="fid_reference")


def default_batch_size(device) -> int:
    """Images per Inception batch: Inception needs ~20 MB per image at 299x299 in float32."""
    return 500 if torch.device(device).type == "cuda" else 32


def _device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # one cache entry for 'cuda' and 'cuda:0'
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _math_device(device: torch.device) -> torch.device:
    """Where the float64 statistics live: the GPU when there is one (MPS has no float64)."""
    return device if device.type == "cuda" else torch.device("cpu")


_EXTRACTORS: dict[tuple, torch.nn.Module] = {}


def feature_extractor(weights_path: str | os.PathLike | None, device, precision: str = "fp32") -> torch.nn.Module:
    """torch-fidelity's Inception extractor for FID, built once per (device, weights content, precision) and
    kept; for bf16 a channels-last copy (the layout bf16 convolutions run fastest in on a GPU)."""
    if precision not in FID_PRECISIONS:
        raise ValueError(f"unknown Inception precision {precision!r}; choose one of {', '.join(FID_PRECISIONS)}")
    device = _device(device)
    key = (str(device), weights_fingerprint(weights_path), precision)
    extractor = _EXTRACTORS.get(key)
    if extractor is None and precision != "fp32":
        fp32 = feature_extractor(weights_path, device)
        import copy

        extractor = _EXTRACTORS[key] = copy.deepcopy(fp32).to(memory_format=torch.channels_last)
    if extractor is None:
        from torch_fidelity.utils import create_feature_extractor

        # downloads torch-fidelity's weights into the torch hub cache when no path is given
        extractor = create_feature_extractor(
            FEATURE_EXTRACTOR,
            [FEATURE_LAYER],
            cuda=False,
            verbose=False,
            feature_extractor_weights_path=None if weights_path is None else str(weights_path),
        ).to(device)
        _EXTRACTORS[key] = extractor
    return extractor


def _check_images(images_u8: torch.Tensor) -> None:
    if images_u8.dtype != torch.uint8 or images_u8.ndim != 4 or images_u8.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 [N, 1 or 3, H, W] images, got {images_u8.dtype} {tuple(images_u8.shape)}")


def inception_features(
    images_u8: torch.Tensor,
    *,
    weights_path=None,
    device="cpu",
    batch_size: int | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """Pool features [N, 2048] (float32, on `device`) of uint8 [N, 1 or 3, H, W] images. Batches are sliced
    from the tensor where it lies (no DataLoader); gray is repeated to RGB on the device. `precision`: fp32
    (the default: torch-fidelity's numbers) or bf16 (autocast, channels-last; faster on a GPU, an option until
    `bench --fid-precision-check` shows it moves FID by at most 0.05 on 10,000 images, docs/speed.md)."""
    _check_images(images_u8)
    device = _device(device)
    extractor = feature_extractor(weights_path, device, precision)
    batch_size = batch_size or default_batch_size(device)
    n = images_u8.shape[0]
    out = torch.empty((n, int(FEATURE_LAYER)), dtype=torch.float32, device=device)
    # fp32: full float32 even when called inside a sampler's bf16 autocast region, as torch-fidelity computes it
    bf16 = precision == "bf16"
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for i in range(0, n, batch_size):
            x = images_u8[i : i + batch_size].to(device, non_blocking=True)
            x = to_fid_rgb(x) if x.shape[1] == 1 else x
            if bf16:
                x = x.contiguous(memory_format=torch.channels_last)
            out[i : i + batch_size] = extractor(x)[0]
    return out


# -- the Fréchet distance ------------------------------------------------------------------------------


def _sqrt_psd(sigma: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a PSD matrix (rounding's tiny negative eigenvalues taken as 0)."""
    w, v = torch.linalg.eigh(sigma)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def trace_sqrt_product(
    sigma1: torch.Tensor, features2: torch.Tensor, sqrt_sigma1: torch.Tensor | None = None
) -> torch.Tensor:
    """tr sqrt(S1 S2), S2 the covariance of `features2` [n, d], exactly, from symmetric PSD matrices.

    S1 S2 is similar to S1^½ S2 S1^½ (PSD), so its eigenvalues are real and >= 0 and tr sqrt(S1 S2) is the
    sum of their square roots. With A the centered features2, S2 = AᵀA/(n-1); the non-zero eigenvalues of
    (S1Aᵀ)A equal those of A(S1Aᵀ) = A S1 Aᵀ, so for n < d the n×n matrix A S1 Aᵀ/(n-1) gives the trace
    exactly. For n >= d: B = A S1^½ and BᵀB/(n-1) = S1^½ S2 S1^½ (d×d). Pass `sqrt_sigma1` to reuse S1^½.
    torch-fidelity takes numpy.linalg.eigvals of the non-symmetric S1 S2 instead: the same value, slower.
    """
    n, d = features2.shape
    a = features2 - features2.mean(0)
    if n < d:
        m = a @ sigma1 @ a.T
        m = (m + m.T) / 2  # symmetric up to rounding
    else:
        b = a @ (_sqrt_psd(sigma1) if sqrt_sigma1 is None else sqrt_sigma1)
        m = b.T @ b
    eig = torch.linalg.eigvalsh(m / (n - 1))
    # A zero eigenvalue comes out of rounding as ±eps·|m|, and its square root would add sqrt(eps·|m|): below
    # numpy.linalg.matrix_rank's tolerance an eigenvalue counts as 0 (negative ones included).
    tol = eig.abs().max() * m.shape[0] * torch.finfo(eig.dtype).eps
    return torch.where(eig > tol, eig, 0).sqrt().sum()


def frechet_distance(
    mu1: torch.Tensor, sigma1: torch.Tensor, features2: torch.Tensor, *, sqrt_sigma1: torch.Tensor | None = None
) -> float:
    """FID = |mu1 - mu2|² + tr S1 + tr S2 - 2 tr sqrt(S1 S2) (torch-fidelity's fid_statistics_to_metric) of
    statistics (mu1, sigma1) against features [n, d], in float64 on sigma1's device."""
    f = features2.to(sigma1.device, torch.float64)
    mu2 = f.mean(0)
    trace2 = (f - mu2).square().sum() / (f.shape[0] - 1)
    return float((mu1 - mu2).square().sum() + sigma1.trace() + trace2 - 2 * trace_sqrt_product(sigma1, f, sqrt_sigma1))


# -- reference statistics ------------------------------------------------------------------------------


@dataclass
class _Stats:
    """Reference statistics, float64 on the math device."""

    mu: torch.Tensor
    sigma: torch.Tensor
    sqrt_sigma: torch.Tensor | None = None  # computed on first need (generated sets of >= 2048 images)
    features: torch.Tensor | None = None  # float32 on the CPU; only for KID


_REFERENCES: dict[tuple[str, str], _Stats] = {}


def _cache_root(cache_dir) -> Path:
    return Path(cache_dir or os.environ.get("MNIST_DIFF_FID_CACHE") or DEFAULT_CACHE_DIR)


def _reference_stats(reference: Reference, device: torch.device, cache_dir, *, features: bool = False) -> _Stats:
    """The reference's statistics (and features when asked), from memory, else torch-fidelity's cache files
    (`<name>-inception-v3-compat-stat-fid-2048.pt`, `...-features-2048.pt`), else computed and cached."""
    root = _cache_root(cache_dir)
    name = f"{reference.cache_name()}-{FEATURE_EXTRACTOR}"
    key = (str(root.resolve() / name), str(_math_device(device)))
    stats = _REFERENCES.get(key)
    if stats is not None and (stats.features is not None or not features):
        return stats
    from torch_fidelity.utils import (
        cache_lookup_group_recompute_all_on_any_miss,
        cache_lookup_one_recompute_on_miss,
    )

    root.mkdir(parents=True, exist_ok=True)
    lookup = dict(cache=True, cache_root=str(root), verbose=False)
    held = []  # the reference's features, extracted at most once

    def extract() -> torch.Tensor:
        if not held:
            log.info("computing FID reference statistics %s", reference.cache_name())
            held.append(
                inception_features(reference.images(device), weights_path=reference.weights_path, device=device)
            )
        return held[0]

    def moments() -> dict:
        f = extract().to(_math_device(device), torch.float64)
        mu = f.mean(0)
        a = f - mu
        # torch-fidelity's own entry format (numpy; mu float32, sigma float64), so the two can share entries
        return {"mu": mu.float().cpu().numpy(), "sigma": (a.T @ a / (f.shape[0] - 1)).cpu().numpy()}

    ref_features = None
    if features:
        ref_features = cache_lookup_group_recompute_all_on_any_miss(
            f"{name}-features-", [FEATURE_LAYER], lambda: {FEATURE_LAYER: extract().cpu()}, **lookup
        )[FEATURE_LAYER]
        held[:] = [ref_features]
    if stats is None:
        stat = cache_lookup_one_recompute_on_miss(f"{name}-stat-fid-{FEATURE_LAYER}", moments, **lookup)
        stats = _Stats(*(torch.as_tensor(stat[k]).to(_math_device(device), torch.float64) for k in ("mu", "sigma")))
        _REFERENCES[key] = stats
    if features:
        stats.features = ref_features
    return stats


def ensure_reference_stats(reference: Reference, *, device, cache_dir: str | os.PathLike | None = None) -> None:
    """Build the Inception extractor (downloading torch-fidelity's weights if no path is given) and compute,
    cache and keep the reference statistics, so that a study's first score pays for neither."""
    device = _device(device)
    feature_extractor(reference.weights_path, device)
    _reference_stats(reference, device, cache_dir)


def compute_fid(
    images_u8: torch.Tensor,
    reference: Reference,
    *,
    device="cpu",
    batch_size: int | None = None,
    kid: bool = False,
    cache_dir: str | os.PathLike | None = None,
    precision: str = "fp32",
) -> dict:
    """{'fid': ..., ['kid': ..., 'kid_std': ...], 'fid_seconds': ...} of the images against the reference.
    `batch_size`: images per Inception batch (default: `default_batch_size(device)`). `precision`: of the
    generated images' features (`inception_features`); the reference statistics are always fp32's."""
    _check_images(images_u8)
    if images_u8.shape[0] < 2:
        raise ValueError("FID needs at least 2 images")
    device = _device(device)
    t0 = time.perf_counter()
    stats = _reference_stats(reference, device, cache_dir, features=kid)
    features = inception_features(
        images_u8, weights_path=reference.weights_path, device=device, batch_size=batch_size, precision=precision
    )
    if features.shape[0] >= features.shape[1] and stats.sqrt_sigma is None:
        stats.sqrt_sigma = _sqrt_psd(stats.sigma)  # once per reference: the n >= d path needs S1^½
    out = {"fid": frechet_distance(stats.mu, stats.sigma, features, sqrt_sigma1=stats.sqrt_sigma)}
    if kid:
        from torch_fidelity.metric_kid import (
            KEY_METRIC_KID_MEAN,
            KEY_METRIC_KID_STD,
            kid_features_to_metric,
        )

        # torch-fidelity's own KID on the same features, with calculate_metrics' defaults (100 subsets, seed)
        n = min(features.shape[0], stats.features.shape[0])
        metrics = kid_features_to_metric(features.cpu(), stats.features, kid_subset_size=min(1000, n), verbose=False)
        out.update(kid=float(metrics[KEY_METRIC_KID_MEAN]), kid_std=float(metrics[KEY_METRIC_KID_STD]))
    out["fid_seconds"] = time.perf_counter() - t0
    return out
