"""Dataflow patterns on the captured graph: projections, attention cores, feed-forward blocks.

Nothing here looks at module or parameter *names*: projections are ops whose weight operand is a
parameter, attention cores are scaled-dot-product-attention ops or matmul → softmax → matmul, and
feed-forward blocks are projection → non-linearity → projection.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch.fx

from ..capture import Captured
from . import ops

Node = torch.fx.Node
SLICING = ops._overloads(
    ops.aten.select, ops.aten.slice, ops.aten.split, ops.aten.split_with_sizes, ops.aten.chunk,
    ops.aten.unbind, ops.aten.narrow,
) | frozenset({ops.operator.getitem})


@dataclass(eq=False)
class Projection:
    """A linear map of an activation by a parameter matrix (``aten.linear``, ``mm``, ``addmm`` ...)."""

    node: Node
    x: Node
    param: str
    whole: bool  # the parameter is used as a whole, not a slice of a packed matrix
    path: str | None  # leaf module that executed the op and owns the weight (None: packed/borrowed weight)
    in_features: int
    out_features: int


@dataclass(eq=False)
class Core:
    """An attention core: ``softmax(q kᵀ) v`` in one op or three."""

    node: Node
    q: Node
    k: Node
    v: Node
    out: Node


@dataclass(eq=False)
class Block:
    kind: str  # "attn" | "ffn"  (attention is refined to self_attn / cross_attn by the stream pass)
    projections: dict[str, list[Projection]]  # role -> projections (ffn "in" may have two: gated)
    core: Core | None = None
    residual_add: Node | None = None
    residual: Node | None = None  # the residual-stream operand of the add
    output: Node | None = None  # the block's output just before the residual add
    # filled by later passes
    block: str = ""
    stack: str = ""
    layer: int = -1
    layer_path: str | None = None
    block_path: str = ""
    output_path: str | None = None
    extra: dict = field(default_factory=dict)

    def all_projections(self) -> list[Projection]:
        return [p for ps in self.projections.values() for p in ps]

    def first(self) -> Projection:
        return min(self.all_projections(), key=lambda p: p._order)  # type: ignore[attr-defined]

    def last(self) -> Projection:
        return max(self.all_projections(), key=lambda p: p._order)  # type: ignore[attr-defined]


def walk(
    start: Iterable[Node],
    step: Callable[[Node], Iterable[Node]],
    passable: Callable[[Node], bool],
) -> list[Node]:
    """Breadth-first walk from ``start``; returns the non-passable nodes reached (in BFS order)."""
    seen: set[Node] = set()
    hits: list[Node] = []
    queue = deque()
    for s in start:
        for n in step(s):
            queue.append(n)
    while queue:
        n = queue.popleft()
        if n in seen:
            continue
        seen.add(n)
        if passable(n):
            queue.extend(step(n))
        else:
            hits.append(n)
    return hits


def backward(n: Node) -> list[Node]:
    return ops.tensor_inputs(n)


def forward(n: Node) -> list[Node]:
    return list(n.users)


def _param_source(cap: Captured, node: Node) -> tuple[str, bool] | None:
    """Follow a weight operand back through shape/slicing ops to the parameter it comes from."""
    whole = True
    while node.op == "call_function" and node.target in ops.SHAPE:
        if node.target in SLICING:
            whole = False
        inputs = [a for a in node.all_input_nodes]
        if len(inputs) != 1:
            return None
        node = inputs[0]
    name = cap.param_of(node)
    return (name, whole) if name else None


class Dataflow:
    """Finds the transformer building blocks of one captured graph."""

    def __init__(self, cap: Captured, leaf_modules: set[str] | None = None):
        self.cap = cap
        self.leaf_modules = leaf_modules
        self.nodes = list(cap.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.projections: dict[Node, Projection] = {}
        self._find_projections()

    # -- projections -------------------------------------------------------------------------
    def _make_projection(self, node: Node, x: Node, w: Node) -> Projection | None:
        src = _param_source(self.cap, w)
        if src is None or not isinstance(x, Node):
            return None
        param, whole = src
        xs, ys = ops.shape(x), ops.shape(node)
        if not xs or not ys:
            return None
        owner = self.cap.module_path(node)
        path = None
        if whole and owner is not None:
            prefix = owner + "." if owner else ""
            local = param[len(prefix):] if param.startswith(prefix) else None
            leaf = self.leaf_modules is None or owner in self.leaf_modules
            if local is not None and "." not in local and leaf:
                path = owner
        p = Projection(node, x, param, whole, path, xs[-1], ys[-1])
        p._order = self.order[node]  # type: ignore[attr-defined]
        return p

    def _find_projections(self) -> None:
        for n in self.nodes:
            if n.op != "call_function":
                continue
            p = None
            if n.target in ops.LINEAR:
                p = self._make_projection(n, n.args[0], n.args[1])
            elif n.target in ops.MATMUL and n.target not in ops._overloads(ops.aten.einsum):
                a, b = (n.args[1], n.args[2]) if n.target in ops._overloads(ops.aten.addmm) else n.args[:2]
                if isinstance(b, Node) and _param_source(self.cap, b) and not (
                    isinstance(a, Node) and _param_source(self.cap, a)
                ):
                    p = self._make_projection(n, a, b)
            if p is not None:
                self.projections[n] = p

    def is_projection(self, n: Node) -> bool:
        return n in self.projections

    def _light(self, n: Node) -> bool:
        return not ops.is_heavy(n)

    # -- attention ---------------------------------------------------------------------------
    def cores(self) -> list[Core]:
        out: list[Core] = []
        for n in self.nodes:
            if ops.is_kind(n, ops.SDPA):
                val = n.meta.get("val")
                res = n
                if isinstance(val, (tuple, list)):
                    res = next((u for u in n.users if u.target is ops.operator.getitem and u.args[1] == 0), n)
                out.append(Core(n, n.args[0], n.args[1], n.args[2], res))
            elif ops.is_kind(n, ops.SOFTMAX):
                core = self._matmul_softmax_matmul(n)
                if core is not None:
                    out.append(core)
        return out

    def _matmul_softmax_matmul(self, sm: Node) -> Core | None:
        is_mm = lambda n: ops.is_kind(n, ops.MATMUL) and n not in self.projections  # noqa: E731
        before = [h for h in walk([sm], backward, self._light) if is_mm(h)]
        after = [h for h in walk([sm], forward, self._light) if is_mm(h)]
        if not before or not after:
            return None
        m1, m2 = before[0], after[0]
        if len(m1.args) < 2 or len(m2.args) < 2:
            return None
        return Core(m2, m1.args[0], m1.args[1], m2.args[1], m2)

    def projection_into(self, value: Node) -> Projection | None:
        """The nearest projection upstream of ``value`` through light ops."""
        if value in self.projections:
            return self.projections[value]
        hits = walk([value], backward, self._light)
        for h in hits:
            if h in self.projections:
                return self.projections[h]
        return None

    def projection_from(self, value: Node, exclude: set[Node]) -> Projection | None:
        """The nearest projection downstream of ``value`` through light ops."""
        hits = walk([value], forward, self._light)
        for h in hits:
            if h in self.projections and h not in exclude:
                return self.projections[h]
        return None

    def residual_of(self, proj: Projection) -> tuple[Node | None, Node | None, Node]:
        """Follow a block's last projection forward through single-input light ops to the residual add.

        Returns ``(add, residual operand, block output before the add)``."""
        cur = proj.node
        for _ in range(64):
            users = list(cur.users)
            if len(users) != 1:
                break
            (u,) = users
            if ops.is_tensor_add(u):
                other = u.args[1] if u.args[0] is cur else u.args[0]
                return u, other, cur
            if ops.is_heavy(u) or len([a for a in ops.tensor_inputs(u)]) != 1:
                break
            cur = u
        return None, None, cur

    # -- blocks ------------------------------------------------------------------------------
    def blocks(self) -> list[Block]:
        blocks: list[Block] = []
        used: set[Node] = set()
        for core in self.cores():
            projs = {}
            for role, val in (("q", core.q), ("k", core.k), ("v", core.v)):
                p = self.projection_into(val)
                if p is not None:
                    projs[role] = [p]
            o = self.projection_from(core.out, exclude=set())
            if o is not None:
                projs["o"] = [o]
            if "o" not in projs and not projs:
                continue
            b = Block("attn", projs, core=core)
            used.update(p.node for p in b.all_projections())
            blocks.append(b)
        for b in blocks:
            b.residual_add, b.residual, b.output = self.residual_of(b.last())
        barriers = {b.residual_add for b in blocks if b.residual_add is not None}
        blocks.extend(self._ffns(used, barriers))
        blocks.sort(key=lambda b: self.order[b.first().node])
        return blocks

    def _ffns(self, used: set[Node], barriers: set[Node]) -> list[Block]:
        """projection → (non-linearity) → projection, with the output back at the input's width."""
        groups: dict[Node, list[tuple[Projection, bool]]] = {}
        for n, p in self.projections.items():
            if n in used:
                continue
            seen: set[tuple[Node, bool]] = set()
            queue = deque((u, False) for u in n.users)
            while queue:
                m, act = queue.popleft()
                if (m, act) in seen:
                    continue
                seen.add((m, act))
                if m in self.projections:
                    if m not in used:
                        groups.setdefault(m, []).append((p, act))
                    continue
                if ops.is_heavy(m) or m in barriers:
                    continue
                act2 = act or ops.is_kind(m, ops.ACTIVATION)
                queue.extend((u, act2) for u in m.users)
        out = []
        for o_node, ins in groups.items():
            o = self.projections[o_node]
            in_projs = {}
            for p, act in ins:
                in_projs.setdefault(p.node, [p, False])[1] |= act
            if not any(a for _, a in in_projs.values()):
                continue
            ins_ok = [p for p, _ in in_projs.values() if p.in_features == o.out_features]
            if not ins_ok:
                continue
            b = Block("ffn", {"in": sorted(ins_ok, key=lambda p: self.order[p.node]), "out": [o]})
            b.residual_add, b.residual, b.output = self.residual_of(o)
            out.append(b)
        # a projection may be the "out" of one candidate and an "in" of another: keep disjoint blocks
        taken: set[Node] = set()
        final = []
        for b in sorted(out, key=lambda b: self.order[b.first().node]):
            nodes = {p.node for p in b.all_projections()}
            if nodes & taken:
                continue
            taken |= nodes
            final.append(b)
        return final
