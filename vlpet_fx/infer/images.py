"""Images for answering: from files, from uploaded bytes (bounded), or arrays already in memory."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..data.errors import DataError

#: Largest image accepted by default (pixels, width × height): bigger ones are refused before decoding.
MAX_PIXELS = 4096 * 4096


def _to_array(im) -> np.ndarray:
    im = im.convert("L") if len(im.getbands()) == 1 else im.convert("RGB")
    return np.asarray(im, dtype=np.uint8).copy()


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS, name: str = "image") -> np.ndarray:
    """PNG/JPEG/... bytes → uint8 (H, W) or (H, W, 3). Refuses undecodable data and images above ``max_pixels``
    (checked from the header, before the pixels are decoded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise DataError(f"{name} is {w}×{h} pixels, more than the limit of {max_pixels:,}: send a smaller "
                                "image")
            im.load()
            return _to_array(im)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{name} cannot be decoded as an image ({type(exc).__name__}): send PNG or JPEG "
                        "bytes") from None


def read_image(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc.strerror or exc}") from None
    return decode_image(data, max_pixels=max_pixels, name=str(path))


def as_image(item) -> np.ndarray:
    """A path, a PIL image or a uint8 array (H, W) / (H, W, 3) → a uint8 array."""
    if isinstance(item, (str, Path)):
        return read_image(item)
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim not in (2, 3) or (item.ndim == 3 and item.shape[2] not in (1, 3, 4)):
            raise DataError(f"an image array must be uint8 (H, W) or (H, W, 3), got {item.dtype} {item.shape}")
        return item[..., :3] if item.ndim == 3 and item.shape[2] == 4 else item
    if hasattr(item, "getbands"):  # PIL.Image.Image
        return _to_array(item)
    raise DataError(f"cannot use a {type(item).__name__} as an image: give a file path, a PIL image or a uint8 array")
