"""How examples become model inputs: the task prompt, tokenised text, and per-example images padded to a batch.

One place for it, used by training, evaluation, ``predict``/``serve`` generation and the benchmarks, so a prompt or
a padding rule cannot differ between the model's training and its use.
"""

from __future__ import annotations

import torch


def task_prompt(task: str, text: str) -> str:
    """The encoder's text for one example: the task's name as a prefix (``"vqa: what digit is it?"``)."""
    return f"{task}: {text}"


def tokenize(tok, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """``texts`` → (input ids, attention mask), each (B, L), right-padded to the longest text."""
    enc = tok(texts, padding=True, return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def pad_visual(feats: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example image features, (K_i, T, F) each → (B, Kmax·T, F) and an image mask (B, Kmax).

    An example with fewer images than the batch's most gets zero features in the missing slots, masked out."""
    k = max(f.shape[0] for f in feats)
    t, d = feats[0].shape[1], feats[0].shape[2]
    out = torch.zeros(len(feats), k, t, d)
    mask = torch.zeros(len(feats), k, dtype=torch.long)
    for i, f in enumerate(feats):
        out[i, : f.shape[0]] = f
        mask[i, : f.shape[0]] = 1
    return out.flatten(1, 2).to(device), mask.to(device)


def pad_pixels(images: list[list], size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example raw images → pixels (B, Kmax, 3, size, size) in [-1, 1] and an image mask (B, Kmax); a missing
    image is a blank (zero) slot, masked out."""
    from ..vl.model import to_pixels

    k = max(len(ims) for ims in images)
    blank = torch.zeros(3, size, size)
    rows, mask = [], torch.zeros(len(images), k, dtype=torch.long)
    for i, ims in enumerate(images):
        px = list(to_pixels(ims, size))
        mask[i, : len(px)] = 1
        rows.append(torch.stack(px + [blank] * (k - len(px))))
    return torch.stack(rows).to(device), mask.to(device)


def example_features(cache, examples) -> list[torch.Tensor]:
    """Every example's image features, (K_i, T, F), from one ``cache.features`` call over all their images."""
    flat = [im for e in examples for im in e.images]
    feats = cache.features(flat) if flat else torch.zeros(0)
    out, i = [], 0
    for e in examples:
        out.append(feats[i:i + len(e.images)])
        i += len(e.images)
    return out
