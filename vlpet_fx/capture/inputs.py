"""Example inputs for capture: a small registry of builders, first match wins.

A builder gets the model and returns ``(args, kwargs)`` on the model's device, or ``None`` when it does
not apply. Users add builders for their own model families with :func:`register_example_inputs`.
"""

from __future__ import annotations

import re
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


def _audio_method(model: nn.Module):
    """The model's ``get_audio_features``, or that of the first submodule that has one (a conditional-generation
    wrapper whose inner multimodal model holds it)."""
    for m in model.modules():
        fn = getattr(m, "get_audio_features", None)
        if callable(fn):
            return fn
    return None


def _lengths_function(model: nn.Module):
    """The audio encoder's own frames -> embeddings formula (``_get_feat_extract_output_lengths``), if it has one."""
    for m in model.modules():
        fn = getattr(m, "_get_feat_extract_output_lengths", None)
        if callable(fn) and m is not model:
            return fn
    return None


_MISSING = re.compile(r"missing \d+ required (?:positional|keyword-only) arguments?: (.*)$")


def _missing_arguments(exc: BaseException) -> list[str]:
    """The argument names a ``TypeError`` says a call lacks ("missing 1 required positional argument: 'x'")."""
    found = _MISSING.search(str(exc)) if isinstance(exc, TypeError) else None
    return re.findall(r"'(\w+)'", found.group(1)) if found else []


def _call_audio_features(model: nn.Module, inputs: dict, optional: set[str]) -> tuple[bool, int | None]:
    """Call ``get_audio_features`` on the audio inputs alone: ``(callable this way, embeddings per example)``.

    Arguments its signature requires must be among ``inputs``; an argument the audio path requires deeper down
    (behind ``**kwargs``) that the model's forward takes with a default of ``None`` is given ``None``, as the
    forward itself would pass it. ``(True, None)`` means the model's own audio encoder rejects these inputs."""
    import inspect

    get = _audio_method(model)
    if get is None:
        return False, None
    try:
        sig = inspect.signature(get).parameters
    except (TypeError, ValueError):
        sig = {}
    required = {n for n, p in sig.items() if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                                                 p.KEYWORD_ONLY)}
    if not required <= set(inputs):
        return False, None
    named = {n for n in sig if n not in ("args", "kwargs")}
    given = {k: v for k, v in inputs.items() if k in named or not named or "kwargs" in sig}
    for _ in range(4):  # each round fills the arguments one TypeError names
        try:
            with torch.no_grad():
                return True, _rows_per_image(get(**given), BATCH)
        except TypeError as exc:
            names = [n for n in _missing_arguments(exc) if n in optional and n not in given]
            if not names:
                return True, None
            given.update(dict.fromkeys(names))
        except Exception:  # noqa: BLE001 -- the audio encoder rejects this layout or length
            return True, None
    return True, None


def _formula_rows(model: nn.Module, frames: int) -> int | None:
    """Embeddings per example from the encoder's own length formula, for ``frames`` mel frames."""
    fn = _lengths_function(model)
    if fn is None:
        return None
    try:
        with torch.no_grad():
            out = fn(torch.full((BATCH,), frames, dtype=torch.long))
        out = out[-1] if isinstance(out, (tuple, list)) else out
        return int(out.reshape(-1)[0]) if isinstance(out, torch.Tensor) else int(out)
    except Exception:  # noqa: BLE001 -- no count: the builder declines
        return None


MAX_FRAMES = 4096
_WINDOW = re.compile(r"window|chunk")


def _frame_counts(model: nn.Module, cfg) -> list[int]:
    """Frame counts to try, first choice first: ``max_source_positions`` times the strides of the model's 1-D
    convolutions (64 without it), then each window/chunk length an audio config names, and twice it (an encoder
    that cuts its input into windows of a configured length takes a multiple of it), smallest first."""
    positions = _find(cfg, "max_source_positions")
    stride = 1
    for m in model.modules():
        if isinstance(m, nn.Conv1d):
            stride *= int(m.stride[0])
    first = positions * stride if positions else 64
    windows: set[int] = set()
    for c in _configs(cfg):
        if not any(isinstance(getattr(c, k, None), int) for k in _MEL_KEYS):
            continue  # only an audio (sub-)config's windows are in frames
        for k, v in vars(c).items():
            if _WINDOW.search(k) and isinstance(v, int) and not isinstance(v, bool) and v > 1:
                windows.update(n for n in (v, 2 * v) if n <= MAX_FRAMES)
    return [first, *sorted(windows - {first})]


_MEL_KEYS = ("num_mel_bins", "feature_size", "n_mels", "input_dim", "input_feat_size")


def _audio_inputs(model: nn.Module, params: set[str], device, dtype) -> tuple[dict, int] | None:
    """``input_features`` (with the frame masks the forward names) and the number of audio tokens per example.

    Mel bins come from the config; frame counts from :func:`_frame_counts`. The layout is the first the model's
    audio encoder accepts: (B, mel bins, frames) as Whisper's feature extractor gives, or (B, frames, features).
    A model with an audio token (an audio LLM) gets as many of them as its audio encoder makes embeddings: the
    first frame count and layout on which ``get_audio_features`` runs decide; a model whose
    ``get_audio_features`` cannot be called on the audio inputs alone is counted by its encoder's own length
    formula instead."""
    cfg = model.config
    mel = _find(cfg, *_MEL_KEYS) or 80
    audio_id = _find(cfg, "audio_token_id", "audio_token_index")
    masks = [n for n in params if "feature" in n and "mask" in n]  # frame masks, whatever the forward calls them
    optional = _optional_forward_params(model)

    def layouts(frames: int):
        g = torch.Generator().manual_seed(0)
        for shape in ((BATCH, mel, frames), (BATCH, frames, mel)):
            kwargs: dict[str, Any] = {"input_features": torch.randn(*shape, generator=g).to(device, dtype)}
            for name in masks:
                kwargs[name] = torch.ones(BATCH, frames, dtype=torch.bool, device=device)
            yield kwargs

    counts = _frame_counts(model, cfg)
    if audio_id is None:
        return next(layouts(counts[0])), 0
    callable_here = False
    for frames in counts:
        for kwargs in layouts(frames):
            called, rows = _call_audio_features(model, kwargs, optional)
            callable_here |= called
            if rows:
                return kwargs, rows
    if callable_here:
        return None  # the model's own audio encoder took none of them
    rows = _formula_rows(model, counts[0])
    return (next(layouts(counts[0])), rows) if rows else None


def _waveform_inputs(model: nn.Module, device, dtype) -> tuple[dict, int] | None:
    """``input_values`` (a raw waveform) for an audio LLM whose forward takes one, and its audio tokens per example.

    Sample counts are multiples of the product of the model's 1-D convolution strides (the frame hop of a
    convolutional feature encoder): 8, 16 and 32 frames' worth. The layout, (B, 1, samples) or (B, samples), and
    the count are the first on which the model's own ``get_audio_features`` runs; without that method, none."""
    hop = 1
    for m in model.modules():
        if isinstance(m, nn.Conv1d):
            hop *= int(m.stride[0])
    optional = _optional_forward_params(model)
    for frames in (8, 16, 32):
        samples = hop * frames
        if samples > MAX_SAMPLES:
            break
        g = torch.Generator().manual_seed(0)
        for shape in ((BATCH, 1, samples), (BATCH, samples)):
            kwargs = {"input_values": torch.randn(*shape, generator=g).to(device, dtype)}
            called, rows = _call_audio_features(model, kwargs, optional)
            if not called:
                return None
            if rows:
                return kwargs, rows
    return None


MAX_SAMPLES = 1 << 16  # a waveform of at most 65536 samples (a few seconds)


def _optional_forward_params(model: nn.Module) -> set[str]:
    """The forward's parameters whose default is ``None``."""
    import inspect

    try:
        sig = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return set()
    return {n for n, p in sig.items() if p.default is None}


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
    * audio LLMs: ``input_features`` or a raw waveform (``input_values``) with one audio token per embedding their
      ``get_audio_features`` makes (:func:`_audio_inputs`, :func:`_waveform_inputs`);
    * ``pixel_values`` for vision-language models, with as many image tokens in ``input_ids`` (the config's
      image token id, between its vision start/end tokens if it has them) as ``get_image_features`` makes;
      none when the image encoder takes no layout tried and the forward runs without them;
    * a forward that pads audio embeddings to a count the config names gets that many audio tokens instead;
    * ``lang_ids`` (the config's first language) for models with per-language modules;
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
    retry: dict[str, torch.Tensor] = {}  # other inputs to use if the forward refuses the first ones
    other_counts: list[int] = []  # other audio token counts to try if the forward refuses the first one
    without_images = False
    # a forward that takes audio although the config has no audio tower (its `audio_config` is None) gets none
    no_audio = "audio_config" in vars(cfg) and cfg.audio_config is None
    if "input_features" in params and not no_audio:
        found = _audio_inputs(model, params, device, dtype)
        if found is None:
            return None
        audio, audio_tokens = found
        kwargs.update(audio)
        masks = [n for n in audio if n != "input_features"]
        if audio_tokens and masks:  # a mask over the frames, or over the audio embeddings: the forward decides
            retry = {n: torch.ones(BATCH, audio_tokens, dtype=torch.bool, device=device) for n in masks}
        if audio_tokens:
            fixed = _fixed_audio_tokens(cfg)
            if fixed is not None and fixed != audio_tokens:  # a forward that pads the embeddings to a set count
                other_counts.append(fixed)
            placeholders += _wrapped(cfg, "audio", [_find(cfg, "audio_token_id", "audio_token_index")] * audio_tokens)
    elif "input_values" in params and not no_audio and _find(cfg, "audio_token_id", "audio_token_index") is not None:
        found = _waveform_inputs(model, device, dtype)  # a raw waveform; without one the model still runs on text
        if found is not None:
            kwargs.update(found[0])
            placeholders += _wrapped(cfg, "audio", [_find(cfg, "audio_token_id", "audio_token_index")] * found[1])
    if "pixel_values" in params and getattr(cfg, "vision_config", None) is not None:
        found = _image_inputs(model, params, device, dtype)
        if found is None:
            without_images = True  # the model's own image encoder takes none of our layouts: text (and audio) only
        else:
            pixels, image_tokens = found
            kwargs.update(pixels)
            if image_tokens:
                image_id = _find(cfg, "image_token_id", "image_token_index")
                if image_id is None:
                    return None
                placeholders += _wrapped(cfg, "vision", [image_id] * image_tokens)
    if "input_ids" in params and n_vocab:
        text = _text_ids(n_vocab, (BATCH, SOURCE_LEN), device, avoid)
        ids = _with_placeholders(text, placeholders)
        kwargs["input_ids"] = ids
        if "mm_token_type_ids" in params and placeholders:  # which tokens are image placeholders (1) or text (0)
            image_id = _find(cfg, "image_token_id", "image_token_index")
            kwargs["mm_token_type_ids"] = (ids == image_id).long()
        if "attention_mask" in params or var_kw:
            kwargs["attention_mask"] = torch.ones_like(ids)
    if "lang_ids" in params and isinstance(getattr(cfg, "languages", None), (list, tuple)) and cfg.languages:
        kwargs["lang_ids"] = torch.zeros(BATCH, dtype=torch.long, device=device)  # the config's first language
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
    if retry and not _runs(model, kwargs) and _runs(model, {**kwargs, **retry}):
        kwargs.update(retry)
    if other_counts and "input_ids" in kwargs and not _runs(model, kwargs):
        audio_id = _find(cfg, "audio_token_id", "audio_token_index")
        for n in other_counts:
            ids = _with_placeholders(text, _recount(placeholders, audio_id, n))
            other = {**kwargs, "input_ids": ids}
            if "attention_mask" in kwargs:
                other["attention_mask"] = torch.ones_like(ids)
            if "mm_token_type_ids" in kwargs:
                other["mm_token_type_ids"] = (ids == _find(cfg, "image_token_id", "image_token_index")).long()
            if _runs(model, other):
                kwargs = other
                break
    if without_images and (any(p.is_meta for p in model.parameters()) or not _runs(model, kwargs)):
        return None  # left without images, the forward must still run on what it got
    return (), kwargs


def _with_placeholders(text: torch.Tensor, placeholders: list[int]) -> torch.Tensor:
    """Text ids with the image/audio placeholder tokens before them (the same for every example)."""
    if not placeholders:
        return text
    return torch.cat([torch.tensor([placeholders] * text.shape[0], device=text.device), text], dim=1)


def _recount(placeholders: list[int], token: int | None, n: int) -> list[int]:
    """``placeholders`` with its run of ``token`` made ``n`` long."""
    if token is None or token not in placeholders:
        return placeholders
    first = placeholders.index(token)
    rest = [t for t in placeholders[first:] if t != token]
    return placeholders[:first] + [token] * n + rest


_FIXED_AUDIO = re.compile(r"^audio_\w*tokens_per|^tokens_per_audio")


def _fixed_audio_tokens(cfg) -> int | None:
    """A set number of audio embeddings per example that a config names (``audio_..._tokens_per_...``): a forward
    that pads what its audio encoder makes up to that count wants that many placeholders."""
    for c in _configs(cfg):
        for k, v in vars(c).items():
            if _FIXED_AUDIO.search(k) and isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_FRAMES:
                return v
    return None


def _runs(model: nn.Module, kwargs: dict) -> bool:
    """Whether the forward accepts ``kwargs`` (True on the meta device, where nothing can be run)."""
    if any(p.is_meta for p in model.parameters()):
        return True
    try:
        with torch.no_grad():
            model(**kwargs)
    except Exception:  # noqa: BLE001 -- the caller tries another layout
        return False
    return True


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
