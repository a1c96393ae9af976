"""File I/O shared by every stage. Atomic writes: write to a temporary file in the same directory, then rename;
the file gets the mode an ordinary ``open`` would give it under the user's umask (the temporary file is private
until renamed). Bounded reads: :func:`read_user_file` (checks, then :func:`read_at_most`) for every file a user
hands us; each reader words a :class:`FileProblem` in its own terms."""

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
    and checked again on the open descriptor; read in pieces of at most 1 MiB, so memory follows the file, not the
    limit; OSError (incl. :class:`NotRegularFile`) for the caller to word."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise NotRegularFile(f"'{path}' is not a regular file")
        pieces: list[bytes] = []
        total = 0
        while total <= limit:
            piece = fh.read(min(1 << 20, limit + 1 - total))
            if not piece:
                break
            pieces.append(piece)
            total += len(piece)
    return b"".join(pieces) if total <= limit else None


class FileProblem(Exception):
    """Why a file a user gave cannot be read, for the reader to word in its own terms.

    ``kind``: ``missing``, ``unreadable`` (``detail`` says why: permissions, a loop, a NUL in the name),
    ``directory``, ``special`` (a fifo, socket or device; ``mode`` its ``st_mode`` when known), ``too_large``
    (``size`` bytes, over ``limit``) or ``grew`` (past ``limit`` while it was read)."""

    def __init__(self, kind: str, path: str | os.PathLike, *, limit: int, size: int = 0, detail: str = "",
                 mode: int = 0):
        super().__init__(f"{kind}: {path}")
        self.kind, self.path, self.limit, self.size, self.detail, self.mode = kind, path, limit, size, detail, mode


def check_user_file(path: str | os.PathLike, limit: int) -> None:
    """Refuse, before opening it, a file a user gave that is missing, a directory, a special file or over
    ``limit`` bytes (:class:`FileProblem`)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileProblem("missing", path, limit=limit) from None
    except (OSError, ValueError) as exc:  # ValueError: an embedded NUL byte
        raise FileProblem("unreadable", path, limit=limit, detail=str(getattr(exc, "strerror", None) or exc)) \
            from None
    if stat.S_ISDIR(st.st_mode):
        raise FileProblem("directory", path, limit=limit)
    if not stat.S_ISREG(st.st_mode):
        raise FileProblem("special", path, limit=limit, mode=st.st_mode)
    if st.st_size > limit:
        raise FileProblem("too_large", path, limit=limit, size=st.st_size)


def read_user_file(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of a file a user gave: checked before opening (:func:`check_user_file`) and while reading (it
    changed into a special file or grew past ``limit``); every failure is a :class:`FileProblem`."""
    check_user_file(path, limit)
    try:
        data = read_at_most(path, limit)
    except NotRegularFile:
        raise FileProblem("special", path, limit=limit) from None
    except OSError as exc:
        raise FileProblem("unreadable", path, limit=limit, detail=str(exc.strerror or exc)) from None
    if data is None:
        raise FileProblem("grew", path, limit=limit)
    return data


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
