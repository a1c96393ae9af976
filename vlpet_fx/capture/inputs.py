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
        try:
            out = fn(model)
        except Exception as exc:  # noqa: BLE001 -- one line naming the builder and the cause, never a traceback
            from ..errors import CaptureError

            first = next((t.strip() for t in str(exc).splitlines() if t.strip()), "")[:160]
            raise CaptureError(
                f"the example-input builder '{name}' failed for {type(model).__name__}: {type(exc).__name__}: "
                f"{first} -- fix: pass example_inputs= (args or a dict of keyword arguments) yourself"
            ) from exc
        if out is not None:
            return name, out[0], out[1]
    return None


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "get_input_embeddings")


def _forward_params(model: nn.Module) -> tuple[set[str], bool]:
    """The names ``model.forward`` accepts, and whether it takes ``**kwargs``."""
    import inspect

    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return set(), True
    names = {n for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return names, any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def _configs(config) -> list:
    """A config and its sub-configs (text/vision/audio/encoder/decoder), outermost first."""
    out, todo = [], [config]
    while todo:
        c = todo.pop(0)
        if c is None or any(c is o for o in out):
            continue
        out.append(c)
        todo.extend(v for v in vars(c).values() if hasattr(v, "to_dict") and hasattr(v, "model_type"))
    return out


def _find(config, *names: str, where: str | None = None):
    """The first integer setting called one of ``names`` in ``config`` (or its ``where`` sub-config) and below."""
    start = getattr(config, where, None) if where else config
    for c in _configs(start) if start is not None else []:
        for n in names:
            v = getattr(c, n, None)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None


def _special_ids(config) -> set[int]:
    ids: set[int] = set()
    for c in _configs(config):
        for k, v in vars(c).items():
            if k.endswith(("_token_id", "_token_index")) and isinstance(v, int) and not isinstance(v, bool):
                ids.add(v)
            elif k.endswith("_token_ids") and isinstance(v, (list, tuple)):
                ids.update(x for x in v if isinstance(x, int))
    return ids


def _text_ids(n_vocab: int, shape: tuple[int, int], device, avoid: set[int], offset: int = 0) -> torch.Tensor:
    """Ordinary token ids: deterministic, inside the vocabulary, none of the config's special tokens."""
    pool = [i for i in range(4 if n_vocab > 8 else 0, n_vocab) if i not in avoid][: 4096] or [0]
    flat = [pool[(k * 7 + offset) % len(pool)] for k in range(shape[0] * shape[1])]
    return torch.tensor(flat, dtype=torch.long).view(shape).to(device)


def _rows_per_image(features, n_images: int) -> int | None:
    """How many embeddings one image becomes (from ``get_image_features``' output)."""
    if hasattr(features, "pooler_output") and features.pooler_output is not None:
        features = features.pooler_output
    elif hasattr(features, "last_hidden_state"):
        features = features.last_hidden_state
    if isinstance(features, (list, tuple)):
        first = features[0] if features else None
        return int(first.shape[-2]) if isinstance(first, torch.Tensor) and first.dim() >= 2 else None
    if isinstance(features, torch.Tensor):
        if features.dim() >= 3:
            return int(features.shape[-2])
        if features.dim() == 2 and features.shape[0] % n_images == 0:
            return int(features.shape[0]) // n_images
    return None


def _image_inputs(model: nn.Module, params: set[str], device, dtype) -> tuple[dict, int] | None:
    """``pixel_values`` (and the grid/mask inputs the forward asks for) and the number of image tokens per image.

    The pixel layout is the first that the model's own ``get_image_features`` accepts: (B, C, H, W),
    (B, 1, C, H, W), or flattened patches with a (t, h, w) grid when the forward takes ``image_grid_thw``.
    """
    cfg = model.config
    size = _find(cfg, "image_size", where="vision_config") or 224
    size = size if isinstance(size, int) else int(size[0])
    channels = _find(cfg, "num_channels", "in_channels", "in_chans", where="vision_config") or 3
    g = torch.Generator().manual_seed(0)
    n = BATCH
    candidates: list[dict] = []
    if "image_grid_thw" in params:
        patch = _find(cfg, "patch_size", where="vision_config") or 14
        merge = _find(cfg, "spatial_merge_size", "merge_size", where="vision_config") or 1
        temporal = _find(cfg, "temporal_patch_size", where="vision_config") or 1
        side = 2 * merge
        candidates.append(dict(
            pixel_values=torch.randn(n * side * side, channels * temporal * patch * patch, generator=g),
            image_grid_thw=torch.tensor([[1, side, side]] * n)))
    candidates.append(dict(pixel_values=torch.randn(n, channels, size, size, generator=g)))
    candidates.append(dict(pixel_values=torch.randn(n, 1, channels, size, size, generator=g)))
    get = getattr(model, "get_image_features", None)
    for cand in candidates:
        cand = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in cand.items()}
        if not callable(get):
            return cand, 0
        try:
            with torch.no_grad():
                feats = get(**cand)
        except Exception:  # noqa: BLE001 -- a layout the model does not take: try the next one
            continue
        rows = _rows_per_image(feats, n)
        if rows:
            return cand, rows
    return None


def _rows_from(get, inputs: dict) -> int | None:
    """Embeddings per example that ``get`` (a model's ``get_audio_features``) makes of ``inputs``."""
    if not callable(get):
        return None
    import inspect

    try:
        names = set(inspect.signature(get).parameters)
        given = {k: v for k, v in inputs.items() if k in names} if not names & {"kwargs"} else {
            k: v for k, v in inputs.items() if k != "use_cache"}
        with torch.no_grad():
            return _rows_per_image(get(**given), BATCH)
    except Exception:  # noqa: BLE001 -- no count: the builder declines
        return None


def _wrapped(cfg, modality: str, tokens: list[int]) -> list[int]:
    """Placeholder tokens between the config's start/end (or bos/eos) tokens of that modality, if it has them."""
    start = _find(cfg, f"{modality}_start_token_id", f"{modality}_bos_token_id")
    end = _find(cfg, f"{modality}_end_token_id", f"{modality}_eos_token_id")
    return ([start] if start is not None else []) + tokens + ([end] if end is not None else [])


@register_example_inputs("hf-auto", first=False)
def _hf_auto(model: nn.Module):
    """Hugging Face models of every kind, from the forward signature and the config.

    * text ids (``input_ids`` + ``attention_mask``) for causal LMs, encoders and encoder-decoders, and
      ``decoder_input_ids`` when the model is an encoder-decoder;
    * ``input_features`` (B, mel bins, frames) for speech models: mel bins from the config, frames =
      ``max_source_positions`` times the strides of the model's 1-D convolutions;
    * ``pixel_values`` for vision-language models, with as many image tokens in ``input_ids`` (the config's
      image token id, between its vision start/end tokens if it has them) as ``get_image_features`` makes;
    * ``use_cache=False`` whenever the forward accepts it (a cache object is not a graph output).
    """
    if not _is_hf(model):
        return None
    cfg = model.config
    params, var_kw = _forward_params(model)
    emb = model.get_input_embeddings()
    device, dtype = _device_dtype(model)
    kwargs: dict[str, Any] = {}
    avoid = _special_ids(cfg)
    n_vocab = emb.num_embeddings if isinstance(emb, nn.Embedding) else _find(cfg, "vocab_size")
    placeholders: list[int] = []  # image/audio placeholder tokens that go before the text
    if "input_features" in params:
        mel = _find(cfg, "num_mel_bins", "feature_size", "n_mels", "input_dim") or 80
        positions = _find(cfg, "max_source_positions")
        stride = 1
        for m in model.modules():
            if isinstance(m, nn.Conv1d):
                stride *= int(m.stride[0])
        frames = positions * stride if positions else 64
        g = torch.Generator().manual_seed(0)
        kwargs["input_features"] = torch.randn(BATCH, mel, frames, generator=g).to(device, dtype)
        for name in params:  # a mask over the audio frames, under whatever name the forward gives it
            if "feature" in name and "mask" in name:
                kwargs[name] = torch.ones(BATCH, frames, dtype=torch.bool, device=device)
        audio_id = _find(cfg, "audio_token_id", "audio_token_index")
        if audio_id is not None:  # an audio-LLM: as many audio tokens as the audio encoder makes
            rows = _rows_from(getattr(model, "get_audio_features", None), kwargs)
            if not rows:
                return None
            placeholders += _wrapped(cfg, "audio", [audio_id] * rows)
    if "pixel_values" in params and getattr(cfg, "vision_config", None) is not None:
        found = _image_inputs(model, params, device, dtype)
        if found is None:
            return None
        pixels, image_tokens = found
        kwargs.update(pixels)
        if image_tokens:
            image_id = _find(cfg, "image_token_id", "image_token_index")
            if image_id is None:
                return None
            placeholders += _wrapped(cfg, "vision", [image_id] * image_tokens)
    if "input_ids" in params and n_vocab:
        ids = _text_ids(n_vocab, (BATCH, SOURCE_LEN), device, avoid)
        if placeholders:
            ids = torch.cat([torch.tensor([placeholders] * BATCH, device=device), ids], dim=1)
        kwargs["input_ids"] = ids
        if "mm_token_type_ids" in params and placeholders:  # which tokens are image placeholders (1) or text (0)
            image_id = _find(cfg, "image_token_id", "image_token_index")
            kwargs["mm_token_type_ids"] = (ids == image_id).long()
        if "attention_mask" in params or var_kw:
            kwargs["attention_mask"] = torch.ones_like(ids)
    if getattr(cfg, "is_encoder_decoder", False) and ("decoder_input_ids" in params or var_kw):
        dec = model.get_decoder() if hasattr(model, "get_decoder") else None
        d_emb = dec.get_input_embeddings() if dec is not None and hasattr(dec, "get_input_embeddings") else None
        n_tgt = d_emb.num_embeddings if isinstance(d_emb, nn.Embedding) else n_vocab
        if n_tgt:
            kwargs["decoder_input_ids"] = _text_ids(n_tgt, (BATCH, TARGET_LEN), device, avoid, offset=3)
    if not kwargs:
        return None
    if "use_cache" in params or var_kw:
        kwargs["use_cache"] = False
    return (), kwargs


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
