"""Directories written all at once: build in a temporary sibling, rename into place; nothing half-written.

The result gets the permissions of an ordinary ``mkdir``/``open`` under the user's umask (temporary files and
directories are created private, 0600/0700, and are opened up on success). A failed write (disk full, a
read-only directory, safetensors' own error type) is an :class:`ExportError` naming the path, and the
temporary directory is removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import ExportError, VlpetError
from ..io import current_umask


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a directory, everything under it) the modes ``mkdir``/``open`` would have given
    under the current umask: 0777 & ~umask for directories, 0666 & ~umask for files."""
    mask = current_umask()
    path = Path(path)
    entries = [path]
    if path.is_dir() and not path.is_symlink():
        entries += list(path.rglob("*"))
    for p in entries:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def write_reason(exc: BaseException) -> str:
    """One line saying why a write failed: the OS's words (e.g. "No space left on device") where there are."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__


def is_write_error(exc: BaseException) -> bool:
    """An OS error, or safetensors' own error type (it wraps the OS's error while serializing)."""
    return isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError"


def check_out_dir(out: str | Path) -> Path:
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise ExportError(f"output '{out}' is a broken symbolic link: remove it or choose a new directory")
    if out.exists() and not out.is_dir():
        raise ExportError(f"output '{out}' is a file, not a directory: choose a new directory")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"output directory '{out}' exists and is not empty: choose a new directory or empty it")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it becomes ``out`` (which must be new or empty)."""
    out = check_out_dir(out)
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        yield tmp
        apply_umask(tmp)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except VlpetError:
        _remove(tmp)
        raise
    except BaseException as exc:
        _remove(tmp)
        if is_write_error(exc):
            raise ExportError(f"cannot write '{out}': {write_reason(exc)}") from None
        raise


def _remove(tmp: Path | None) -> None:
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
