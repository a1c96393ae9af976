"""Visual features computed once: the image encoder is frozen, so its output for an image never changes.

Features are keyed by the image's content (sha256 of its bytes and shape) and stored per encoder identity
(a checksum of the encoder's weights and the input size) in one safetensors file, written atomically.
Training from the cache gives the same result as computing features on the fly (tests/test_vl.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from ..export.fingerprint import frozen_weights_checksum
from ..io import write_atomic
from .model import VLModel, to_pixels


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
        if self.path is not None and self.path.is_file():
            self.table = load_file(str(self.path))
        self.computed = 0

    @torch.no_grad()
    def _compute(self, images: list[np.ndarray]) -> torch.Tensor:
        dev = next(self.model.visual.parameters()).device
        out = []
        for i in range(0, len(images), self.batch_size):
            pix = to_pixels(images[i:i + self.batch_size], self.model.image_size, dev).unsqueeze(1)
            out.append(self.model.encode_images(pix).float().cpu())
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
                write_atomic(self.path, save(self.table))
        return torch.stack([self.table[k] for k in keys])
