"""bench/budget.py counts the runtime VL model (build_vl at BART-base / T5-base shapes, 2048-d features) and
reproduces the paper's trainable percentages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
D, F = 768, 2048


@pytest.fixture(scope="module")
def budget():
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "budget.py"), "--json"], capture_output=True,
                         text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    return {text: {r[0]: r[1:] for r in rows} for text, rows in json.loads(res.stdout).items()}


@pytest.mark.slow
def test_bart_base_reproduces_the_papers_percentages(budget):
    paper = {"vlpet_small": 2.98, "vlpet_middlex": 2.98, "vlpet_middley": 2.98, "vlpet_large": 4.16,
             "vl_adapter": 4.18}
    for rules, pct in paper.items():
        _, trainable, total = budget["bart"][rules]
        assert round(100 * trainable / total, 2) == pct, rules
    # the counts recomputed from the VL-PET code (BENCHMARKS.md), unchanged by counting the runtime model
    assert budget["bart"]["vlpet_large"] == [18, 6_052_416, 145_606_464]
    assert budget["bart"]["vlpet_small"] == [18, 4_291_020, 143_845_068]
    # full fine-tuning trains BART-base (vocabulary 50,265 + 200) and the visual embedding, not the image encoder
    bart_base = 139_420_416 + 200 * D  # bart-base's parameters (tied embeddings), + the 200 added rows
    projector = (F * D + D) + 2 * D + (5 * D + D) + 2 * D + 2 * D  # feature, box (Linear + LayerNorm), 2 images
    assert budget["bart"]["full_finetune"][1:] == [bart_base + projector] * 2


@pytest.mark.slow
def test_t5_base_figures(budget):
    # T5's visual norms are its RMS norm (a weight, no bias); vocabulary 32,000 + 100 + 100 as the authors'
    projector = (F * D + D) + D + (5 * D + D) + D + 2 * D
    t5_base = 222_903_552 + (32_200 - 32_128) * D  # t5-base (tied embeddings) with its embedding resized
    assert budget["t5"]["full_finetune"][1:] == [t5_base + projector] * 2
    pct = {r: round(100 * t / n, 2) for r, (_, t, n) in budget["t5"].items()}
    assert pct["vlpet_large_t5"] == 7.31 and pct["vlpet_middlex_t5"] == pct["vlpet_middley_t5"] == 4.50
