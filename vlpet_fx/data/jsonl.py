"""Users' own examples from a JSON-lines file.

One JSON object per line::

    {"images": ["cells/a.png", "/abs/b.png"], "input": "is this a bag?", "target": "yes", "task": "vqa"}

``images``, ``input`` and ``target`` are required (``target`` must not be blank); ``task`` is optional
(default ``"custom"``) and an optional ``meta`` object is merged into ``Example.meta``. Image paths are
relative to the JSONL file's folder. One-channel images load as uint8 (H, W), all others as RGB (H, W, 3).
Blank lines are ignored.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import DataError
from .tasks import Example

_REQUIRED = ("images", "input", "target")


class _RowError(Exception):
    pass


def _load_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise _RowError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert("L") if len(im.getbands()) == 1 else im.convert("RGB")
            return np.asarray(im, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise _RowError(f"unreadable image {path}: {e}") from None


def _parse_row(line: str, folder: Path, path: Path, lineno: int) -> Example:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise _RowError(f"bad JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(row, dict):
        raise _RowError(f"expected a JSON object, got {type(row).__name__}")
    for key in _REQUIRED:
        if key not in row:
            raise _RowError(f"missing key {key!r}")
    images, text, target = row["images"], row["input"], row["target"]
    task = row.get("task", "custom")
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not images or not all(isinstance(s, str) and s for s in images):
        raise _RowError("'images' must be a non-empty list of file paths")
    if not isinstance(text, str):
        raise _RowError("'input' must be a string")
    if not isinstance(target, str) or not target.strip():
        raise _RowError("empty target")
    if not isinstance(task, str) or not task:
        raise _RowError("'task' must be a non-empty string")
    extra = row.get("meta", {})
    if not isinstance(extra, dict):
        raise _RowError("'meta' must be a JSON object")
    files = [p if p.is_absolute() else folder / p for p in map(Path, images)]
    arrays = [_load_image(p) for p in files]
    meta = {**extra, "source": str(path), "line": lineno, "image_paths": [str(p) for p in files]}
    return Example(task, arrays, text, target, meta)


def load_jsonl(path, *, on_error: str = "stop") -> tuple[list[Example], list[str]]:
    """Read examples from ``path``. ``on_error="stop"`` raises :class:`DataError` ``"path:line: problem"``
    at the first bad row; ``"skip"`` drops bad rows and returns their ``"path:line: problem"`` strings."""
    if on_error not in ("stop", "skip"):
        raise DataError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"JSONL file {path} not found: check the path")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read as UTF-8 text ({e})") from None
    folder = path.resolve().parent
    examples: list[Example] = []
    problems: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            examples.append(_parse_row(line, folder, path, lineno))
        except _RowError as e:
            msg = f"{path}:{lineno}: {e}"
            if on_error == "stop":
                raise DataError(msg) from None
            problems.append(msg)
    if not examples:
        why = f" ({len(problems)} bad rows, first: {problems[0]})" if problems else ""
        raise DataError(f"{path}: no usable rows{why}")
    return examples, problems
