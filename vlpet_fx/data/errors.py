"""Error type of the data package."""

from __future__ import annotations

from ..errors import VlpetError


class DataError(VlpetError):
    """A data source, task or user data file cannot be loaded (the message names the fix)."""
