"""A base model's fingerprint: a hash of its configuration and a checksum of its frozen weights.

Adapters are only valid on the base model they were trained on; ``load`` compares fingerprints and says what
differs. Parameters that train (PET modules, and existing ones the rules unfroze) are left out of the weight
checksum, since training changes them.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

_VOLATILE = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures", "_commit_hash",
             "_attn_implementation_autoset", "_attn_implementation_internal", "output_attentions"}


def _rate(key: str) -> bool:
    """A training-time rate in a config (dropout of any kind, LayerDrop): it changes no weight and nothing the
    model computes in eval mode, and a training recipe may set it (the paper's dropout 0.1 for BART)."""
    key = key.lower()
    return "dropout" in key or "layerdrop" in key


def config_hash(model: nn.Module, skip: set[str] = frozenset(), *, rates: bool = False) -> str:
    """Hash of ``model``'s config without volatile entries and, unless ``rates``, without training-time rates."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        def kept(d: dict) -> dict:
            return {k: v for k, v in d.items() if k not in _VOLATILE and (rates or not _rate(k))}

        doc = kept(cfg.to_dict())
        for sub in ("encoder", "decoder"):
            if isinstance(doc.get(sub), dict):
                doc[sub] = kept(doc[sub])
    else:  # not a Hugging Face model: its structure (parameter names, shapes, dtypes) stands for the config
        doc = [(n, list(p.shape), str(p.dtype)) for n, p in model.named_parameters() if n not in skip]
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def frozen_weights_checksum(model: nn.Module, skip: set[str]) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name in skip:
            continue
        t = p.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint(model: nn.Module, trainable: set[str]) -> dict:
    """``trainable``: parameter names to leave out of the checksum."""
    return {"config_sha256": config_hash(model, trainable),
            "frozen_weights_sha256": frozen_weights_checksum(model, trainable)}


def describe_mismatch(saved: dict, model: nn.Module, trainable: set[str]) -> str | None:
    """What differs between the fingerprint ``saved`` with the adapters and ``model`` (None: nothing). A config
    hash with the training-time rates in it (manifests written before they were left out) matches too."""
    if saved.get("config_sha256") not in (config_hash(model, trainable), config_hash(model, trainable, rates=True)):
        return "the base model's configuration differs from the one the adapters were made for"
    if saved.get("frozen_weights_sha256") != frozen_weights_checksum(model, trainable):
        return "the base model's frozen weights differ from the ones the adapters were made for"
    return None
