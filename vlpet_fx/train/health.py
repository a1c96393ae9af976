"""A trained VL model's encoder, checked for collapse: does it still tell the positions of an example apart?

A text model trained in full at too high a learning rate can end with every encoder position giving the same vector
(measured: all-MiniLM-L6-v2 as BERT2BERT at lr 1e-3, mean cosine 0.991 between two positions of one example; the
decoder then reads how many images an example has, not its prompt). The loss curve does not show it. ``train``
records :func:`position_cosine` on its validation examples in ``report.json`` and warns above :data:`COLLAPSED`.
"""

from __future__ import annotations

import torch

# healthy encoders measured 0.20-0.85 (random T5 / BART trained in full, BERT2BERT at 1e-4); collapsed ones 0.99+
COLLAPSED = 0.98


def collapse_warning(cos: float | None) -> str | None:
    """The one-line warning for a run whose encoder's :func:`position_cosine` is ``cos``, or ``None`` if it has not
    collapsed (or was not measured)."""
    if cos is None or not cos > COLLAPSED:
        return None
    return (f"the encoder gives every position nearly the same vector (mean cosine {cos:.3f} between two positions "
            "of an example): the model cannot read its prompt and its scores do not reflect it; train with a lower "
            "--lr (the paper's full fine-tuning uses 1e-4)")


@torch.no_grad()
def position_cosine(model, inputs: dict) -> float:
    """Mean cosine between the encoder outputs of two different positions of one example (text and visual tokens,
    padding left out), averaged over the examples of ``inputs`` (:meth:`VLModel.encode`'s keyword arguments).
    1.0: every position gives the same vector. Examples with fewer than two positions are skipped; ``nan`` if no
    example has two."""
    was_training = model.training
    model.eval()
    try:
        hidden, mask = model.encode(**inputs)
    finally:
        model.train(was_training)
    unit = torch.nn.functional.normalize(hidden.float(), dim=-1)
    values = []
    for h, m in zip(unit, mask.bool()):
        keep = h[m]
        k = keep.shape[0]
        if k < 2:
            continue
        total = (keep.sum(0) @ keep.sum(0)) - (keep * keep).sum()  # Σ_{i≠j} cos(i, j)
        values.append(float(total) / (k * (k - 1)))
    return sum(values) / len(values) if values else float("nan")
