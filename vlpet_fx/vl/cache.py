"""Visual features computed once: the image encoder is frozen, so its output for an image never changes.

Features are keyed by the image's content (sha256 of its bytes and shape) and stored per encoder identity
(a checksum of the encoder's weights and the input size) in one safetensors file, written atomically.
Training from the cache gives the same result as computing features on the fly (tests/test_vl.py).

The cache file is not trusted: one that cannot be read, or whose entries are not finite float32 features of the
encoder's shape under sha256 keys, is set aside with a warning and the features are computed again; a cache
that cannot be written is a :class:`FeatureCacheError` naming the path.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from ..errors import VlpetError
from ..export.fingerprint import frozen_weights_checksum
from ..io import write_atomic
from .model import VLModel, to_pixels


_KEY = re.compile(r"^[0-9a-f]{64}$")
MAX_CACHE_BYTES = 16 * 2**30


class FeatureCacheError(VlpetError):
    """The feature cache cannot be written."""


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def image_key(image: np.ndarray) -> str:
    a = np.ascontiguousarray(image)
    h = hashlib.sha256(str((a.shape, str(a.dtype))).encode())
    h.update(a.tobytes())
    return h.hexdigest()


def encoder_id(model: VLModel) -> str:
    return hashlib.sha256(
        (frozen_weights_checksum(model.visual, set()) + f":{model.image_size}").encode()).hexdigest()[:24]


class FeatureCache:
    """``features(images) -> (N, T, F)`` for a list of uint8 images, computing only what is not cached."""

    def __init__(self, model: VLModel, root: str | Path | None = None, batch_size: int = 256):
        self.model = model
        self.batch_size = batch_size
        self.path = Path(root) / encoder_id(model) / "features.safetensors" if root is not None else None
        self.table: dict[str, torch.Tensor] = {}
        if self.path is not None and (self.path.exists() or self.path.is_symlink()):
            self.table = self._read()
        self.computed = 0

    def _read(self) -> dict[str, torch.Tensor]:
        """The cached features, or ``{}`` (with a warning) if the file is damaged or does not fit the encoder."""
        path = self.path
        try:
            if not path.is_file():
                raise ValueError("not a regular file")
            if path.stat().st_size > MAX_CACHE_BYTES:
                raise ValueError(f"larger than {MAX_CACHE_BYTES:,} bytes")
            table = load_file(str(path))
        except Exception as exc:  # OSError, ValueError, safetensors' own error type
            _warn(f"feature cache '{path}' cannot be read ({' '.join(str(exc).split())[:200]}); computing the "
                  "features again")
            return {}
        if table:
            expected = tuple(self._compute([np.zeros((8, 8), dtype=np.uint8)])[0].shape)
            for k, t in table.items():
                if (not _KEY.match(k) or t.dtype != torch.float32 or tuple(t.shape) != expected
                        or not torch.isfinite(t).all()):
                    _warn(f"feature cache '{path}' holds an entry that is not a feature of this image encoder "
                          f"({k[:16]}...: {str(t.dtype).replace('torch.', '')} {tuple(t.shape)}); computing the "
                          "features again")
                    return {}
        return table

    @torch.no_grad()
    def _compute(self, images: list[np.ndarray]) -> torch.Tensor:
        """The frozen image encoder's features, in eval mode whatever mode the caller left it in (a batch norm or
        dropout in training mode would cache other values under the same image key); its mode is restored."""
        visual = self.model.visual
        dev = next(visual.parameters()).device
        modes = {m: m.training for m in visual.modules()}
        visual.eval()
        out = []
        try:
            for i in range(0, len(images), self.batch_size):
                pix = to_pixels(images[i:i + self.batch_size], self.model.image_size, dev).unsqueeze(1)
                out.append(self.model.encode_images(pix).float().cpu())
        finally:
            for m, training in modes.items():
                m.training = training
        return torch.cat(out)

    def features(self, images: list[np.ndarray]) -> torch.Tensor:
        keys = [image_key(im) for im in images]
        missing = {k: im for k, im in zip(keys, images) if k not in self.table}
        if missing:
            feats = self._compute(list(missing.values()))
            for k, f in zip(missing, feats):
                self.table[k] = f.contiguous()
            self.computed += len(missing)
            if self.path is not None:
                try:
                    write_atomic(self.path, save(self.table))
                except OSError as exc:
                    raise FeatureCacheError(f"cannot write the feature cache '{self.path}': "
                                            f"{exc.strerror or exc}; choose another --feature-cache") from None
        return torch.stack([self.table[k] for k in keys])
