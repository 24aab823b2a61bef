"""Mutual exclusion between processes, and between machines when they share a PostgreSQL storage.

`file_lock`: an fcntl lock on a file, for processes of one machine (or one local disk); `try_file_lock`: the
same without waiting, for a folder that one run owns (a second one is refused). `exclusive`: keyed by
name through the study's storage when it is PostgreSQL (a session advisory lock: every machine reaches the
same server, and the server releases it when the holder's connection goes, so a machine that dies holds
nothing), else a `file_lock` in the given folder (SQLite lives on one machine's disk anyway).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def file_lock(path: Path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Busy(RuntimeError):
    """Another process holds the lock; `pid` is its process id (None when it has not written it yet)."""

    def __init__(self, path: Path, pid: int | None):
        super().__init__(f"{path} is held by another process" + (f" (pid {pid})" if pid else ""))
        self.pid = pid


@contextmanager
def try_file_lock(path: Path):
    """Hold an fcntl lock on `path` while the block runs, with this process's id in the file; raise `Busy` at
    once if another process holds it. The kernel releases it when the holder dies, however it dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode(errors="replace").strip()
            raise Busy(path, int(text) if text.isdigit() else None) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def advisory_key(name: str) -> int:
    """A signed 64-bit key for pg_advisory_lock from any name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def is_postgres(storage_url: str) -> bool:
    return storage_url.startswith(("postgresql", "postgres://"))


@contextmanager
def exclusive(storage_url: str, name: str, lock_dir: Path):
    """Hold the lock called `name` while the block runs; wait for it first."""
    if not is_postgres(storage_url):
        with file_lock(Path(lock_dir) / (re.sub(r"[^A-Za-z0-9._-]+", "_", name) + ".lock")):
            yield
        return
    import sqlalchemy

    # Its own connection, held for the whole block, outside any pool: the lock lives exactly as long as it.
    engine = sqlalchemy.create_engine(storage_url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": advisory_key(name)})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": advisory_key(name)})
    finally:
        engine.dispose()
