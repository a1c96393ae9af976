"""Trainable-parameter budget of the shipped rule sets on a VL-BART-base-shaped model (VL-Adapter's set-up).

The model is BART-base (vocabulary + the 200 added special tokens) whose encoder reads projected visual
features next to the text embeddings; the visual projector has VL-Adapter's shape (Linear 2048→768 + LayerNorm,
box Linear 5→768 + LayerNorm, image-order embedding). The CLIP backbone is not part of the model (features are
precomputed, as in the paper), so it is not in the denominator. Built on the meta device: no memory, no weights.

    python bench/budget.py
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers as tf  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch import nn  # noqa: E402

import vlpet_fx  # noqa: E402

PAPER = {"vlpet_small": 2.98, "vlpet_middlex": 2.98, "vlpet_middley": 2.98, "vlpet_large": 4.16, "vl_adapter": 4.18}


class VisualProjection(nn.Module):
    def __init__(self, feat_dim: int = 2048, d: int = 768):
        super().__init__()
        self.feat_embedding = nn.Sequential(nn.Linear(feat_dim, d), nn.LayerNorm(d))
        self.absolute_vis_pos_embedding = nn.Sequential(nn.Linear(5, d), nn.LayerNorm(d))
        self.img_order_embedding = nn.Embedding(2, d)

    def forward(self, feats, boxes):
        order = torch.zeros(feats.shape[:2], dtype=torch.long, device=feats.device)
        return self.feat_embedding(feats) + self.absolute_vis_pos_embedding(boxes) + self.img_order_embedding(order)


class VLBartShape(nn.Module):
    def __init__(self):
        super().__init__()
        cfg = tf.BartConfig(vocab_size=50265 + 200, d_model=768, encoder_layers=6, decoder_layers=6,
                            encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                            decoder_ffn_dim=3072, max_position_embeddings=1024)
        self.text = tf.BartForConditionalGeneration(cfg)
        self.visual_projection = VisualProjection()

    def forward(self, input_ids, vis_feats, boxes, decoder_input_ids):
        tokens = self.text.get_input_embeddings()(input_ids)
        embeds = torch.cat([tokens, self.visual_projection(vis_feats, boxes)], dim=1)
        return self.text(inputs_embeds=embeds, decoder_input_ids=decoder_input_ids, use_cache=False).logits

    def example_inputs(self):
        dev = next(self.parameters()).device
        return ((torch.ones(2, 8, dtype=torch.long, device=dev), torch.zeros(2, 36, 2048, device=dev),
                 torch.zeros(2, 36, 5, device=dev), torch.ones(2, 4, dtype=torch.long, device=dev)), {})


def main() -> None:
    with torch.device("meta"):
        model = VLBartShape()
    table = vlpet_fx.discover(model, name="VL-BART-base shape")
    t = Table(title="trainable parameters on a VL-BART-base-shaped model (meta device)")
    for col in ("rule set", "PET modules", "trainable", "total", "trainable %", "paper %"):
        t.add_column(col, justify="left" if col == "rule set" else "right")
    for name in ["vlpet_small", "vlpet_middlex", "vlpet_middley", "vlpet_large", "vl_adapter", "lora", "full_finetune"]:
        p = vlpet_fx.plan(model, name, table=table)
        pct = 100 * p.trainable_params / p.patched_total
        t.add_row(name, f"{len(p.placements)}", f"{p.trainable_params:,}", f"{p.patched_total:,}", f"{pct:.2f}",
                  f"{PAPER[name]:.2f}" if name in PAPER else "-")
    Console().print(t)


if __name__ == "__main__":
    main()
