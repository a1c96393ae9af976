"""Turn a model specification into an ``nn.Module``: a built-in name, a local HF directory, or
``package.module:factory``."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelSpecError
from .registry import _MODELS, build_model


def _load_hf_dir(path: Path, *, weights: bool, device: str | None) -> nn.Module:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelSpecError(
            f"directory '{path}' has no config.json: give a directory written by save_pretrained(), "
            "a built-in model name, or package.module:factory"
        )
    try:
        json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelSpecError(f"cannot read '{cfg_file}': {exc} -- rewrite it with save_pretrained()") from exc
    import transformers as tf

    try:  # local_files_only: nothing is fetched, whatever HF_HUB_OFFLINE says
        config = tf.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises ValueError/KeyError/OSError for unknown or broken configs
        raise ModelSpecError(f"cannot load the config in '{path}': {str(exc).splitlines()[0]}") from exc
    auto = tf.AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else tf.AutoModel
    try:
        if not weights:
            with torch.device(device or "meta"):
                return auto.from_config(config).eval()
        model = auto.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise ModelSpecError(f"cannot load the model in '{path}': {str(exc).splitlines()[0]}") from exc
    return model.to(device).eval() if device else model.eval()


def _load_factory(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ModelSpecError(f"cannot import '{module_name}' for model '{spec}': {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None:
        raise ModelSpecError(f"module '{module_name}' has no attribute '{attr}' (model '{spec}')")
    model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"'{spec}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_model(spec: str, size: str = "tiny", *, weights: bool = True, device: str | None = None,
               seed: int = 0) -> tuple[nn.Module, str]:
    """Resolve ``spec`` and return ``(model, display name)``.

    With ``weights=False`` built-in and directory models are built on the ``meta`` device (structure and
    shapes only, no memory), which is all that ``inspect`` needs.
    """
    if spec in _MODELS:
        dev = device if weights else "meta"
        return build_model(spec, size, device=dev, seed=seed), f"{spec} ({size})"
    path = Path(spec)
    if path.exists():
        if path.is_dir():
            return _load_hf_dir(path, weights=weights, device=device), str(path)
        if not os.access(path, os.R_OK):
            raise ModelSpecError(f"cannot read '{path}': permission denied")
        raise ModelSpecError(f"'{path}' is a file: give the directory that holds config.json and the weights")
    if ":" in spec and not spec.startswith((".", "/")):
        return _load_factory(spec), spec
    raise ModelSpecError(
        f"unknown model '{spec}': not a built-in ({', '.join(sorted(_MODELS))}), "
        "not an existing directory, and not package.module:factory"
    )


def base_reference(spec: str, size: str = "tiny", seed: int = 0) -> dict:
    """How a patched-model directory refers to its base model (re-buildable with :func:`load_model`)."""
    if spec in _MODELS:
        return {"kind": "builtin", "spec": spec, "size": size, "seed": seed}
    path = Path(spec)
    if path.exists():
        return {"kind": "directory", "spec": str(path.resolve())}
    return {"kind": "factory", "spec": spec}
