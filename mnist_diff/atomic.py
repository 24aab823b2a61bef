"""The one way files are written here: to a temporary file beside the target, fsynced, then renamed over it.
A crash at any moment leaves the old file or the new one, never a torn one. Standard library only, so every
module (bench included, which runs on torch alone) can use it."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path to write the whole file to; when the block ends without error, the file is
    fsynced and renamed over `path` (and the rename made durable); otherwise it is removed. The temporary name
    keeps the suffix, so writers that add one (numpy's .npz) write where we look."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def write_json(path: str | os.PathLike, obj) -> Path:
    """`obj` as indented JSON (values JSON can't hold as their str()), written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str))
    return Path(path)
