"""Example inputs for capture: a small registry of builders, first match wins.

A builder gets the model and returns ``(args, kwargs)`` on the model's device, or ``None`` when it does
not apply. Users add builders for their own model families with :func:`register_example_inputs`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

Builder = Callable[[nn.Module], "tuple[tuple, dict] | None"]
_BUILDERS: list[tuple[str, Builder]] = []

BATCH = 2
SOURCE_LEN = 8
TARGET_LEN = 4


def register_example_inputs(name: str, *, first: bool = True) -> Callable[[Builder], Builder]:
    """Register a builder of example inputs; user builders go before the built-in ones."""

    def deco(fn: Builder) -> Builder:
        entry = (name, fn)
        _BUILDERS.insert(0, entry) if first else _BUILDERS.append(entry)
        return fn

    return deco


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, (p.dtype if p.dtype.is_floating_point else torch.float32)
    return torch.device("cpu"), torch.float32


def _token_ids(n_vocab: int, shape: tuple[int, int], device: torch.device, offset: int = 0) -> torch.Tensor:
    # Deterministic ids away from the usual special tokens (0..3), inside the vocabulary.
    low = 4 if n_vocab > 8 else 0
    span = max(1, n_vocab - low)
    ids = (torch.arange(shape[0] * shape[1]) * 7 + offset) % span + low
    return ids.view(shape).to(device)


def normalise(example_inputs: Any) -> tuple[tuple, dict]:
    """Accept a tensor, a tuple/list of positional args, a dict of kwargs or an ``(args, kwargs)`` pair."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if (
        isinstance(example_inputs, (tuple, list))
        and len(example_inputs) == 2
        and isinstance(example_inputs[0], (tuple, list))
        and isinstance(example_inputs[1], dict)
    ):
        return tuple(example_inputs[0]), dict(example_inputs[1])
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(
        f"example_inputs must be a tensor, a tuple of args, a dict of kwargs or (args, kwargs); "
        f"got {type(example_inputs).__name__}"
    )


def build_example_inputs(model: nn.Module) -> tuple[str, tuple, dict] | None:
    """Return ``(builder name, args, kwargs)`` from the first builder that accepts the model."""
    for name, fn in _BUILDERS:
        out = fn(model)
        if out is not None:
            return name, out[0], out[1]
    return None


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "get_input_embeddings")


@register_example_inputs("hf-seq2seq", first=False)
def _hf_seq2seq(model: nn.Module):
    if not (_is_hf(model) and getattr(model.config, "is_encoder_decoder", False)):
        return None
    device, _ = _device_dtype(model)
    n_src = model.get_input_embeddings().num_embeddings
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    emb = dec.get_input_embeddings() if dec is not None and hasattr(dec, "get_input_embeddings") else None
    n_tgt = emb.num_embeddings if emb is not None else n_src
    ids = _token_ids(n_src, (BATCH, SOURCE_LEN), device)
    kwargs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        decoder_input_ids=_token_ids(n_tgt, (BATCH, TARGET_LEN), device, offset=3),
        use_cache=False,
    )
    return (), kwargs


@register_example_inputs("hf-encoder", first=False)
def _hf_encoder(model: nn.Module):
    if not _is_hf(model) or getattr(model.config, "is_encoder_decoder", False):
        return None
    emb = model.get_input_embeddings()
    if not isinstance(emb, nn.Embedding):
        return None
    device, _ = _device_dtype(model)
    ids = _token_ids(emb.num_embeddings, (BATCH, SOURCE_LEN), device)
    return (), dict(input_ids=ids, attention_mask=torch.ones_like(ids))


@register_example_inputs("image-tower", first=False)
def _image_tower(model: nn.Module):
    size = getattr(model, "image_size", None)
    if size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    device, dtype = _device_dtype(model)
    channels = getattr(model, "in_chans", 3)
    return (torch.randn(1, channels, h, w, generator=torch.Generator().manual_seed(0)).to(device, dtype),), {}


@register_example_inputs("torch-transformer", first=False)
def _torch_transformer(model: nn.Module):
    if not isinstance(model, nn.Transformer):
        return None
    device, dtype = _device_dtype(model)
    batch_first = getattr(model, "batch_first", False)
    g = torch.Generator().manual_seed(0)

    def seq(n: int) -> torch.Tensor:
        shape = (BATCH, n, model.d_model) if batch_first else (n, BATCH, model.d_model)
        return torch.randn(*shape, generator=g).to(device, dtype)

    return (seq(SOURCE_LEN), seq(TARGET_LEN)), {}


@register_example_inputs("own-method", first=True)  # a module's own declaration wins
def _own_method(model: nn.Module):
    """A module can say how to call it: ``model.example_inputs()`` returning args, kwargs or (args, kwargs).

    This is how ``package.module:factory`` models give inputs to the CLI.
    """
    fn = getattr(type(model), "example_inputs", None)
    if not callable(fn):
        return None
    return normalise(model.example_inputs())
