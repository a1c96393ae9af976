"""The pattern registry: small objects that recognise transformer building blocks in an ATen graph.

Four kinds, each a list of registered objects tried in order (the first that matches wins):

* ``projection`` -- an op that maps an activation ``x`` by a weight operand (``linear``, ``mm``/``matmul``/``bmm``,
  ``addmm`` as Hugging Face's ``Conv1D`` computes it, two-operand ``einsum``). The pattern names the operands;
  the dataflow then checks that the weight comes from a parameter.
* ``product`` -- a product of two activations inside attention (the scores ``q·kᵀ`` or the weighted values
  ``p·v``): ``matmul``/``bmm``, ``baddbmm`` (its additive bias is never a factor), ``einsum`` (the equation string
  is never an operand). The pattern names the two factors and which of them carries the softmax axis (the keys).
* ``attention`` -- an attention core, anchored at one op: ``sdpa`` (q, k, v are its arguments) or ``softmax``
  (scores product → softmax → value product, through light ops).
* ``ffn`` -- a feed-forward block's roles, given the candidate input projections (each with whether an activation
  lies on its path to the output projection) and the output projection: ``gated`` (``gate``, ``up``, ``out``),
  ``fused-gated`` (``gate`` and ``up`` are slices of one projection's output) and ``plain`` (``in``, ``out``).

Users add their own with :func:`register_pattern` (see docs/PATTERNS.md). Nothing here knows a model family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.fx

from . import ops

if TYPE_CHECKING:  # pragma: no cover
    from .dataflow import Branch, Core, Dataflow, Projection

Node = torch.fx.Node
KINDS = ("projection", "product", "attention", "ffn", "branch")


class Pattern:
    """Base of every pattern. ``name`` must be unique; ``targets`` are the ops the pattern is anchored at."""

    kind: ClassVar[str] = ""
    name: str = ""
    targets: frozenset = frozenset()

    def anchors(self, node: Node) -> bool:
        return node.op == "call_function" and node.target in self.targets


class ProjectionPattern(Pattern):
    kind = "projection"

    def operands(self, node: Node) -> tuple[Node, Node] | None:
        """``(x, weight operand)`` of the op, or ``None``."""
        raise NotImplementedError

    def features(self, node: Node, x: Node, w: Node) -> tuple[int, int] | None:
        """``(in_features, out_features)``: by default the last axis of ``x`` and of the result."""
        xs, ys = ops.shape(x), ops.shape(node)
        return (xs[-1], ys[-1]) if xs and ys else None


class ProductPattern(Pattern):
    kind = "product"

    def factors(self, node: Node) -> tuple[Node, Node] | None:
        """The two tensor factors of the product, left then right."""
        raise NotImplementedError

    def keys_factor(self, node: Node, dim: int) -> int | None:
        """Which factor (0 or 1) provides the result's axis ``dim`` (the softmax axis of attention scores)."""
        ys = ops.shape(node)
        if ys is None:
            return None
        dim = dim % len(ys)
        return 1 if dim == len(ys) - 1 else 0 if dim == len(ys) - 2 else None


class AttentionPattern(Pattern):
    kind = "attention"

    def match(self, node: Node, flow: "Dataflow") -> "Core | None":
        raise NotImplementedError


class FfnPattern(Pattern):
    kind = "ffn"

    def roles(self, ins: list[tuple["Projection", bool]], out: "Projection", flow: "Dataflow"):
        """Role -> projections for a candidate block, or ``None`` if the pattern does not apply.

        ``ins`` are the input projections, each with whether an activation lies on its path to ``out``. When one
        projection plays two roles (a fused gate/up matrix), return ``(roles, values)`` with ``values[role]`` the
        node that role's slice of the output becomes; the dataflow works out the slices."""
        raise NotImplementedError


class BranchPattern(Pattern):
    """Classifies a residual branch no other pattern claimed. Branch patterns are not anchored at an op."""

    kind = "branch"

    def classify(self, branch: "Branch", flow: "Dataflow") -> str | None:
        """The block kind of ``branch`` (``"ffn"`` or ``"mixer"``), or ``None`` if the pattern does not apply."""
        raise NotImplementedError


_REGISTRY: dict[str, list[Pattern]] = {k: [] for k in KINDS}


def register_pattern(pattern: Pattern, *, first: bool = True) -> Pattern:
    """Register ``pattern`` (an instance of a :class:`Pattern` subclass). ``first=True`` (default) tries it
    before the built-in ones of its kind. A pattern of the same kind and name is replaced. Returns it.

    The ops an attention or projection pattern is anchored at become *heavy* (analysis does not walk through
    them), as the built-in attention and projection ops are."""
    if not isinstance(pattern, Pattern) or pattern.kind not in KINDS:
        raise TypeError(f"register_pattern needs an instance of ProjectionPattern, ProductPattern, AttentionPattern, "
                        f"FfnPattern or BranchPattern, got {pattern!r}")
    if not pattern.name:
        raise TypeError(f"{type(pattern).__name__} needs a non-empty `name`")
    unregister_pattern(pattern.name, pattern.kind)
    lst = _REGISTRY[pattern.kind]
    lst.insert(0, pattern) if first else lst.append(pattern)
    if pattern.kind in ("attention", "projection", "product"):
        ops.add_heavy(pattern.targets)
    return pattern


def unregister_pattern(name: str, kind: str | None = None) -> bool:
    """Remove a registered pattern by name (and kind, if given); ``True`` if there was one."""
    for k, lst in _REGISTRY.items():
        if kind is not None and k != kind:
            continue
        for p in list(lst):
            if p.name == name:
                lst.remove(p)
                return True
    return False


def patterns(kind: str) -> list[Pattern]:
    if kind not in _REGISTRY:
        raise KeyError(f"unknown pattern kind '{kind}': one of {', '.join(KINDS)}")
    return list(_REGISTRY[kind])


def list_patterns() -> dict[str, list[str]]:
    return {k: [p.name for p in v] for k, v in _REGISTRY.items()}


# -- einsum equations ------------------------------------------------------------------------------------

def einsum_parts(node: Node) -> tuple[list[str], str, list] | None:
    """``(input subscripts, output subscripts, operands)`` of an explicit two-operand ``einsum`` node."""
    if len(node.args) < 2 or not isinstance(node.args[0], str) or not isinstance(node.args[1], (list, tuple)):
        return None
    eq = node.args[0].replace(" ", "")
    if "->" not in eq:
        return None
    lhs, out = eq.split("->")
    subs = lhs.split(",")
    operands = list(node.args[1])
    if len(subs) != 2 or len(operands) != 2 or not all(isinstance(o, Node) for o in operands):
        return None
    if "." in eq:  # "...": the broadcast axes, spelled out with letters the equation does not use
        subs = [_no_ellipsis(sub, ops.shape(o)) for sub, o in zip(subs, operands)]
        val = node.meta.get("val")
        out = _no_ellipsis(out, tuple(val.shape) if hasattr(val, "shape") else None)
        if None in subs or out is None:
            return None
    return subs, out, operands


def _no_ellipsis(sub: str, shape: tuple | None) -> str | None:
    """``sub`` with its ``...`` replaced by one letter per broadcast axis (right-aligned, as einsum aligns
    them), given the operand's shape; ``None`` if that cannot be done."""
    if "..." not in sub:
        return sub if "." not in sub else None
    if shape is None or sub.count("...") != 1:
        return None
    n = len(shape) - (len(sub) - 3)
    if n < 0 or n > len(_BROADCAST):
        return None
    return sub.replace("...", _BROADCAST[len(_BROADCAST) - n:])


_BROADCAST = "ABCDEFGHIJKLMNOP"  # upper case: never used by the attention and projection equations we read


# -- built-in projections --------------------------------------------------------------------------------

@dataclass
class LinearProjection(ProjectionPattern):
    name: str = "linear"
    targets: frozenset = ops.LINEAR

    def operands(self, node):
        return (node.args[0], node.args[1]) if len(node.args) >= 2 else None


@dataclass
class MatmulProjection(ProjectionPattern):
    """``x @ W`` with ``W`` (in, out): ``mm``, ``matmul``, ``bmm``."""

    name: str = "matmul"
    targets: frozenset = ops._overloads(ops.aten.mm, ops.aten.matmul, ops.aten.bmm)

    def operands(self, node):
        return (node.args[0], node.args[1]) if len(node.args) >= 2 else None


@dataclass
class AddmmProjection(ProjectionPattern):
    """``addmm(bias, x, W)`` with ``W`` (in, out): Hugging Face's ``Conv1D`` (GPT-2's ``c_attn``, ``c_fc``)."""

    name: str = "addmm"
    targets: frozenset = ops._overloads(ops.aten.addmm)

    def operands(self, node):
        return (node.args[1], node.args[2]) if len(node.args) >= 3 else None


@dataclass
class EinsumProjection(ProjectionPattern):
    """``einsum("...i,oi->...o", x, W)`` (or ``"...i,io->...o"``): the last axis of ``x`` is contracted with
    the weight, whose one free axis is the last axis of the result."""

    name: str = "einsum"
    targets: frozenset = ops._overloads(ops.aten.einsum)

    def operands(self, node):
        parts = einsum_parts(node)
        if parts is None:
            return None
        (sx, sw), out, (x, w) = parts
        free_w = [c for c in sw if c not in sx]
        if len(free_w) != 1 or len(sw) != 2 or sx[-1] not in sw or out != sx[:-1] + free_w[0]:
            return None
        return x, w


# -- built-in attention products -------------------------------------------------------------------------

@dataclass
class MatmulProduct(ProductPattern):
    name: str = "matmul"
    targets: frozenset = ops._overloads(ops.aten.matmul, ops.aten.bmm, ops.aten.mm)

    def factors(self, node):
        a, b = node.args[:2]
        return (a, b) if isinstance(a, Node) and isinstance(b, Node) else None


@dataclass
class BaddbmmProduct(ProductPattern):
    """``baddbmm(bias, a, b) = beta·bias + alpha·(a @ b)``: the additive bias (ALiBi, masks) is not a factor."""

    name: str = "baddbmm"
    targets: frozenset = ops._overloads(getattr(ops.aten, "baddbmm", None))

    def factors(self, node):
        if len(node.args) < 3:
            return None
        a, b = node.args[1], node.args[2]
        return (a, b) if isinstance(a, Node) and isinstance(b, Node) else None


@dataclass
class EinsumProduct(ProductPattern):
    name: str = "einsum"
    targets: frozenset = ops._overloads(ops.aten.einsum)

    def factors(self, node):
        parts = einsum_parts(node)
        return tuple(parts[2]) if parts is not None else None  # type: ignore[return-value]

    def keys_factor(self, node, dim):
        parts = einsum_parts(node)
        if parts is None:
            return None
        (s0, s1), out, _ = parts
        axis = out[dim % len(out)]
        has = [axis in s0, axis in s1]
        return has.index(True) if has.count(True) == 1 else None


# -- built-in attention cores ----------------------------------------------------------------------------

@dataclass
class SdpaAttention(AttentionPattern):
    name: str = "sdpa"
    targets: frozenset = ops.SDPA

    def match(self, node, flow):
        from .dataflow import Core

        if len(node.args) < 3:
            return None
        out = node
        if isinstance(node.meta.get("val"), (tuple, list)):  # the flash/efficient variants return a tuple
            out = next((u for u in node.users if u.target is ops.operator.getitem and u.args[1] == 0), node)
        return Core(node, node.args[0], node.args[1], node.args[2], out)


@dataclass
class SoftmaxAttention(AttentionPattern):
    """scores product → (scaling, bias, mask: light ops) → softmax → value product."""

    name: str = "softmax"
    targets: frozenset = ops.SOFTMAX

    def match(self, node, flow):
        from .dataflow import Core, backward, forward, walk

        dim = node.args[1] if len(node.args) > 1 and isinstance(node.args[1], int) else -1
        # scores may be concatenated with learned logits before the softmax (attention sinks): walk through a
        # concatenation whose other inputs come from weights only
        before = [h for h in walk([node], backward, lambda n: flow._light(n) or flow.concat_with_weights(n))
                  if flow.product(h) is not None]
        after = [h for h in walk([node], forward, flow._light) if flow.product(h) is not None]
        if not before or not after:
            return None
        scores, values = before[0], after[0]
        pat_s, pat_v = flow.product(scores), flow.product(values)
        fs, fv = pat_s.factors(scores), pat_v.factors(values)
        ki = pat_s.keys_factor(scores, dim)
        if fs is None or fv is None or ki is None:
            return None
        k, q = fs[ki], fs[1 - ki]
        # the value factor is the one that does not come from the softmax
        from_probs = [f is node or node in walk([f], backward, flow._light) for f in fv]
        if from_probs.count(True) != 1:
            return None
        v = fv[from_probs.index(False)]
        return Core(values, q, k, v, values)


# -- built-in feed-forward blocks ------------------------------------------------------------------------

@dataclass
class GatedFfn(FfnPattern):
    """``out(act(gate(x)) ⊙ up(x))``: two input projections of the same input; the one whose output passes the
    activation before the element-wise product is ``gate``, the other ``up``."""

    name: str = "gated"

    def roles(self, ins, out, flow):
        if len(ins) != 2 or [a for _, a in ins].count(True) != 1:
            return None
        (g,) = [p for p, a in ins if a]
        (u,) = [p for p, a in ins if not a]
        if g.x is not u.x:
            return None
        reach_g = set(flow.light_reach(g.node))
        products = [n for n in flow.light_reach(u.node) if n in reach_g and ops.is_kind(n, ops.MUL)]
        if not products:
            return None
        return {"gate": [g], "up": [u], "out": [out]}


def _activation_on_path(flow: "Dataflow", src: Node, value: Node) -> tuple[bool, Node | None]:
    """Whether ``value`` is computed from ``src`` through light ops, and the activation on that path if any."""
    stack, seen = [(value, None)], set()
    reached, act = False, None
    while stack:
        n, a = stack.pop()
        if n is src:
            reached, act = True, act or a
            continue
        if n in seen or (n is not value and ops.is_heavy(n)):
            continue
        seen.add(n)
        a2 = n if ops.is_kind(n, ops.ACTIVATION) else a
        stack.extend((i, a2) for i in ops.tensor_inputs(n))
    return reached, act


@dataclass
class FusedGatedFfn(FfnPattern):
    """One projection makes both halves: ``out(act(g) ⊙ u)`` with ``g, u`` slices of its output (a fused
    ``gate_up`` matrix). Roles ``gate`` and ``up`` are slice sites of the one projection."""

    name: str = "fused-gated"

    def roles(self, ins, out, flow):
        if len(ins) != 1 or not ins[0][1]:
            return None
        p = ins[0][0]
        for m in flow.light_reach(p.node):
            if not ops.is_kind(m, ops.MUL) or len(m.args) < 2 or not all(isinstance(a, Node) for a in m.args[:2]):
                continue
            traced = [_activation_on_path(flow, p.node, a) for a in m.args[:2]]
            if not all(r for r, _ in traced) or [act is not None for _, act in traced].count(True) != 1:
                continue
            gi = 0 if traced[0][1] is not None else 1
            act = traced[gi][1]
            gate_value = next((i for i in ops.tensor_inputs(act)), None)
            up_value = m.args[1 - gi]
            if gate_value is None:
                continue
            # the two halves must read disjoint channels (x · act(x), e.g. a tanh-approximated GELU written
            # out, is a plain MLP's activation, not a gate)
            g_ch, u_ch = flow.channels(p.node, gate_value), flow.channels(p.node, up_value)
            if not g_ch or not u_ch or set(g_ch) & set(u_ch):
                continue
            return {"gate": [p], "up": [p], "out": [out]}, {"gate": gate_value, "up": up_value}
        return None


@dataclass
class PlainFfn(FfnPattern):
    """``out(act(in(x)))``; several activated input projections keep the role ``in`` (their keys differ)."""

    name: str = "plain"

    def roles(self, ins, out, flow):
        if not any(a for _, a in ins):
            return None
        return {"in": [p for p, _ in ins], "out": [out]}


# -- built-in residual branches ---------------------------------------------------------------------------

def _is_activation_value(flow: "Dataflow", branch: "Branch", node) -> bool:
    """A value of the branch computed from its stream input (not a weight, a mask or an index)."""
    if not isinstance(node, Node) or node not in branch.region:
        return False
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point and flow.weight_of(node) is None


def _splits_channels(flow: "Dataflow", value: Node, axis: int) -> bool:
    """Whether ``value``'s ``axis`` holds different output channels of the projection it comes from (a view of
    ``(tokens, 2 * d)`` as ``(tokens, 2, d)`` whose halves are read one by one: a fused gate and up), found by
    replaying the shape ops on channel indices; a token axis holds the same channels at every index."""
    p = flow.projection_into(value)
    chans = flow._index_closure(p.node).get(value) if p is not None else None
    if not isinstance(chans, torch.Tensor) or chans.dim() <= axis or chans.shape[axis] < 2:
        return False
    return bool((chans != chans.narrow(axis, 0, 1)).any())


def _after_the_sublayer(flow: "Dataflow", branch: "Branch", n: Node) -> bool:
    """Whether ``n`` works on the branch's finished output: no weighted op of the branch reads its result (also
    through in-place writes into a buffer: RWKV's recurrence fills its output step by step), and a projection back
    to the stream's width (the branch value's) comes before it."""
    out = ops.shape(branch.value)
    if not out:
        return False
    seen: set[Node] = set()
    todo = list(n.users)
    while todo:
        u = todo.pop()
        if u in seen or u not in branch.region:
            continue
        seen.add(u)
        if u in flow.projections or u in flow.opaque:
            return False
        todo.extend([*u.users, *flow.writes_into.get(u, ())])  # a write into a buffer reaches the buffer's readers
    seen, todo = set(), list(n.all_input_nodes)
    while todo:
        u = todo.pop()
        if u in seen or u not in branch.region:
            continue
        seen.add(u)
        p = flow.projections.get(u)
        if p is not None and p.out_features == out[-1]:
            return True
        todo.extend(u.all_input_nodes)
    return False


@dataclass
class TokenMixingBranch(BranchPattern):
    """A branch that combines different token positions: a convolution whose kernel spans more than one position
    (Mamba's causal conv, LFM's short conv), a product of two activations that is not a projection (linear
    attention, the state updates of an SSM or a recurrence), a cumulative sum/product over activations (chunked
    scans) or a loop over the positions (an activation of three or more axes read one position at a time along
    an inner axis: RWKV's recurrence, an unrolled scan). Its kind is ``mixer``.

    Token mixing applied to a sub-layer's finished output (no weight reads it and a projection back to the
    stream's width comes before it: Inkling's short convolution after its FFN) post-processes that output, as a
    norm would: it does not make the sub-layer a mixer."""

    name: str = "token-mixing"

    def classify(self, branch, flow):
        return "mixer" if any(not _after_the_sublayer(flow, branch, n) for n in self._mixing(branch, flow)) else None

    @staticmethod
    def _mixing(branch, flow):
        """The ops of the branch that combine token positions (see the class)."""
        positions: dict[tuple, set] = {}  # (activation, axis) -> indices selected (a loop over the tokens)
        for n in branch.region:
            if ops.is_kind(n, ops.SELECT) and len(n.args) >= 3 and _is_activation_value(flow, branch, n.args[0]):
                xs = ops.shape(n.args[0])
                if xs is not None and len(xs) >= 3 and isinstance(n.args[1], int) and n.args[1] % len(xs) not in (
                        0, len(xs) - 1) and isinstance(n.args[2], int):
                    seen = positions.setdefault((n.args[0], n.args[1] % len(xs)), set())
                    seen.add(n.args[2])
                    if len(seen) >= 2 and not _splits_channels(flow, n.args[0], n.args[1] % len(xs)):
                        yield n
            if n.op != "call_function":
                continue
            if ops.is_kind(n, ops.CONV) and len(n.args) > 1 and isinstance(n.args[1], Node):
                w = ops.shape(n.args[1])
                if w is not None and len(w) >= 3 and max(w[2:]) > 1 and _is_activation_value(flow, branch, n.args[0]):
                    yield n
            elif n not in flow.projections and flow.product(n) is not None:
                fs = flow.product(n).factors(n)
                if fs and all(_is_activation_value(flow, branch, f) for f in fs):
                    yield n
            elif ops.is_kind(n, ops.CUMULATIVE) and n.args and _is_activation_value(flow, branch, n.args[0]):
                xs = ops.shape(n.args[0])
                if xs is not None and len(xs) >= 3:
                    yield n


@dataclass
class PositionWiseBranch(BranchPattern):
    """Any other branch with a weight matrix on it maps each token on its own: a feed-forward block (e.g. a
    mixture of experts whose experts are one batched 3-D parameter, routed by a top-k)."""

    name: str = "position-wise"

    def classify(self, branch, flow):
        return "ffn"


for _p in (LinearProjection(), MatmulProjection(), AddmmProjection(), EinsumProjection(),
           MatmulProduct(), BaddbmmProduct(), EinsumProduct(),
           SdpaAttention(), SoftmaxAttention(),
           GatedFfn(), FusedGatedFfn(), PlainFfn(),
           TokenMixingBranch(), PositionWiseBranch()):
    register_pattern(_p, first=False)
