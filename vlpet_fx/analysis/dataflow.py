"""Dataflow on the captured graph: projections, attention cores, feed-forward blocks, packed q/k/v slices.

Nothing here looks at module or parameter *names*. The building blocks are recognised by the registered
patterns (:mod:`.patterns`): projections are ops whose weight operand is a parameter, attention cores are
scaled-dot-product-attention ops or scores → softmax → values (matmul, bmm, baddbmm or einsum), feed-forward
blocks are projection → non-linearity → projection (gated: two input projections meeting in a product). When
one projection makes q, k and v, the channels each reads are found by replaying the shape ops between them
on a tensor of channel indices (:meth:`Dataflow.channels`).
"""

from __future__ import annotations

import operator

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.fx

from ..capture import Captured
from . import ops, patterns

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
    pattern: str = ""  # the projection pattern that matched


@dataclass(eq=False)
class Core:
    """An attention core: ``softmax(q kᵀ) v`` in one op or three."""

    node: Node
    q: Node
    k: Node
    v: Node
    out: Node
    pattern: str = ""  # the attention pattern that matched


@dataclass(eq=False)
class Branch:
    """A residual branch ``x + f(x)``: the residual add, its stream operand ``x``, the branch value ``f(x)`` and
    the region (every node on a path from ``x`` to ``f(x)``, the value included)."""

    add: Node
    stream: Node
    value: Node
    region: frozenset
    projections: list[Projection] = field(default_factory=list)  # the projections inside, in graph order
    operand: Node | None = None  # the add's other operand when it is not ``stream`` (a parallel layout)


@dataclass(eq=False)
class Block:
    kind: str  # "attn" | "ffn" | "mixer"  (attention is refined to self_attn / cross_attn by the stream pass)
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

    branch: Branch | None = None  # set when the block was found (or completed) as a residual branch

    def all_projections(self) -> list[Projection]:
        return [p for ps in self.projections.values() for p in ps]

    def first(self) -> Projection:
        return min(self.all_projections(), key=lambda p: p._order)  # type: ignore[attr-defined]

    def last(self) -> Projection:
        return max(self.all_projections(), key=lambda p: p._order)  # type: ignore[attr-defined]

    def start_node(self) -> Node:
        """The block's first node in graph order: its first projection, or (a branch without projections, e.g.
        a mixture of batched experts) the first node of its branch."""
        if self.all_projections():
            return self.first().node
        return self.extra["start"]

    def end_node(self) -> Node:
        """The block's last projection, or (without projections) its output value."""
        return self.last().node if self.all_projections() else self.output

    def widths(self) -> tuple[int, int]:
        """(input width, output width) of the block's ``output`` site."""
        if self.all_projections() and self.branch is None:
            return self.first().in_features, self.last().out_features
        xs, ys = ops.shape(self.residual), ops.shape(self.output)
        return (xs[-1] if xs else 0), (ys[-1] if ys else 0)


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


def in_place_writes(nodes: list[Node]) -> tuple[dict[Node, list[Node]], dict[Node, list[Node]]]:
    """In-place writes into a tensor (``out[:, t] = step`` in a loop over the tokens: ``copy_`` into a view of a
    buffer made by ``zeros_like``): the buffer's readers depend on the write, which the graph's edges do not
    show. Returns (buffer -> the mutating nodes that write into it, mutating node -> the buffers it writes)."""
    written_by: dict[Node, list[Node]] = {}
    writes_into: dict[Node, list[Node]] = {}
    for n in nodes:
        schema = getattr(n.target, "_schema", None) if n.op == "call_function" else None
        if schema is None or not schema.arguments or not n.args or not isinstance(n.args[0], Node):
            continue
        alias = schema.arguments[0].alias_info
        if alias is None or not alias.is_write:
            continue
        base = n.args[0]
        while base.op == "call_function" and base.target in ops.SHAPE and base.args and isinstance(base.args[0], Node):
            base = base.args[0]  # the tensor whose view was written
        written_by.setdefault(base, []).append(n)
        writes_into.setdefault(n, []).append(base)
    return written_by, writes_into


_IN_PLACE_SCALE = ops._overloads(ops.aten.mul_, ops.aten.div_)


def _scaled_in_place(node: Node) -> bool:
    """``w.div_(c)`` / ``w.mul_(c)`` by a number (RWKV rescales its output weights in place for inference): the
    result is the same weight, scaled."""
    return node.target in _IN_PLACE_SCALE and len(node.args) == 2 and isinstance(node.args[1], (int, float))


def _through_region(graph_module, node: Node) -> Node | None:
    """For ``getitem(region(..., submodule, *operands), i)`` (a higher-order op running a sub-graph, e.g. the
    ``torch.no_grad()`` block of ``wrap_with_set_grad_enabled``) whose i-th result is one of its operands up to
    shape ops and in-place scaling: that operand in the outer graph; otherwise None."""
    if node.target is not operator.getitem or len(node.args) != 2 or not isinstance(node.args[1], int):
        return None
    region = node.args[0]
    if not isinstance(region, Node) or region.op != "call_function" or ops.is_aten(region.target):
        return None
    at = next((i for i, a in enumerate(region.args) if isinstance(a, Node) and a.op == "get_attr"), None)
    sub = getattr(graph_module, region.args[at].target, None) if at is not None else None
    if not isinstance(sub, torch.fx.GraphModule):
        return None
    inner_inputs = [n for n in sub.graph.nodes if n.op == "placeholder"]
    out = next((n for n in sub.graph.nodes if n.op == "output"), None)
    results = out.args[0] if out is not None else None
    if not isinstance(results, (tuple, list)) or not 0 <= node.args[1] < len(results):
        return None
    inner = results[node.args[1]]
    while isinstance(inner, Node) and inner.op == "call_function" and (
            inner.target in ops.SHAPE or _scaled_in_place(inner)) and inner.args and isinstance(inner.args[0], Node):
        inner = inner.args[0]
    if not isinstance(inner, Node) or inner not in inner_inputs:
        return None
    operands = region.args[at + 1:]
    j = inner_inputs.index(inner)
    return operands[j] if j < len(operands) and isinstance(operands[j], Node) else None


def _param_source(cap: Captured, node: Node) -> tuple[str, bool] | None:
    """Follow a weight operand back through shape/slicing ops to the parameter it comes from."""
    whole = True
    graph_module = cap.graph_module
    while node.op == "call_function":
        region = _through_region(graph_module, node)
        if region is not None:  # a value returned by a no-grad / autocast region: follow it inside and back out
            node = region
            continue
        if node.target not in ops.SHAPE and not _scaled_in_place(node):
            break
        if node.target in SLICING:
            whole = False
        inputs = [a for a in node.all_input_nodes]
        if len(inputs) != 1:
            return None
        node = inputs[0]
    name = cap.param_of(node)
    return (name, whole) if name else None


class Dataflow:
    """Finds the transformer building blocks of one captured graph (with the registered patterns)."""

    def __init__(self, cap: Captured, leaf_modules: set[str] | None = None):
        self.cap = cap
        self.leaf_modules = leaf_modules
        self.nodes = list(cap.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.projections: dict[Node, Projection] = {}
        self._products: dict[Node, patterns.ProductPattern | None] = {}
        self._closures: dict[Node, dict[Node, object]] = {}
        self._find_projections()
        # ops outside ATen (library custom ops, e.g. a grouped matrix product over experts) that map by a weight
        # of two or more axes: heavy for every walk, as a projection is
        self.opaque: set[Node] = {n for n in self.nodes if n.op == "call_function" and not ops.is_aten(n.target)
                                  and n not in self.projections and self._weighted(n)}
        self.written_by, self.writes_into = in_place_writes(self.nodes)
        self.written = self._written_buffers()

    # -- buffers filled by in-place writes ----------------------------------------------------
    def _written_buffers(self) -> dict[Node, list[Node]]:
        """Fresh tensors (``new_empty``, ``zeros`` ...) whose values come from in-place copies into them or into
        views of them (multi-head latent attention's key: the non-rotary part and the shared rotary part copied
        into the two halves of an empty tensor): buffer -> the values copied in, in graph order (from
        :func:`in_place_writes`)."""
        out: dict[Node, list[Node]] = {}
        for buf, writers in self.written_by.items():
            if buf.op != "call_function" or buf.target not in _FRESH:
                continue
            copied = [w.args[1] for w in writers
                      if w.target in _WRITE and len(w.args) > 1 and isinstance(w.args[1], Node)]
            if copied:
                out[buf] = copied
        return out

    def back(self, n: Node) -> list[Node]:
        """The values ``n`` is computed from: the values copied into it for a buffer filled in place (its operand
        only gives the shape), else its tensor inputs."""
        return self.written.get(n) or ops.tensor_inputs(n)

    # -- projections -------------------------------------------------------------------------
    def _make_projection(self, node: Node, x: Node, w: Node, pattern: patterns.ProjectionPattern) -> Projection | None:
        if not isinstance(x, Node) or not isinstance(w, Node):
            return None
        src = _param_source(self.cap, w)
        if src is None or _param_source(self.cap, x) is not None:
            return None
        feats = pattern.features(node, x, w)
        if not feats:
            return None
        param, whole = src
        owner = self.cap.module_path(node)
        path = None
        if whole and owner is not None:
            prefix = owner + "." if owner else ""
            local = param[len(prefix):] if param.startswith(prefix) else None
            leaf = self.leaf_modules is None or owner in self.leaf_modules
            if local is not None and "." not in local and leaf:
                path = owner
        p = Projection(node, x, param, whole, path, feats[0], feats[1], pattern.name)
        p._order = self.order[node]  # type: ignore[attr-defined]
        return p

    def _find_projections(self) -> None:
        pats = patterns.patterns("projection")
        for n in self.nodes:
            if n.op != "call_function":
                continue
            for pat in pats:
                if not pat.anchors(n):
                    continue
                xw = pat.operands(n)
                p = self._make_projection(n, xw[0], xw[1], pat) if xw else None
                if p is not None:
                    self.projections[n] = p
                    break

    def product(self, n: Node) -> patterns.ProductPattern | None:
        """The product pattern (attention scores or values) ``n`` matches; projections are not products."""
        if n not in self._products:
            found = None
            if n.op == "call_function" and n not in self.projections:
                found = next((p for p in patterns.patterns("product") if p.anchors(n) and p.factors(n)), None)
            self._products[n] = found
        return self._products[n]

    def light_reach(self, start: Node) -> list[Node]:
        """Nodes reachable forward from ``start`` through light ops (the light ones and the first heavy ones)."""
        seen: dict[Node, None] = {}
        queue = deque(start.users)
        while queue:
            n = queue.popleft()
            if n in seen:
                continue
            seen[n] = None
            if self._light(n):
                queue.extend(n.users)
        return list(seen)

    def concat_with_weights(self, n: Node) -> bool:
        """A concatenation of one activation with attention sinks: values made from weights only (learned
        logits), through light ops, or one value per row along the concatenated axis (a sink logit computed for
        each query)."""
        if not ops.is_kind(n, ops.CONCAT) or not n.args or not isinstance(n.args[0], (list, tuple)):
            return False
        parts = [a for a in n.args[0] if isinstance(a, Node)]
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)

        def sink(a: Node) -> bool:
            shape = ops.shape(a)
            one = isinstance(dim, int) and shape is not None and len(shape) > 0 and shape[dim] == 1
            return one or self._weights_only(a)

        return len(parts) >= 2 and sum(not sink(a) for a in parts) == 1

    def _weights_only(self, node: Node) -> bool:
        seen, todo = set(), [node]
        while todo:
            m = todo.pop()
            if m in seen:
                continue
            seen.add(m)
            if m.op == "placeholder":
                if self.cap.param_of(m) is None:
                    return False
                continue
            if m.op != "call_function" or not self._light(m):
                return False
            todo.extend(m.all_input_nodes)
        return True

    def is_projection(self, n: Node) -> bool:
        return n in self.projections

    def _light(self, n: Node) -> bool:
        return not ops.is_heavy(n) and n not in self.opaque

    # -- attention ---------------------------------------------------------------------------
    def cores(self) -> list[Core]:
        out: list[Core] = []
        pats = patterns.patterns("attention")
        for n in self.nodes:
            for pat in pats:
                if pat.anchors(n):
                    core = pat.match(n, self)
                    if core is not None:
                        core.pattern = core.pattern or pat.name
                        out.append(core)
                        break
        return out

    def projection_into(self, value: Node) -> Projection | None:
        """The nearest projection upstream of ``value`` through light ops."""
        if value in self.projections:
            return self.projections[value]
        hits = walk([value], self.back, self._light)
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

    # keys/values joined from several parts (local attention's neighbouring blocks, a merged self + cross
    # attention, a value made of two projections) and two attention outputs joined before one output projection
    def _inside_core_module(self, core: Core, found: list[Projection]) -> list[Projection]:
        """The projections that run inside the module that runs the attention core (a concatenation does not
        lead out of the attention to another layer's projections)."""
        scope = self.cap.module_path(core.node)
        if scope is None:
            return found
        return [p for p in found if scope in self.cap.module_stack(p.node)]

    def joined_into(self, value: Node, core: Core) -> list[Projection]:
        """The projections upstream of ``value`` through light ops and concatenations, when no projection is
        reached through light ops alone (each part of a concatenated key or value is a site)."""
        hits = walk([value], self.back, lambda n: self._light(n) or ops.is_kind(n, ops.CONCAT))
        found = list(dict.fromkeys(self.projections[h] for h in hits if h in self.projections))
        return self._inside_core_module(core, found)

    def joined_from(self, core: Core) -> Projection | None:
        """The nearest projection downstream of the core through light ops and concatenations, inside the
        attention's module."""
        hits = walk([core.out], forward, lambda n: self._light(n) or ops.is_kind(n, ops.CONCAT))
        found = self._inside_core_module(core, [self.projections[h] for h in hits if h in self.projections])
        return found[0] if found else None

    def _mixed_groups(self, b: Block, used: set[Node]) -> None:
        """An attention whose output projection works per group of heads (a block-diagonal weight in a batched
        matrix product), its groups then flattened into one vector per token for a second projection that mixes
        them: the value before the second projection is wider than the first one's ``out_features``, so it is no
        site of that width; the block goes on through the second projection (a second ``o``) to its output. Only
        where no residual add was reached and the wider value is the second projection's input alone."""
        o = b.projections.get("o")
        if b.residual_add is not None or not o or b.last() is not o[-1]:
            return
        shape = ops.shape(b.output)
        users = list(b.output.users)
        if not shape or shape[-1] == o[-1].out_features or len(users) != 1:
            return
        nxt = self.projections.get(users[0])
        if nxt is None or nxt.x is not b.output or nxt.node in used or nxt.in_features != shape[-1]:
            return
        o.append(nxt)
        used.add(nxt.node)
        b.residual_add, b.residual, b.output = self.residual_of(nxt)

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
        seen_blocks: set[frozenset] = set()
        for core in self.cores():
            projs: dict[str, list[Projection]] = {}
            for role, val in (("q", core.q), ("k", core.k), ("v", core.v)):
                p = self.projection_into(val) if isinstance(val, Node) else None
                found = [p] if p is not None else self.joined_into(val, core) if isinstance(val, Node) else []
                if found:
                    projs[role] = found
            slices = self.shared_slices(projs, {"q": core.q, "k": core.k, "v": core.v})
            o = self.projection_from(core.out, exclude=set()) or self.joined_from(core)
            if o is not None and not projs:
                # an attention projecting none of q, k, v (a learned probe weighing stacked values: attention
                # over a model's depth) owns no projection outside its module: the next one is another layer's
                o = next(iter(self._inside_core_module(core, [o])), None)
            if o is not None:
                projs["o"] = [o]
            if not projs:
                continue
            # cores that share every projection (two softmaxes of one attention: differential attention) are
            # one block
            signature = frozenset((role, p.node) for role, ps in projs.items() for p in ps)
            if signature in seen_blocks:
                continue
            seen_blocks.add(signature)
            b = Block("attn", projs, core=core)
            b.extra["slices"] = slices
            used.update(p.node for p in b.all_projections())
            blocks.append(b)
        for b in blocks:
            b.residual_add, b.residual, b.output = self.residual_of(b.last())
            self._mixed_groups(b, used)
        barriers = {b.residual_add for b in blocks if b.residual_add is not None}
        blocks.extend(self._ffns(used, barriers))
        blocks.extend(self._branch_blocks(blocks))
        blocks.sort(key=lambda b: self.order[b.start_node()])
        return blocks

    # -- residual branches -------------------------------------------------------------------
    def weight_of(self, node: Node) -> tuple[str, tuple[int, ...]] | None:
        """``(parameter, shape)`` if ``node`` is a parameter or comes from one through shape ops only."""
        while node.op == "call_function" and node.target in ops.SHAPE:
            inputs = node.all_input_nodes
            if len(inputs) != 1:
                return None
            node = inputs[0]
        name = self.cap.param_of(node)
        if name is None:
            return None
        return name, ops.shape(node) or ()

    def _weighted(self, n: Node) -> bool:
        """A projection, or an op that maps by a weight of two or more axes (a convolution, a batched or grouped
        matrix product with one weight per expert); a norm's or a bias's vector is not one."""
        if n in self.projections:
            return True
        if n.op != "call_function" or ops.is_kind(n, ops.EMBEDDING):
            return False
        for a in n.all_input_nodes:
            w = self.weight_of(a)
            if w is not None and len(w[1]) >= 2:
                return True
        return False

    def _region(self, stream: Node, value: Node) -> frozenset | None:
        """Every node on a path from ``stream`` to ``value`` (``value`` included), or None if there is none."""
        lo = self.order[stream]
        ancestors: set[Node] = set()
        todo, reached = [value], False
        while todo:
            n = todo.pop()
            if n in ancestors:
                continue
            ancestors.add(n)
            for i in [*n.all_input_nodes, *self.written_by.get(n, ())]:
                if i is stream:
                    reached = True
                elif self.order[i] > lo:
                    todo.append(i)
        if not reached:
            return None
        region: set[Node] = set()
        todo = [stream]
        while todo:
            n = todo.pop()
            for u in [*n.users, *self.writes_into.get(n, ())]:
                if u in ancestors and u not in region:
                    region.add(u)
                    todo.append(u)
        return frozenset(region)

    def residual_branches(self) -> list[Branch]:
        """Every ``x + f(x)`` on a token sequence (batch, tokens, channels) whose branch ``f`` holds a weight
        matrix, with ``x`` and ``f(x)`` of the add's shape; a branch inside another's region (an inner residual) is
        left out."""
        found: list[Branch] = []
        for n in self.nodes:
            if not ops.is_tensor_add(n):
                continue
            ys = ops.shape(n)
            val = n.meta.get("val")
            # a token sequence (batch, tokens, channels); a convolutional feature map's residual is not a block
            if ys is None or len(ys) != 3 or not isinstance(val, torch.Tensor) or not val.dtype.is_floating_point:
                continue
            a, b = n.args[0], n.args[1]
            if ops.shape(a) != ys or ops.shape(b) != ys:
                continue
            done = False
            for x0, fx in ((a, b), (b, a)):
                # the stream operand may be a copy of the value the branch reads (a cast to float32 for the
                # residual, a view): the branch starts at the value it was copied from
                for x in _aliases(x0):
                    if done or self.order[x] >= self.order[fx]:
                        continue
                    region = self._region(x, fx)
                    if region and any(self._weighted(m) for m in region):
                        projs = sorted((self.projections[m] for m in region if m in self.projections),
                                       key=lambda p: p._order)  # type: ignore[attr-defined]
                        found.append(Branch(n, x, fx, region, projs, operand=x0 if x0 is not x else None))
                        done = True
                if done:
                    break
        found = [br for br in found if not any(br.add in other.region for other in found if other is not br)]
        found = self._on_a_stream(found)
        # parallel layouts, (x + attn(x)) + ffn(x): the add's one operand is a residual add of x, the other
        # is computed from that same x
        by_add = {br.add: br for br in found}
        for n in self.nodes:
            if n in by_add or not ops.is_tensor_add(n) or ops.shape(n) is None or len(ops.shape(n)) != 3:
                continue
            for a, fx in ((n.args[0], n.args[1]), (n.args[1], n.args[0])):
                first = by_add.get(a)
                if first is None or ops.shape(fx) != ops.shape(n) or self.order[first.stream] >= self.order[fx]:
                    continue
                region = self._region(first.stream, fx)
                if region and a not in region and any(self._weighted(m) for m in region):
                    projs = sorted((self.projections[m] for m in region if m in self.projections),
                                   key=lambda p: p._order)  # type: ignore[attr-defined]
                    found.append(Branch(n, first.stream, fx, region, projs, operand=a))
                    break
        return found

    def _on_a_stream(self, found: list[Branch]) -> list[Branch]:
        """The branches whose add can be a residual stream's: a sub-layer's output is added into the stream, so
        its width is the stream's. A stream is two or more branches joined through light ops (one's add reaches
        the next's through the stream); a branch joined to no other one, of a width no stream has, is a residual
        inside a sub-layer (a short convolution with a skip on a key projection's output, read by the attention)
        and is left out. With no stream of two branches found, every branch is kept."""
        adds = {br.add: br for br in found}
        joined: set[Node] = set()
        for br in found:
            reached = [n for n in self.light_reach(br.add) if n in adds and n is not br.add]
            if reached:
                joined.add(br.add)
                joined.update(reached)
        widths = {ops.shape(br.add)[-1] for br in found if br.add in joined}
        if not widths:
            return found
        return [br for br in found if br.add in joined or ops.shape(br.add)[-1] in widths]

    def _branch_blocks(self, blocks: list[Block]) -> list[Block]:
        """Residual branches that complete or add blocks.

        * a branch holding blocks whose residual add was not found (an FFN behind a norm on its output, the
          routed and shared experts of a mixture meeting in a sum) becomes their residual add: the block's
          ``output`` is the branch value (several feed-forward blocks in one branch are one block);
        * a branch holding no block is classified by the ``branch`` patterns: a ``mixer`` (token mixing that is
          not softmax attention) or an ``ffn`` (e.g. experts held as one batched parameter), with the roles of
          the projections that really are there.
        * feed-forward blocks inside a branch the branch patterns call token mixing are replaced by one ``mixer``.
        Branches holding a block whose residual add is known (parallel layouts) are left as they are."""
        claimed = {b.residual_add for b in blocks if b.residual_add is not None}
        new: list[Block] = []
        removed: set[int] = set()
        for br in self.residual_branches():
            inside = [b for b in blocks if id(b) not in removed and (
                any(p.node in br.region for p in b.all_projections())
                or (b.core is not None and b.core.node in br.region))]
            if inside and all(b.kind == "ffn" for b in inside) and all(
                    b.residual_add in (None, br.add) for b in inside):
                # projection → activation → projection found by the ffn patterns may still mix tokens on the way
                # (Mamba's in_proj → conv → scan → out_proj): the branch patterns decide
                kind = next((k for pat in patterns.patterns("branch") if (k := pat.classify(br, self))), None)
                if kind is not None and kind != "ffn":
                    removed.update(id(b) for b in inside)
                    claimed.discard(br.add)
                    inside = []
            if any(b.residual_add is not None for b in inside):
                continue
            # a feed-forward candidate that crosses the branch's residual add (one projection inside, one
            # after it, e.g. a shared expert's sigmoid gate paired with the LM head) is no block
            crossing = [b for b in inside if b.kind == "ffn"
                        and not all(p.node in br.region for p in b.all_projections())]
            removed.update(id(b) for b in crossing)
            inside = [b for b in inside if b not in crossing]
            if inside:
                if len(inside) > 1 and any(b.kind != "ffn" for b in inside):
                    continue
                keep = inside[0]
                if len(inside) > 1:  # e.g. routed + shared experts: one feed-forward block, its roles merged
                    for other in inside[1:]:
                        for role, ps in other.projections.items():
                            keep.projections.setdefault(role, []).extend(ps)
                        keep.extra.setdefault("slices", {}).update(
                            {r: v for r, v in other.extra.get("slices", {}).items() if r not in keep.extra.get("slices", {})})
                        removed.add(id(other))
                self._complete(keep, br)
                claimed.add(br.add)
                continue
            if br.add in claimed:
                continue
            if self._after_a_block(br, [b for b in blocks if id(b) not in removed]):
                continue
            kind = next((k for pat in patterns.patterns("branch") if (k := pat.classify(br, self))), None)
            if kind is None:
                continue
            roles, values = self._branch_roles(kind, br)
            mine = [p.path for ps in roles.values() for p in ps]
            found_paths = {p.path for b in blocks if id(b) not in removed for p in b.all_projections()}
            if mine and None not in mine and all(path in found_paths for path in mine):
                # the same modules as a block found already, called on other tokens (Pegasus-X's global
                # tokens through the attention of its local ones): another call of that block, not a new block
                continue
            b = Block(kind, roles)
            self._complete(b, br)
            b.extra["slices"] = self.shared_slices(b.projections, values)
            b.extra["start"] = min(br.region, key=self.order.__getitem__)
            claimed.add(br.add)
            new.append(b)
        if removed:
            blocks[:] = [b for b in blocks if id(b) not in removed]
        return new

    def _after_a_block(self, br: Branch, blocks: list[Block]) -> bool:
        """Whether the branch's ``x`` is a block's output (its last projection's value through single-input light
        ops: a cast, a view): ``x + f(x)`` is then a skip inside that sub-layer's output path (a short convolution
        with a skip after an attention's output projection), not a sub-layer reading the residual stream."""
        ends = {b.last().node for b in blocks if b.all_projections()}
        x = br.stream
        for _ in range(64):
            if x in ends:
                return True
            ins = ops.tensor_inputs(x) if x.op == "call_function" else []
            if len(ins) != 1 or not self._light(x):
                return False
            x = ins[0]
        return False

    def _complete(self, b: Block, br: Branch) -> None:
        b.branch = br
        b.residual_add, b.residual = br.add, br.operand if br.operand is not None else br.stream
        if br.operand is not None:
            b.extra["stream_x"] = br.stream  # the stream value the parallel branch reads (its block input X)
        # the branch value, or the value a module returned just before it (a scalar multiplier or a cast after
        # the sub-layer, inside the layer's own forward, is not a module's output; nor is a copy made by a module
        # the layer calls on several sub-layers' outputs, e.g. one dropout module after both the attention and
        # the FFN: one site there would stand for every sub-layer)
        add_scope = set(self.cap.module_stack(br.add))
        out = br.value
        while out.op == "call_function":
            own = [p for p in self.cap.module_stack(out) if p not in add_scope]
            if own and not (out.target in _PASS_THROUGH and self.calls_of(own[0]) > 1):
                break
            ins = [i for i in ops.tensor_inputs(out) if i in br.region]
            if len(ins) != 1 or len([i for i in ops.tensor_inputs(out) if ops.shape(i) and len(ops.shape(i)) >= 2]) != 1:
                break
            if ops.shape(ins[0]) != ops.shape(br.value):  # a slice or transpose before it: not the stream's value
                break
            out = ins[0]
        b.output = out

    def calls_of(self, path: str) -> int:
        """How many times the module at ``path`` is called in the captured graph (its distinct call keys)."""
        if not hasattr(self, "_calls"):
            calls: dict[str, set] = {}
            for n in self.nodes:
                for key, (p, _t) in (n.meta.get("nn_module_stack") or {}).items():
                    calls.setdefault(p, set()).add(key)
            self._calls = {p: len(keys) for p, keys in calls.items()}
        return self._calls.get(path, 0)

    def _projection_into_region(self, br: Branch) -> Projection | None:
        """The projection of the branch value's width that the value comes from through light ops on float
        values inside the branch. A router's scores, narrower, are never it: they reach the value through a
        softmax, integer indices, or as the weights the experts' outputs are scaled by."""
        if br.value in self.projections:
            return self.projections[br.value]
        width = (ops.shape(br.value) or (None,))[-1]
        seen, queue = set(), deque(ops.tensor_inputs(br.value))
        while queue:
            n = queue.popleft()
            if n in seen or n not in br.region or not _floaty(n):
                continue
            seen.add(n)
            if n in self.projections:
                if self.projections[n].out_features == width:
                    return self.projections[n]
                continue
            if self._light(n):
                queue.extend(ops.tensor_inputs(n))
        return None

    def _branch_roles(self, kind: str, br: Branch) -> tuple[dict[str, list[Projection]], dict[str, Node]]:
        """Roles of the projections that are really on a new branch block: ``in`` (those reading the stream
        through light ops) and ``out`` (the one the branch value comes from through light ops); for a
        feed-forward block, the ``ffn`` patterns decide (gate/up/out, or in/out)."""
        out = self._projection_into_region(br)
        ins = [p for p in br.projections if p is not out and _reads_through_light(p.x, br.stream)]
        if kind == "ffn" and out is not None:
            candidates = []
            for p in ins:
                reached, act = _nonlinear_between(self, p.node, out.x)
                if reached and p.in_features == out.out_features:
                    candidates.append((p, act))
            found = next((r for pat in patterns.patterns("ffn") if candidates and (r := pat.roles(candidates, out, self))),
                         None)
            if found:
                roles, values = found if isinstance(found, tuple) else (found, {})
                roles = {r: list(ps) for r, ps in roles.items()}
                roles.setdefault("out", [out])
                return roles, values
        roles: dict[str, list[Projection]] = {}
        if kind == "ffn" and out is None:
            return roles, {}  # e.g. routed experts held as one batched parameter: only the block's output
        if ins:
            roles["in"] = ins
        if out is not None:
            roles["out"] = [out]
        return roles, {}

    # -- fused (packed) projections: which output channels feed q, k and v -------------------
    def shared_slices(self, projs: dict[str, list[Projection]], values: dict[str, Node]) -> dict[str, tuple[int, ...]]:
        """For roles made by one projection (q/k/v of a packed matrix, gate/up of a fused one), the output slice
        each reads (``values[role]`` is the value the role stands for); roles whose slice cannot be worked out
        are dropped from ``projs`` (a site must never be a value that a method cannot be added to)."""
        by_node: dict[Node, list[str]] = {}
        for role, ps in projs.items():
            if len(ps) == 1 and role in values:
                by_node.setdefault(ps[0].node, []).append(role)
        slices: dict[str, tuple[int, ...]] = {}
        for node, roles in by_node.items():
            if len(roles) < 2:
                continue
            width = self.projections[node].out_features
            found: dict[str, tuple[tuple[int, ...], set[int]]] = {}
            for role in roles:
                value = values[role]
                chans = self.channels(node, value) if isinstance(value, Node) else None
                spec = slice_of(chans, width)
                if spec is None:
                    del projs[role]
                else:
                    found[role] = (spec, set(chans))
            # roles of one packed projection read disjoint channels; where two overlap (a selection that could
            # not be replayed makes a role look like the whole output) the larger one is dropped
            for role, (spec, chans) in list(found.items()):
                if any(other != role and chans & c2 and len(chans) >= len(c2) for other, (_, c2) in found.items()):
                    del projs[role]
                elif spec != WHOLE:
                    slices[role] = spec
        return slices

    def channels(self, src: Node, value: Node) -> list[int] | None:
        """The output channels (last axis) of ``src`` that ``value`` is made of.

        The shape ops after ``src`` (views, splits, slices, selects, permutes, and element-wise ops that keep the
        shape) are replayed on a tensor of channel indices; ``value``'s channels are the union over the replayed
        tensors it is computed from (through light ops: rotary embeddings, scaling, a concatenation of a
        rotated and a passed-through part). ``None`` if ``value`` is not reached that way."""
        closure = self._index_closure(src)
        if value in closure:
            found = [closure[value]]
        else:
            hits = walk([value], self.back, lambda n: not ops.is_heavy(n) and n not in closure)
            found = [closure[h] for h in hits if h in closure]
        tensors = [t for t in found if isinstance(t, torch.Tensor)]
        if not tensors or len(tensors) != len(found):
            return None
        return [int(c) for c in torch.unique(torch.cat([t.reshape(-1) for t in tensors]))]

    def _constant(self, node: Node) -> torch.Tensor | None:
        """The value of a constant tensor lifted into the graph (e.g. the index of a fixed gather), or None."""
        while node.op == "call_function" and node.target in _PASS_THROUGH | ops._overloads(ops.aten.lift_fresh_copy):
            node = node.args[0]
        ep = self.cap.exported
        if node.op != "placeholder" or ep is None:
            return None
        name = ep.graph_signature.inputs_to_lifted_tensor_constants.get(node.name)
        value = ep.constants.get(name) if name is not None else None
        return value if isinstance(value, torch.Tensor) and value.device.type != "meta" else None

    def _index_closure(self, src: Node) -> dict[Node, object]:
        cache = self._closures
        if src in cache:
            return cache[src]
        ys = ops.shape(src)
        closure: dict[Node, object] = {}
        if ys:
            closure[src] = torch.arange(ys[-1]).expand(ys).contiguous()
            queue = deque(src.users)
            while queue:
                n = queue.popleft()
                if n in closure or n.op != "call_function" or ops.is_heavy(n):
                    continue
                ins = [i for i in n.all_input_nodes if i in closure]
                if len(ins) != 1:
                    continue
                out = _replay(n, ins[0], closure[ins[0]], self._constant)
                if out is None:
                    continue
                closure[n] = out
                queue.extend(n.users)
        cache[src] = closure
        return closure

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
                if not self._light(m) or m in barriers:
                    continue
                act2 = act or ops.is_kind(m, ops.ACTIVATION)
                queue.extend((u, act2) for u in m.users)
        out = []
        ffn_patterns = patterns.patterns("ffn")
        for o_node, ins in groups.items():
            o = self.projections[o_node]
            in_projs: dict[Node, list] = {}
            for p, act in ins:
                in_projs.setdefault(p.node, [p, False])[1] |= act
            candidates = sorted(((p, a) for p, a in in_projs.values() if p.in_features == o.out_features),
                                key=lambda pa: self.order[pa[0].node])
            if not candidates:
                continue
            found = next((r for pat in ffn_patterns if (r := pat.roles(candidates, o, self))), None)
            if not found:
                continue
            roles, values = found if isinstance(found, tuple) else (found, {})
            slices = self.shared_slices(roles, values)
            if not roles.get("out"):
                continue
            b = Block("ffn", roles)
            b.extra["slices"] = slices
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


def _aliases(x: Node) -> list[Node]:
    """``x`` and the values it is a copy of through single-input shape ops and casts (nearest first)."""
    out = [x]
    while (x.op == "call_function" and x.target in ops.SHAPE and x.target not in SLICING
           and len(ops.tensor_inputs(x)) == 1 and ops.shape(ops.tensor_inputs(x)[0]) == ops.shape(x)):
        x = ops.tensor_inputs(x)[0]
        out.append(x)
    return out


def _floaty(n: Node) -> bool:
    """A float tensor (or a tuple of them, or unknown): not an index, a count or a mask."""
    val = n.meta.get("val")
    return not isinstance(val, torch.Tensor) or val.dtype.is_floating_point


def _reads_through_light(x: Node, stream: Node) -> bool:
    """Whether ``x`` is ``stream`` or computed from it through light ops only (a norm, a cast, a reshape)."""
    seen, todo = set(), [x]
    while todo:
        n = todo.pop()
        if n is stream:
            return True
        if n in seen or ops.is_heavy(n) or not _floaty(n):
            continue
        seen.add(n)
        todo.extend(ops.tensor_inputs(n))
    return False


def _nonlinear_between(flow: Dataflow, src: Node, value: Node) -> tuple[bool, bool]:
    """Whether ``value`` is computed from ``src`` through light ops, and whether a non-linearity (an activation,
    or one written out of primitives: ``where``, ``exp``, ``clamp`` ...) lies on such a path."""
    stack, seen = [(value, False)], set()
    reached = act = False
    while stack:
        n, a = stack.pop()
        if n is src:
            reached, act = True, act or a
            continue
        if (n, a) in seen or (n is not value and ops.is_heavy(n)) or not _floaty(n):
            continue
        seen.add((n, a))
        a2 = a or ops.is_kind(n, ops.NONLINEAR)
        stack.extend((i, a2) for i in ops.tensor_inputs(n))
    return reached, act


# -- replaying shape ops on channel indices -----------------------------------------------------------------

WHOLE = ("whole",)
_PASS_THROUGH = ops._overloads(ops.aten.to, ops.aten._to_copy, ops.aten.type_as, ops.aten.dropout, ops.aten.alias,
                               ops.aten.detach, ops.aten.clone, ops.aten.contiguous)


_GATHER = ops._overloads(ops.aten.index, ops.aten.index_select)
_WRITE = ops._overloads(ops.aten.copy_)
_FRESH = ops._overloads(ops.aten.new_empty, ops.aten.new_zeros, ops.aten.empty_like, ops.aten.zeros_like,
                        ops.aten.empty, ops.aten.zeros)


def _replay(n: Node, prev: Node, cur, constant=lambda node: None):
    """The channel indices at ``n``'s output given those (``cur``) at its input ``prev``; other tensor inputs
    must be constants (``constant(node)`` gives their value)."""
    if n.op != "call_function":
        return None
    if n.target in _PASS_THROUGH:
        return cur.contiguous() if isinstance(cur, torch.Tensor) else cur
    if n.target in ops._overloads(ops.aten.native_dropout):
        return (cur, None)
    if n.target in ops.SHAPE or n.target in _GATHER:
        consts = {a: constant(a) for a in n.all_input_nodes if a is not prev}
        if any(v is None for v in consts.values()):
            return None

        def sub(a):
            if isinstance(a, Node):
                return cur if a is prev else consts[a]
            if isinstance(a, (list, tuple)):
                return type(a)(sub(x) for x in a)
            return a

        args, kwargs = sub(list(n.args)), {k: sub(v) for k, v in n.kwargs.items()}
        try:
            return n.target(*args, **kwargs)
        except Exception:  # noqa: BLE001 - e.g. a view of a tensor whose strides the replay does not share
            pass
        if isinstance(cur, torch.Tensor) and n.target in ops._overloads(ops.aten.view, ops.aten._unsafe_view):
            try:
                return cur.reshape(args[1])
            except Exception:  # noqa: BLE001
                return None
        return None
    # element-wise arithmetic (scaling, rotary, bias): each output element stays where its channel was
    ys = ops.shape(n)
    if ys is None or not isinstance(cur, torch.Tensor):
        return None
    if tuple(cur.shape) == ys:
        return cur
    try:
        return torch.broadcast_to(cur, ys)
    except RuntimeError:
        return None


def slice_of(channels: list[int] | None, width: int) -> tuple[int, ...] | None:
    """Channels → ``WHOLE``, ``(start, stop)`` (one range) or ``(start, stop, period, count)`` (one range in each
    of ``count`` blocks of ``period`` channels, as per-head packing lays q, k and v out); ``None`` otherwise."""
    if not channels:
        return None
    if channels == list(range(width)):
        return WHOLE
    runs: list[list[int]] = []
    for c in channels:
        if runs and c == runs[-1][1]:
            runs[-1][1] = c + 1
        else:
            runs.append([c, c + 1])
    if len(runs) == 1:
        return (runs[0][0], runs[0][1])
    w = runs[0][1] - runs[0][0]
    period = runs[1][0] - runs[0][0]
    start, count = runs[0][0], len(runs)
    regular = all(r[1] - r[0] == w and r[0] == start + j * period for j, r in enumerate(runs))
    if regular and count * period == width and start + w <= period:
        return (start, start + w, period, count)
    return None
