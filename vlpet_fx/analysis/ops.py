"""Op classification for ATen-level torch.fx graphs.

Every ``call_function`` node falls into one kind. Analysis passes walk the graph through *light* ops
(shape changes, casts, element-wise arithmetic, normalisation) and stop at *heavy* ones (projections,
matmuls, attention, convolutions, embeddings, concatenation), which is what lets them follow a value from
an attention core back to the projection that made it without knowing any module names.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from ..capture import opaque as _opaque  # noqa: F401 -- registers torch.ops.vlpet_fx.opaque

aten = torch.ops.aten


def _overloads(*packets) -> frozenset:
    out = set()
    for packet in packets:
        if packet is None:
            continue
        for name in packet.overloads():
            out.add(getattr(packet, name))
        out.add(packet)
    return frozenset(out)


def _maybe(name: str):
    return getattr(aten, name, None)


LINEAR = _overloads(aten.linear)
MATMUL = _overloads(aten.matmul, aten.mm, aten.bmm, aten.addmm, aten.einsum, _maybe("baddbmm"))
SDPA = _overloads(
    aten.scaled_dot_product_attention,
    _maybe("_scaled_dot_product_attention_math"),
    _maybe("_scaled_dot_product_flash_attention"),
    _maybe("_scaled_dot_product_flash_attention_for_cpu"),
    _maybe("_scaled_dot_product_efficient_attention"),
    _maybe("_scaled_dot_product_cudnn_attention"),
)
SOFTMAX = _overloads(aten.softmax, aten._softmax, _maybe("_safe_softmax"))
CONV = _overloads(aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, aten._convolution)
EMBEDDING = _overloads(aten.embedding)
CONCAT = _overloads(aten.cat, aten.stack, aten.concat if hasattr(aten, "concat") else None)
ACTIVATION = _overloads(
    aten.relu, aten.relu_, aten.gelu, aten.gelu_, aten.silu, aten.silu_, aten.tanh, aten.tanh_,
    aten.sigmoid, aten.sigmoid_, aten.erf, aten.hardtanh, aten.leaky_relu, aten.elu, aten.mish,
    aten.glu, aten.hardswish, aten.softplus, aten.selu, aten.celu,
)
# element-wise ops that are not affine in their input: an activation written out of primitives (e.g. xIELU:
# ``where(x > 0, a·x² + b·x, c·expm1(min(x, eps)) + b·x)``) has no ACTIVATION op but these
NONLINEAR = ACTIVATION | _overloads(
    aten.where, aten.exp, aten.expm1, aten.log, aten.log1p, aten.clamp, aten.clamp_min, aten.clamp_max,
    aten.minimum, aten.maximum, aten.abs, aten.pow, aten.square if hasattr(aten, "square") else None,
    aten.sqrt, aten.rsqrt, aten.sign, _maybe("min"), _maybe("max"),
)
SELECT = _overloads(aten.select)
CUMULATIVE = _overloads(aten.cumsum, aten.cumprod, _maybe("logcumsumexp"), _maybe("cummax"), _maybe("cummin"))
ADD = _overloads(aten.add, aten.add_)
MUL = _overloads(aten.mul, aten.mul_)
SHAPE = _overloads(
    aten.view, aten.reshape, aten._unsafe_view, aten.transpose, aten.t, aten.permute, aten.contiguous,
    aten.unsqueeze, aten.squeeze, aten.expand, aten.unflatten, aten.flatten, aten.select, aten.slice,
    aten.split, aten.split_with_sizes, aten.chunk, aten.unbind, aten.clone, aten.to, aten._to_copy,
    aten.detach, aten.alias, aten.dropout, aten.native_dropout, aten.type_as, aten.narrow,
    _maybe("numpy_T"), _maybe("mT"), _maybe("adjoint"), _maybe("swapaxes"), _maybe("movedim"),
) | frozenset({operator.getitem})
# ops that hand on their one tensor operand's value unchanged at inference when they keep its shape and dtype (the
# caller checks that): a dropout, an alias or copy, a view to the same shape, a cast to the same dtype
SAME_VALUE = _overloads(aten.dropout, aten.alias, aten.clone, aten.contiguous, aten.view, aten.reshape,
                        aten._unsafe_view, aten.to, aten._to_copy)

GROUPED_MM = _overloads(_maybe("_grouped_mm"))  # one matrix per group of rows (mixture-of-experts kernels)
OPAQUE = _overloads(torch.ops.vlpet_fx.opaque)  # a module kept as one call (capture/opaque.py): nothing to see inside
HEAVY = LINEAR | MATMUL | SDPA | SOFTMAX | CONV | EMBEDDING | CONCAT | GROUPED_MM | OPAQUE
_EXTRA_HEAVY: set = set()  # ops of user-registered patterns (vlpet_fx.analysis.patterns.register_pattern)


def add_heavy(targets) -> None:
    """Treat ``targets`` as heavy: analysis walks stop at them (as at projections and attention ops)."""
    _EXTRA_HEAVY.update(t for t in targets if t is not None)


def is_aten(target) -> bool:
    return getattr(target, "namespace", None) == "aten" or target is operator.getitem


def target(node: torch.fx.Node):
    return node.target if node.op == "call_function" else None


def is_kind(node: torch.fx.Node, kind: frozenset) -> bool:
    return node.op == "call_function" and node.target in kind


def is_heavy(node: torch.fx.Node) -> bool:
    return node.op != "call_function" or node.target in HEAVY or node.target in _EXTRA_HEAVY


def tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Input nodes that carry tensors (skips ints, shapes and other non-tensor values)."""
    out = []
    for n in node.all_input_nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) or (val is None and n.op != "call_function") or isinstance(val, (tuple, list)):
            out.append(n)
    return out


# ops that read some tensor operands only for their dtype, device or shape (``a.type_as(b)``, ``a.to(b)``,
# ``zeros_like(b)``): no value flows from those operands
_META_SECOND = _overloads(aten.type_as, aten.expand_as, aten.view_as, aten.reshape_as, aten.to)
_META_ALL = _overloads(aten.zeros_like, aten.ones_like, aten.empty_like, aten.full_like, aten.rand_like,
                       aten.randn_like, aten.new_zeros, aten.new_ones, aten.new_empty, aten.new_full)


def value_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """:func:`tensor_inputs` whose values ``node`` reads (without the operands read for their dtype, device or
    shape only)."""
    ins = tensor_inputs(node)
    if node.op != "call_function":
        return ins
    if node.target in _META_ALL:
        return []
    if node.target in _META_SECOND and len(node.args) > 1 and isinstance(node.args[1], torch.fx.Node):
        return [n for n in ins if n is not node.args[1] or n is node.args[0]]
    return ins


def shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        try:
            return tuple(int(s) for s in val.shape)
        except Exception:  # noqa: BLE001 -- symbolic or data-dependent sizes have no int value
            return None
    return None


def is_float_image(node: torch.fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point and val.dim() >= 4  # (B, C, H, W) or (B, K, C, H, W)


def is_tensor_add(node: torch.fx.Node) -> bool:
    """``a + b`` with two tensor operands (a residual add candidate)."""
    if not is_kind(node, ADD):
        return False
    tensors = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
    return len(tensors) == 2
