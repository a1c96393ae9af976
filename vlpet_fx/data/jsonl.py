"""Users' own examples from a JSON-lines file.

One JSON object per line::

    {"images": ["cells/a.png", "/abs/b.png"], "input": "is this a bag?", "target": "yes", "task": "vqa"}

``images``, ``input`` and ``target`` are required (``target`` must be a non-blank string); ``task`` is optional
(default ``"custom"``) and an optional ``meta`` object is merged into ``Example.meta``. Image paths are
relative to the JSONL file's folder. Images of any size, mode and bit depth are accepted (16-bit, palette,
1-bit, CMYK, with alpha, ...): one-band images load as uint8 (H, W), all others as RGB (H, W, 3), and the model
resizes every image on its own (see :func:`vlpet_fx.data.images.to_uint8`). Blank lines are ignored.

Nothing in the file is trusted: the file, every line, every text, the number of rows and of images per row and
every image (bytes and the pixel count its header claims, checked before decoding) have the limits below;
going over one is a :class:`DataError` naming the limit.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..io import FileProblem, read_user_file
from .errors import DataError
from .images import data_file_line, read_image
from .tasks import Example

_REQUIRED = ("images", "input", "target")
MAX_FILE_BYTES = 256 * 2**20
MAX_LINE_CHARS = 1_000_000
MAX_ROWS = 1_000_000
MAX_TEXT_CHARS = 4_000  # 'input' and 'target'
MAX_TASK_CHARS = 64
MAX_IMAGES_PER_ROW = 32
MAX_PATH_CHARS = 4_096


class _RowError(Exception):
    pass


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _text(row: dict, key: str, limit: int) -> str:
    value = row[key]
    if not isinstance(value, str):
        hint = f' (write it in quotes: "{value}")' if _kind(value) == "a number" else ""
        raise _RowError(f"'{key}' must be a string, got {_kind(value)}{hint}")
    if len(value) > limit:
        raise _RowError(f"'{key}' is {len(value):,} characters long, over the limit of {limit:,}: shorten it")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _RowError(f"'{key}' holds an invalid character (a lone surrogate escape such as \\ud800)") from None
    return value


def _parse_row(line: str, folder: Path, path: Path, lineno: int) -> Example:
    if len(line) > MAX_LINE_CHARS:
        raise _RowError(f"line is {len(line):,} characters long, over the limit of {MAX_LINE_CHARS:,}")
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise _RowError(f"bad JSON: {e.msg} (column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # a number of more than 4300 digits; nesting too deep
        raise _RowError(f"bad JSON: {' '.join(str(e).split())[:200] or 'nested too deeply'}") from None
    if not isinstance(row, dict):
        raise _RowError(f"expected a JSON object, got {_kind(row)}")
    for key in _REQUIRED:
        if key not in row:
            raise _RowError(f"missing key {key!r}")
    images = row["images"]
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not images or not all(isinstance(s, str) and s for s in images):
        raise _RowError("'images' must be a non-empty list of file paths")
    if len(images) > MAX_IMAGES_PER_ROW:
        raise _RowError(f"{len(images)} images in one row, over the limit of {MAX_IMAGES_PER_ROW}")
    for s in images:
        if len(s) > MAX_PATH_CHARS or "\x00" in s:
            raise _RowError("an image path is longer than 4096 characters or holds a NUL character")
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise _RowError("an image path holds an invalid character (a lone surrogate escape)") from None
    text = _text(row, "input", MAX_TEXT_CHARS)
    target = _text(row, "target", MAX_TEXT_CHARS)
    if not target.strip():
        raise _RowError("empty target: give the expected answer")
    task = _text({"task": row.get("task", "custom")}, "task", MAX_TASK_CHARS)
    if not task.strip():
        raise _RowError("'task' must be a non-empty string")
    extra = row.get("meta", {})
    if not isinstance(extra, dict):
        raise _RowError(f"'meta' must be a JSON object, got {_kind(extra)}")
    files = [p if p.is_absolute() else folder / p for p in map(Path, images)]
    arrays = []
    for p in files:
        try:
            arrays.append(read_image(p))
        except DataError as e:
            raise _RowError(str(e)) from None
    meta = {**extra, "source": str(path), "line": lineno, "image_paths": [str(p) for p in files]}
    return Example(task, arrays, text, target, meta)


def load_jsonl(path, *, on_error: str = "stop") -> tuple[list[Example], list[str]]:
    """Read examples from ``path``. ``on_error="stop"`` raises :class:`DataError` ``"path:line: problem"``
    at the first bad row; ``"skip"`` drops bad rows and returns their ``"path:line: problem"`` strings."""
    if on_error not in ("stop", "skip"):
        raise DataError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
    path = Path(path)
    try:
        raw = read_user_file(path, MAX_FILE_BYTES)
    except FileProblem as p:
        raise DataError(f"JSONL file {data_file_line(p)}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"JSONL file '{path}' is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    folder = path.resolve().parent
    examples: list[Example] = []
    problems: list[str] = []
    rows = 0
    # split on "\n" only: str.splitlines would also cut at U+2028, U+0085, ... which JSON strings may hold
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        rows += 1
        if rows > MAX_ROWS:
            raise DataError(f"JSONL file '{path}' has more than {MAX_ROWS:,} rows: split it")
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
