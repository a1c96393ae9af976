"""File I/O shared by every stage. Atomic writes: write to a temporary file in the same directory, then rename;
the file gets the mode an ordinary ``open`` would give it under the user's umask (the temporary file is private
until renamed). Bounded reads: :func:`read_at_most` for every file a user hands us."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process's umask (read from /proc where it is there, else set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class NotRegularFile(OSError):
    """The path turned out not to be a regular file when it was opened (it changed since it was checked)."""


def read_at_most(path: str | os.PathLike, limit: int) -> bytes | None:
    """The bytes of the regular file ``path`` if it holds at most ``limit`` of them, else ``None``.

    Opened without blocking (a path that became a fifo since the caller checked it does not wait for a writer)
    and checked again on the open descriptor; OSError (incl. :class:`NotRegularFile`) for the caller to word."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise NotRegularFile(f"'{path}' is not a regular file")
        data = fh.read(limit + 1)
    return data if len(data) <= limit else None


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    binary = isinstance(data, bytes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
