"""Built-in models: a small registry ``name -> builder(size, device)`` (like timm's ``register_model``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import ModelSpecError

SIZES = ("tiny", "small", "base", "large")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    build: Callable[[str], nn.Module]
    description: str
    sizes: tuple[str, ...] = SIZES


_MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, description: str = "", sizes: tuple[str, ...] = SIZES):
    """Register ``fn(size) -> nn.Module`` as a built-in model called ``name``."""

    def deco(fn: Callable[[str], nn.Module]):
        _MODELS[name] = ModelEntry(name, fn, description or (fn.__doc__ or "").strip().splitlines()[0], sizes)
        return fn

    return deco


def list_models() -> list[ModelEntry]:
    return [_MODELS[k] for k in sorted(_MODELS)]


def build_model(name: str, size: str = "tiny", *, device: str | torch.device | None = None, seed: int = 0) -> nn.Module:
    """Build a built-in model with random weights (``device="meta"`` allocates no memory)."""
    entry = _MODELS.get(name)
    if entry is None:
        raise ModelSpecError(
            f"unknown built-in model '{name}': choose one of {', '.join(sorted(_MODELS))}, "
            "or give a local Hugging Face directory or package.module:factory"
        )
    if size not in entry.sizes:
        raise ModelSpecError(f"model '{name}' has no size '{size}': choose one of {', '.join(entry.sizes)}")
    torch.manual_seed(seed)
    with torch.device(device) if device is not None else _nullcontext():
        model = entry.build(size)
    return model.eval()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
