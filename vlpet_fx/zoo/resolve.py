"""Turn a model specification into an ``nn.Module``: a built-in name, a local HF directory, or
``package.module:factory``."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelSpecError
from .registry import _MODELS, build_model


def unpickling_refusal(exc: BaseException, what: str, fix: str) -> str | None:
    """One line for torch's restricted unpickler refusing a file (instead of torch's advice to set
    ``weights_only=False``, which would let the file run code); None for other errors."""
    text = str(exc)
    if "allowed global" in text or "Unsupported global" in text:
        return f"{what} holds pickled Python objects besides tensors, which vlpet-fx never unpickles: {fix}"
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
        return f"{what} cannot be read as a tensor checkpoint (damaged, or not a torch or safetensors file): {fix}"
    return None


def _load_hf_dir(path: Path, *, weights: bool, device: str | None) -> nn.Module:
    """A save_pretrained() directory. Its code is never run (trust_remote_code stays off); weights are read by
    transformers through safetensors or torch.load(weights_only=True)."""
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
        config = tf.AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises ValueError/KeyError/OSError for unknown or broken configs
        raise ModelSpecError(f"cannot load the config in '{path}': {str(exc).splitlines()[0]}") from exc
    from .hf_auto import auto_class_for

    auto = auto_class_for(config)
    try:
        if not weights:
            with torch.device(device or "meta"):
                return auto.from_config(config).eval()
        model = auto.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        refusal = unpickling_refusal(exc, f"the weights file in '{path}'", "save the model with save_pretrained() as "
                                     "model.safetensors")
        if refusal:
            raise ModelSpecError(refusal) from None
        raise ModelSpecError(f"cannot load the model in '{path}': {str(exc).splitlines()[0]}") from None
    return model.to(device).eval() if device else model.eval()


def load_factory(spec: str) -> nn.Module:
    """Import ``package.module`` and call its ``factory`` (no arguments). Only for a spec the user typed (the
    command line, a Python call) or a manifest the caller chose to trust: importing a module runs its code."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelSpecError(f"'{spec}' is not package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except SystemExit:
        raise ModelSpecError(f"importing '{module_name}' for model '{spec}' called sys.exit()") from None
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise ModelSpecError(f"cannot import '{module_name}' for model '{spec}': {type(exc).__name__}: "
                             f"{first}") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ModelSpecError(f"module '{module_name}' has no attribute '{attr}' (model '{spec}')")
    if isinstance(factory, nn.Module):
        return factory
    if not callable(factory):
        raise ModelSpecError(f"'{spec}' is a {type(factory).__name__}, not a function returning a torch.nn.Module")
    if inspect.isbuiltin(factory):  # os.abort, sys.exit, ...: never a model factory
        raise ModelSpecError(f"'{spec}' is a built-in function, not a model factory: give a Python function that "
                             "returns a torch.nn.Module")
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        needed = [p.name for p in sig.parameters.values()
                  if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if needed:
            raise ModelSpecError(f"factory '{spec}' needs arguments ({', '.join(needed)}): give a function that "
                                 "takes none (wrap it: def make(): return " f"{attr}(...))")
    try:
        model = factory()
    except SystemExit:
        raise ModelSpecError(f"factory '{spec}' called sys.exit() instead of returning a model") from None
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise ModelSpecError(f"factory '{spec}' raised {type(exc).__name__}: {first}") from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"'{spec}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


_load_factory = load_factory


def load_model(spec: str, size: str = "tiny", *, weights: bool = True, device: str | None = None,
               seed: int = 0, allow_factory: bool = True) -> tuple[nn.Module, str]:
    """Resolve ``spec`` and return ``(model, display name)``.

    ``allow_factory=False`` refuses a ``module:factory`` spec instead of importing it (a spec read from a file).

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
        if not allow_factory:
            raise ModelSpecError(f"'{spec}' names code (module:factory) and was not typed by the user: pass the "
                                 "model yourself, or opt in with trust_code=True (--trust-factory)")
        return load_factory(spec), spec
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
