"""Showing text that came from a file inside a one-line error message."""

from __future__ import annotations


def shown(value: object, limit: int = 80) -> str:
    """``value`` as it may appear inside a one-line message: control characters escaped, cut to ``limit``."""
    text = value if isinstance(value, str) else repr(value)
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return out if len(out) <= limit else out[: limit - 1] + "…"
