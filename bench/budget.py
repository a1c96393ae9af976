"""Trainable-parameter budget of the shipped rule sets on the runtime VL model, at BART-base and T5-base shapes.

The model is what ``train`` builds (:func:`vlpet_fx.vl.build_vl`): BART-base or T5-base as the text model (with
the authors' vocabularies: their added special tokens), and the authors' visual embedding (feature Linear 2048→768 + norm,
box Linear 5→768 + norm, image-order embedding for an example's 2 images) reading 2048-d features: the image
encoder is a stand-in giving 36 tokens of 2048-d CLIP-RN101-grid-shaped features on a 6×6 grid, registered
like any user's encoder. The CLIP backbone is not part of the paper's model (its features are precomputed), so
the image encoder is not in the denominator. Built on the meta device: no memory, no weights.

    python bench/budget.py            # the two tables
    python bench/budget.py --json     # {"bart": [[rule set, PET modules, trainable, total], ...], "t5": [...]}
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch import nn  # noqa: E402

import vlpet_fx  # noqa: E402
from vlpet_fx.vl import build_vl, register_image_encoder  # noqa: E402

# the paper's trainable percentages (BART-base, image-text; the VL-PET README table; VL-Adapter's 4.18 %)
PAPER = {"vlpet_small": 2.98, "vlpet_middlex": 2.98, "vlpet_middley": 2.98, "vlpet_large": 4.16, "vl_adapter": 4.18}
BART_RULES = ["vlpet_small", "vlpet_middlex", "vlpet_middley", "vlpet_large", "vl_adapter", "lora", "full_finetune"]
T5_RULES = ["vlpet_small_t5", "vlpet_middlex_t5", "vlpet_middley_t5", "vlpet_large_t5", "vl_adapter", "lora",
            "full_finetune"]
FEATURES = "clip-rn101-grid-features"
# the authors' vocabularies: BART's 50,265 + 200 added <extra_id_*>/<vis_extra_id_*> tokens; T5's tokenizer with
# 100 <extra_id_*> and 100 <vis_extra_id_*> (32,200; the checkpoint's embedding is resized to it)
VOCAB = {"bart": 50265 + 200, "t5": 32000 + 100 + 100}


class GridFeatures(nn.Module):
    """Stand-in for the frozen CLIP RN101 grid: (N, 3, 224, 224) → (N, 36, 2048) on a 6×6 grid."""

    image_size = 224
    token_grid = (6, 6)

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 2048, kernel_size=37, stride=37)

    def forward(self, x):
        return self.patch(x).flatten(2).transpose(1, 2)


register_image_encoder(FEATURES)(lambda size: (GridFeatures(), 2048))


def model_of(text: str) -> nn.Module:
    """The runtime VL model at the paper's shape, on the meta device."""
    with torch.device("meta"):
        return build_vl(text, "base", visual=FEATURES, max_images=2, vocab_size=VOCAB[text])


def budget(model: nn.Module, rules: str, table) -> tuple[int, int, int]:
    """(PET modules, trainable, total) of the model without its image encoder."""
    p = vlpet_fx.plan(model, rules, table=table)
    visual = {n: t.numel() for n, t in model.named_parameters() if n.startswith("visual.")}
    on_visual = [pl for pl in p.placements if pl.site.path is not None and pl.site.path.startswith("visual.")]
    pet_visual = sum(pl.params for pl in on_visual)
    trainable = p.trainable_params - pet_visual - sum(v for n, v in p.trainable.items() if n in visual)
    total = p.patched_total - pet_visual - sum(visual.values())
    return len(p.placements) - len(on_visual), trainable, total


def rows(text: str, rule_sets: list[str]) -> list[tuple[str, int, int, int]]:
    model = model_of(text)
    table = vlpet_fx.discover(model, name=f"VL-{text.upper()}-base (runtime model)")
    return [(r, *budget(model, r, table)) for r in rule_sets]


def main() -> None:
    results = {text: rows(text, rule_sets) for text, rule_sets in (("bart", BART_RULES), ("t5", T5_RULES))}
    if "--json" in sys.argv[1:]:
        print(json.dumps(results))
        return
    for text, table_rows in results.items():
        t = Table(title=f"trainable parameters of the runtime VL-{text.upper()}-base model (meta device; the image "
                        "encoder not counted)")
        for col in ("rule set", "PET modules", "trainable", "total", "trainable %", "paper %"):
            t.add_column(col, justify="left" if col == "rule set" else "right")
        for name, n, trainable, total in table_rows:
            paper = PAPER.get(name) if text == "bart" else None
            t.add_row(name, f"{n}", f"{trainable:,}", f"{total:,}", f"{100 * trainable / total:.2f}",
                      f"{paper:.2f}" if paper is not None else "-")
        Console().print(t)


if __name__ == "__main__":
    main()
