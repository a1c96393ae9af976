"""Normalisation layers found by what they compute, not by their class name.

A node normalises when it is

* a normalisation op of ATen (``layer_norm``, ``native_layer_norm``, ``rms_norm``, ``group_norm``,
  ``batch_norm`` ...), or
* the reciprocal square root of a mean over the feature axis plus an epsilon — ``x * rsqrt(mean(x²) + eps)``
  (RMSNorm, T5's norm) or ``(x - mean) / sqrt(var + eps)`` (a hand-written LayerNorm): ``rsqrt`` or ``sqrt``
  whose input, through light ops, is a ``mean``/``var`` reduction.

The normalisation *module* is the innermost module that ran the node; its parameters (``w``, ``b``) are
what ``trainable: [{select: {norms: true}}]`` unfreezes.
"""

from __future__ import annotations

import torch.fx

from ..capture import Captured
from . import ops

_NORM_OPS = ops._overloads(
    ops.aten.layer_norm, ops.aten.native_layer_norm, ops._maybe("rms_norm"), ops._maybe("_fused_rms_norm"),
    ops.aten.group_norm, ops.aten.native_group_norm, ops.aten.batch_norm, ops._maybe("native_batch_norm"),
    ops._maybe("_native_batch_norm_legit_no_training"), ops._maybe("_native_batch_norm_legit_functional"),
    ops.aten.instance_norm,
)
_ROOTS = ops._overloads(ops.aten.rsqrt, ops.aten.sqrt)
_REDUCTIONS = ops._overloads(ops.aten.mean, ops.aten.var, ops._maybe("var_mean"), ops.aten.std)


def _reduces_features(node: torch.fx.Node) -> bool:
    """A mean/var over the last axis (a per-token statistic), found through scalar adds and casts."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen or len(seen) > 16:
            continue
        seen.add(n)
        if ops.is_kind(n, _REDUCTIONS):
            dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            rank = len(ops.shape(n.args[0]) or ()) if isinstance(n.args[0], torch.fx.Node) else 0
            return bool(dims) and all(d in (-1, rank - 1) for d in dims)
        if n.op == "call_function" and not ops.is_heavy(n):
            todo.extend(n.all_input_nodes)
    return False


def is_norm(node: torch.fx.Node) -> bool:
    if ops.is_kind(node, _NORM_OPS):
        return True
    return ops.is_kind(node, _ROOTS) and any(_reduces_features(a) for a in node.all_input_nodes)


def norm_modules(cap: Captured) -> list[str]:
    """Paths of the modules that normalise (in graph order, each once); the root module ``""`` is left out."""
    out: dict[str, None] = {}
    for n in cap.graph.nodes:
        if n.op == "call_function" and is_norm(n):
            path = cap.module_path(n)
            if path:
                out.setdefault(path, None)
    return list(out)
