"""MNIST through torchvision, held on the training device as one uint8 tensor."""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mnist_diff.util.atomic import atomic_path
from mnist_diff.util.paths import CACHE_ROOT

DEFAULT_DATA_DIR = CACHE_ROOT / "data"


def load_mnist(
    data_dir: str | os.PathLike | None, *, train: bool = True, limit: int | None = None, device="cpu"
) -> torch.Tensor:
    """MNIST images as uint8 [N, 1, 28, 28] on `device`. `data_dir` is a torchvision root; torchvision
    downloads into it on first use unless it already holds MNIST/raw."""
    from torchvision.datasets import MNIST

    root = Path(data_dir) if data_dir else DEFAULT_DATA_DIR
    images = MNIST(str(root), train=train, download=True).data  # uint8 [N, 28, 28]
    if limit is not None:
        images = images[:limit]
    return images.unsqueeze(1).contiguous().to(device)


@dataclass(frozen=True)
class DatasetRef:
    """Which images a run used, for its lineage: `mnist-<split>-<count>` and the sha256 of their uint8 bytes."""

    name: str
    sha256: str
    count: int
    source: str  # the torchvision root they were read from
    context: str  # what the run used them for: "training" or "fid_reference"


@functools.lru_cache(maxsize=8)
def _digest(root: str, train: bool, limit: int | None) -> tuple[str, int]:
    images = load_mnist(root, train=train, limit=limit)  # on the CPU: the bytes, wherever training runs
    return hashlib.sha256(images.numpy().tobytes()).hexdigest(), len(images)


def mnist_dataset(data_dir, *, train: bool, limit: int | None, context: str) -> DatasetRef:
    """The images `load_mnist(data_dir, train=train, limit=limit)` gives, as a `DatasetRef`; hashed once per
    process (every trial of a worker uses the same ones)."""
    root = str(Path(data_dir) if data_dir else DEFAULT_DATA_DIR)
    sha, count = _digest(root, train, limit)
    return DatasetRef(f"mnist-{'train' if train else 'test'}-{count}", sha, count, root, context)


MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)  # torchvision.datasets.MNIST.resources, extracted or as .gz


def check_mnist_root(data_dir: str | os.PathLike) -> None:
    """Raise ValueError unless the torchvision root `data_dir` holds MNIST (MNIST/raw, its files extracted or
    gzipped): a folder given for the data is read, never downloaded into (which fails offline)."""
    raw = Path(data_dir) / "MNIST" / "raw"
    missing = [n for n in MNIST_FILES if not (raw / n).is_file() and not (raw / f"{n}.gz").is_file()]
    if missing:
        raise ValueError(
            f"{data_dir} holds no MNIST: looked for {raw / missing[0]}[.gz] "
            f"({len(missing)} of {len(MNIST_FILES)} files missing)"
        )


def load_samples(path: str | os.PathLike) -> torch.Tensor:
    """The images of a samples.npz written by `sample`: uint8 [N, 1, 28, 28], N >= 2. ValueError, with a
    one-line reason, for anything else; nothing in the file is executed (no pickles)."""
    import numpy as np

    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError("an .npy array, not an .npz archive")
        with npz:
            images = npz["images"]
    except Exception as err:  # not numpy, no 'images', truncated, pickled objects
        raise ValueError(f"unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (1, 28, 28) or len(images) < 2:
        raise ValueError(
            f"expected at least 2 uint8 images [N, 1, 28, 28] (0..255, as `sample` writes), got "
            f"{images.dtype} {list(images.shape)}"
        )
    return torch.from_numpy(images)


def save_samples(images: torch.Tensor, out_dir: Path, config, seed: int, source) -> tuple[Path, Path]:
    """(samples.npz, samples.png) in `out_dir`: every image as uint8 with how it was sampled (what
    `load_samples` reads back), and a sheet of the first 100."""
    import math

    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    npz = out_dir / "samples.npz"
    with atomic_path(npz) as tmp:
        np.savez_compressed(
            tmp,
            images=images.cpu().numpy(),
            seed=seed,
            sampler=config.sampler,
            ddim_steps=config.ddim_steps,
            eta=config.eta,
            clip_x0=config.clip_x0,
            checkpoint=str(source),
        )
    shown = images[:100]
    return npz, save_sheet(shown, out_dir / "samples.png", nrow=math.ceil(math.sqrt(len(shown))))


def to_model_range(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images_u8.float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], rounded."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_fid_rgb(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 1, H, W] -> uint8 [N, 3, H, W], the gray channel repeated, as torch-fidelity wants."""
    return images_u8.expand(-1, 3, -1, -1)


def save_sheet(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8) -> Path:
    """Save images in [-1, 1] (or uint8) as one PNG grid; written atomically."""
    from PIL import Image
    from torchvision.utils import make_grid

    u8 = images if images.dtype == torch.uint8 else to_uint8(images)
    grid = make_grid(u8.cpu(), nrow=nrow, padding=2, pad_value=255)
    with atomic_path(path) as tmp:
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    return Path(path)
