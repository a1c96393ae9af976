"""What every patched Hugging Face model of the family tests must do after its forward: train and generate."""

from __future__ import annotations

import torch


def assert_trains_and_generates(patched, out: torch.Tensor, kwargs: dict, name: str, *, generate: bool = True):
    """A backward from the patched model's output ``out`` reaches every trainable parameter with a finite
    gradient; with ``generate``, greedy generation with the cache gives the tokens it gives without it (the PET
    modules see the same values one token at a time as on the whole sequence)."""
    out.float().sum().backward()
    trainable = [p for p in patched.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable), name
    if not generate:
        return
    extra = {k: v for k, v in kwargs.items() if k != "use_cache"}
    with torch.no_grad():
        cached = patched.generate(**extra, max_new_tokens=3, do_sample=False, use_cache=True)
        plain = patched.generate(**extra, max_new_tokens=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain), name
