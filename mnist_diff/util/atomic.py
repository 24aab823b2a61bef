"""The one way files are written here: to a temporary file beside the target, fsynced, then renamed over it.
A crash at any moment leaves the old file or the new one, never a torn one. Standard library only, so every
module (bench included, which runs on torch alone) can use it."""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_TMP = re.compile(r"^\..+\.(\d+)-\d+\.tmp(\.[^.]*)?$")  # names `temporary_name` gives


def temporary_name(path: Path, pid: int | None = None) -> Path:
    """Where `atomic_path` writes `path` first: beside it, hidden, named after the writing process and thread
    (trials run at once in one process, `--trials-per-worker`)."""
    pid = os.getpid() if pid is None else pid
    return path.with_name(f".{path.stem}.{pid}-{threading.get_native_id()}.tmp{path.suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path to write the whole file to; when the block ends without error, the file is
    fsynced and renamed over `path` (and the rename made durable); otherwise it is removed. The temporary name
    keeps the suffix, so writers that add one (numpy's .npz) write where we look."""
    path = Path(path)
    tmp = temporary_name(path)
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


def remove_stale(folder: str | os.PathLike) -> None:
    """Delete the temporary files in `folder` that writers killed mid-write left (kill -9 skips the cleanup):
    those whose process is gone. A live process's file may be in the middle of its write, so it stays."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        m = _TMP.match(p.name)
        if m and not _alive(int(m.group(1))):
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
