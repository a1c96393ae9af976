"""Built-in VL models: an open_clip visual tower + a T5 or BART text model (``inspect vl-t5``, ``patch vl-bart``)."""

from __future__ import annotations

from .registry import register_model


def _vl(text: str):
    def build(size: str):
        from ..vl import build_vl

        # tiny: the tiny ViT; small/base: a ViT-B-32-shaped tower (random weights)
        return build_vl(text, size, visual="clip-vit-b-32", visual_size="tiny" if size == "tiny" else "base")

    return build


register_model("vl-t5", "VL-T5: open_clip ViT-B-32 tower + visual projector + T5")(_vl("t5"))
register_model("vl-bart", "VL-BART: open_clip ViT-B-32 tower + visual projector + BART")(_vl("bart"))
