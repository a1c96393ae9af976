"""Depth reduction for fast capture.

Export cost grows with depth, but transformer stacks repeat one layer. ``reduced(model)`` temporarily
shortens every homogeneous ``ModuleList``/``Sequential`` (all elements of one class) to the elements needed
to see each distinct *structural signature* once (class, parameter and buffer names, shapes and dtypes,
and the classes of all sub-modules). Every dropped element is structurally identical to a kept one, so
its sites are the kept element's sites with the index changed. The model is restored on exit.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

from torch import nn

MIN_LENGTH = 3  # shorter lists are captured as they are


def signature(module: nn.Module) -> tuple:
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters())
    buffers = tuple((n, tuple(b.shape), b.dtype) for n, b in module.named_buffers())
    kinds = tuple((n, type(m).__qualname__) for n, m in module.named_modules())
    return (type(module).__qualname__, params, buffers, kinds)


@dataclass
class Reduction:
    """What was dropped: for each list path, its full length and ``dropped index -> kept index``."""

    lists: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)
    representative: dict[str, dict[int, int]] = field(default_factory=dict)
    # lists captured with their last element too (``keep_last``): the reduced list's element ``kept[path]`` is
    # the full list's element ``lists[path] - 1``
    tail: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.representative)


def _plan(model: nn.Module, keep_last: bool = False) -> dict[str, tuple[int, dict[int, int]]]:
    plans: dict[str, tuple[int, dict[int, int]]] = {}
    for path, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) < MIN_LENGTH:
            continue
        if any(path.startswith(p + ".") for p in plans):  # nested inside a list we already shorten
            continue
        items = list(mod)
        if len({type(m) for m in items}) != 1:
            continue
        sigs = [signature(m) for m in items]
        last_seen: dict[tuple, int] = {}
        keep = 0
        for i, s in enumerate(sigs):
            if s not in last_seen:
                keep = i + 1
            last_seen.setdefault(s, i)
        # each distinct signature's representative is its last occurrence inside the kept prefix
        rep_of_sig = {s: max(j for j in range(keep) if sigs[j] == s) for s in set(sigs[:keep])}
        reps = {j: rep_of_sig[sigs[j]] for j in range(keep, len(items) - keep_last)}
        if reps:
            plans[path] = (keep, reps)
    return plans


def _install_lazy_hooks(model: nn.Module) -> None:
    """transformers (5.x) installs its output-capturing forward hooks once, lazily, on the first call: install
    them on the full-depth model first, or the layers dropped during the reduced capture would never get them
    (and e.g. ``hidden_states[-2]`` of a vision tower would be ``None`` afterwards)."""
    try:
        from transformers import PreTrainedModel
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:
        return
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            maybe_install_capturing_hooks(m)


@contextlib.contextmanager
def reduced(model: nn.Module, keep_last: bool = False) -> Iterator[Reduction]:
    """Shorten repeated layer lists in place for the duration of the block. With ``keep_last`` each shortened
    list keeps its last element after the kept prefix: the last layer, which can differ in what reaches the
    model's outputs (a stream dropped after it), is then seen as the last, and the prefix as layers before it."""
    plans = _plan(model, keep_last)
    if plans:
        _install_lazy_hooks(model)
    red = Reduction()
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for path, (keep, reps) in plans.items():
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            original = parent._modules[attr]
            items = list(original)[:keep] + (list(original)[-1:] if keep_last else [])
            short = type(original)(*items) if isinstance(original, nn.Sequential) else nn.ModuleList(items)
            parent._modules[attr] = short
            swapped.append((parent, attr, original))
            red.lists[path] = len(original)
            red.kept[path] = keep
            red.representative[path] = reps
            if keep_last:
                red.tail.add(path)
        yield red
    finally:
        for parent, attr, original in reversed(swapped):
            parent._modules[attr] = original
