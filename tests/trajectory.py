"""Comparing the trajectories of two training runs (one process against two, DDP or FSDP)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file


def same_length_data(where: Path, n: int = 16) -> Path:
    """A JSONL file whose prompts all have the same number of tokens. Each process pads its slice of a batch to
    its own longest prompt, and the visual tokens follow the text, so with prompts of several lengths T5's relative
    positions would see them at other offsets in one process than in two: equal lengths leave only float
    summation order between the runs."""
    where.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        Image.fromarray(((np.arange(64).reshape(8, 8) * (i + 3)) % 251).astype(np.uint8)).save(where / f"im{i}.png")
        rows.append(json.dumps({"images": [f"im{i}.png"], "input": f"what is picture {i}", "target": f"number {i % 5}",
                                "task": "mine"}))
    (where / "same.jsonl").write_text("\n".join(rows) + "\n")
    return where / "same.jsonl"


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def assert_same_trajectory(one: Path, two: Path) -> None:
    """``two`` followed ``one``'s trajectory up to float summation order (dropout off: each process draws its own
    masks)."""
    la, lb = losses(one), losses(two)
    assert len(la) == len(lb) and lb == pytest.approx(la, rel=1e-5)
    a, b = (load_file(str(r / "model" / "pet.safetensors")) for r in (one, two))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
