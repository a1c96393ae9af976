"""Non-Hugging-Face built-ins: open_clip visual towers and ``torch.nn.Transformer``."""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from .registry import register_model


@contextlib.contextmanager
def quiet_open_clip():
    """While open_clip builds a model: its "no pretrained weights" notice (logged on the root logger) is
    dropped. The root logger's level is restored afterwards: the library changes no process-wide setting."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def _open_clip_visual(arch: str) -> nn.Module:
    import open_clip

    device = torch.get_default_device()
    with quiet_open_clip():
        return open_clip.create_model(arch, device=device).visual


@register_model("clip-vit-b-32", "open_clip ViT-B-32 visual tower (tiny: 2 layers, width 64)",
                sizes=("tiny", "small", "base"))
def clip_vit_b_32(size: str) -> nn.Module:
    if size == "tiny":
        from open_clip.transformer import VisionTransformer

        return VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=2.0, output_dim=32)
    return _open_clip_visual("ViT-B-32")


@register_model("clip-rn50", "open_clip RN50 visual tower with attention pooling (tiny: width 16)",
                sizes=("tiny", "small", "base"))
def clip_rn50(size: str) -> nn.Module:
    if size == "tiny":
        from open_clip.modified_resnet import ModifiedResNet

        return ModifiedResNet(layers=(1, 1, 1, 1), output_dim=32, heads=2, image_size=64, width=16)
    return _open_clip_visual("RN50")


_TORCH_T = dict(
    tiny=dict(d_model=64, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=128),
    small=dict(d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=2048),
    base=dict(d_model=768, nhead=12, num_encoder_layers=12, num_decoder_layers=12, dim_feedforward=3072),
    large=dict(d_model=1024, nhead=16, num_encoder_layers=24, num_decoder_layers=24, dim_feedforward=4096),
)


@register_model("torch-transformer", "torch.nn.Transformer (post-LN, packed in_proj)")
def torch_transformer(size: str) -> nn.Module:
    return nn.Transformer(**_TORCH_T[size], batch_first=True, dropout=0.1)
