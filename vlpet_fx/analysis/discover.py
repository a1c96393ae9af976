"""Stage 2 — analysis: captured graph → :class:`SiteTable`."""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from torch import nn

from ..capture import Captured, capture
from ..capture.reduce import Reduction, reduced
from ..errors import DiscoveryError, VlpetError
from . import ops
from .dataflow import Block, Dataflow, Node
from .norms import norm_modules
from .sites import Site, SiteTable, merge_calls, settle_paths, unclaimed_calls, without_dead
from .streams import assign_streams


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() de-duplicates tied weights


def blocks_of(model: nn.Module, cap: Captured) -> list[Block]:
    leaves = {name for name, m in model.named_modules() if next(m.children(), None) is None}
    flow = Dataflow(cap, leaves)
    blocks = flow.blocks()
    assign_streams(flow, blocks, model)
    blocks = [b for b in blocks if not b.extra.get("off_stream")]
    for b in blocks:
        tie_block_input(flow, b)
    for b in blocks:
        tie_unmerged_input(flow, b, blocks)
    return [b for b in blocks if not _conditioning_map(b, blocks)]


def _conditioning_map(b: Block, blocks: list[Block]) -> bool:
    """A feed-forward map that is no sub-layer of the residual stream: no residual add after it, no stream value
    X found downstream of it (:func:`tie_block_input`), and rows that are not the stream's tokens (its input's
    leading shape differs from the X of the other blocks of its layer): e.g. an AdaLN-style conditioning network
    on a time embedding whose output scales the stream. Like a projector between two towers, it is no block."""
    if b.kind != "ffn" or b.residual_add is not None or block_input(b) is not None or b.layer_path is None:
        return False
    rows = _shape(b.first().x)
    streams = {_shape(block_input(o))[:-1] for o in blocks if o is not b and o.layer_path == b.layer_path
               and block_input(o) is not None and _shape(block_input(o))}
    return rows is not None and bool(streams) and rows[:-1] not in streams


def block_input(b: Block):
    """The residual-stream value X a block reads: its residual operand, or the stream value where the residual
    operand is not X (parallel blocks ``x + attn(x) + ffn(x)``, a norm on the sub-layer's output, a shared expert
    inside a mixture of experts): see :func:`tie_block_input`."""
    return b.extra.get("stream_x", b.residual)


# ops whose result depends only on their input's shape and dtype, not its values (a walk of the values stops there)
_SHAPE_ONLY = ops._overloads(
    ops.aten.zeros_like, ops.aten.ones_like, ops.aten.empty_like, ops.aten.full_like, ops.aten.new_zeros,
    ops.aten.new_ones, ops.aten.new_empty, ops.aten.new_full, ops.aten.sym_size, ops.aten.rand_like,
    ops.aten.randn_like,
)
_SCALE = ops.MUL | ops._overloads(ops.aten.div)


def _walk_back(start: Node, step: Callable[[Node], Iterable[Node]]) -> set[Node]:
    """``start`` and every value reached from it by following ``step(node)`` (the inputs to go on to) backwards."""
    seen: set[Node] = set()
    todo = [start]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function":
            todo.extend(step(n))
    return seen


def _upstream_light(start: Node, through: frozenset = frozenset()) -> set[Node]:
    """``start`` and every value it is computed from through light ops and the ops in ``through`` (the heavy ops
    and inputs where the walk stops are included; ops that read only a shape are not walked through)."""

    def step(n: Node) -> Iterable[Node]:
        if (not ops.is_heavy(n) or n.target in through) and n.target not in _SHAPE_ONLY:
            return ops.tensor_inputs(n)
        return ()

    return _walk_back(start, step)


def _carried(start: Node, weights: set[str]) -> set[Node]:
    """The values ``start`` carries unchanged, up to reshapes, casts, scaling by a constant or a parameter and
    other branches added in: what a skip path of the residual stream can be made of (``weights``: the names of
    the parameter and buffer nodes)."""

    def step(n: Node) -> Iterable[Node]:
        if ops.is_tensor_add(n):
            return [a for a in n.args[:2] if isinstance(a, Node)]
        if n.target in ops.SHAPE:
            return [n.args[0]] if n.args and isinstance(n.args[0], Node) else []
        if ops.is_kind(n, _SCALE):
            values = [a for a in n.args[:2] if isinstance(a, Node) and a.name not in weights]
            if len(values) == 1 and (ops.is_kind(n, ops.MUL) or values[0] is n.args[0]):  # x * w, x / w
                return values
        return ()

    return _walk_back(start, step)


def _reads(b: Block) -> Node:
    """The value the block's sub-layer reads from the stream side: the query projection's input for attention
    (k and v of cross-attention read the other stream), the first projection's input otherwise."""
    q = b.projections.get("q")
    return q[0].x if q else b.first().x


def tie_block_input(flow: Dataflow, b: Block) -> None:
    """Make sure ``block_input(b)`` is the residual-stream value X that enters the block's sub-layer.

    X is where the stream forks: the sub-layer reads it (through light ops: a norm, a cast) and the skip path
    carries it to the add that merges the sub-layer's output back. When the residual operand of the block's add
    is that value nothing changes. Otherwise (``x + attn(x) + ffn(x)`` adds in any order, a norm on the
    sub-layer's output before the add, a shared expert whose output is combined with the routed experts' before
    the add, a skip path scaled by a parameter) the adds downstream of the block's last projection are tried in
    graph order, through light ops and concatenations along a token axis, up to the first add outside the
    block's layer: the first whose other operand carries a value the sub-layer reads (:func:`_carried`: a skip
    path, not another computation from it, such as the routed experts' output) gives X (the latest such value)
    and the block's output: the whole residual branch that add merges (the outermost module
    of the block's last projection that the add is not in: the sub-layer, e.g. a mixture of experts rather than
    its shared expert, or the attention of a parallel block rather than the sum with the FFN)."""
    if not b.all_projections():  # a residual branch without projections: its stream value is X already
        return
    reads = _upstream_light(_reads(b))
    current = block_input(b)
    if current is not None and current in reads:
        return
    last = b.last().node
    order = flow.order
    weights = set(flow.cap.param_names) | set(flow.cap.buffer_names)
    heap = [(order[u], u) for u in last.users]
    heapq.heapify(heap)
    branch: set[Node] = {last}
    while heap:
        _, n = heapq.heappop(heap)
        if n in branch:
            continue
        branch.add(n)
        if ops.is_tensor_add(n):
            for other in n.args[:2]:
                if other in branch:
                    continue
                common = _carried(other, weights) & reads
                if common:
                    x = max(common, key=order.__getitem__)
                    b.extra["stream_x"] = x
                    _set_branch_output(flow, b, n, next(a for a in n.args[:2] if a is not other))
                    return
            # never past the first add outside the block's layer (the next layers' adds carry X on, too)
            if b.layer_path is not None and b.layer_path not in flow.cap.module_stack(n):
                return
        if not ops.is_heavy(n) or _joins_tokens(n):
            for u in n.users:
                heapq.heappush(heap, (order[u], u))


def tie_unmerged_input(flow: Dataflow, b: Block, blocks: list[Block]) -> None:
    """X of a block whose output no residual add merges back into a stream (a gate computed inside a norm, a
    shared sub-layer whose output is fed to another sub-layer instead of added): the latest value the sub-layer
    reads (through light ops: a norm, a cast, a concatenation) that is a stream value, i.e. another block's input
    X, residual add or output (the value a preceding sub-layer hands on), or an embedding look-up (the stream's
    start, read by a first sub-layer whose output starts the stream with no add). Nothing changes for a block that has an
    X already; X stays unknown when no such value is read.

    Its output is its last projection's value, through value-preserving ops only (views, casts, dropout): what
    follows (the sigmoid of a gate inside a norm) belongs to the consumer, and the module the eager back end
    hooks returns that value, the same the graph back end changes."""
    if block_input(b) is not None or not b.all_projections():
        return
    out = b.last().node
    while len(out.users) == 1 and ops.is_kind(next(iter(out.users)), ops.SHAPE):
        out = next(iter(out.users))
    b.output = out
    reads = _upstream_light(_reads(b), through=ops.CONCAT)
    stream = {v for o in blocks if o is not b for v in (block_input(o), o.residual_add, o.output, o.end_node())
              if v is not None}
    # a token stream starts at an embedding look-up: a first sub-layer may read it with no add before it; X is
    # then the latest value of the look-up's shape it reads from outside its layer (e.g. a norm of the look-up)
    starts = [n for n in reads if ops.is_kind(n, ops.EMBEDDING)]
    if starts and b.layer_path is not None:
        shapes = {_shape(n) for n in starts}
        stream |= {n for n in reads if n.op == "call_function" and _shape(n) in shapes
                   and b.layer_path not in flow.cap.module_stack(n)}
    common = reads & stream
    if common:
        b.extra["stream_x"] = max(common, key=flow.order.__getitem__)


def _joins_tokens(n: Node) -> bool:
    """A concatenation along an axis other than the channels (e.g. of several token streams' outputs): the values
    keep their meaning, so the search for the residual add goes on through it."""
    if not ops.is_kind(n, ops.CONCAT):
        return False
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    out = ops.shape(n)
    return isinstance(dim, int) and out is not None and dim % len(out) != len(out) - 1


def _set_branch_output(flow: Dataflow, b: Block, add: Node, branch: Node) -> None:
    """The block's output is the residual branch merged by ``add``: the outermost module on the block's last
    projection's module stack that the add is not in, and its latest value the branch is computed from."""
    cap = flow.cap
    add_scope = set(cap.module_stack(add))
    feeds = _upstream_light(branch)
    for path in cap.module_stack(b.last().node):
        if path in add_scope or not path:
            continue
        inside = [n for n in feeds if path in cap.module_stack(n)]
        if inside:
            b.output_path = path
            b.output = max(inside, key=flow.order.__getitem__)
        return


def input_path_of(cap: Captured | None, b: Block) -> str | None:
    """The module whose call receives the block's input X (:func:`block_input`, tied by :func:`tie_block_input`).

    It is the outermost module that consumes X but did not produce it, inside the block's layer. PET methods
    that read X (VL-PET's gates) take it from that module's first input.
    """
    x = block_input(b)
    scope = _block_scope(b)
    if cap is None or x is None or scope is None:
        return None
    found = _receiver(cap, x, scope)
    # the layer container named by the tie-break can be a list of sub-layers inside the real layer (LongCat-Flash:
    # `self_attn = ModuleList([attn, attn])` in each decoder layer) while X enters in the layer around it: then
    # look in the module that makes the block's residual add, when it holds that container
    outer = cap.module_path(b.residual_add) if found is None and b.residual_add is not None else None
    if outer is not None and scope.startswith(outer + "."):
        found = _receiver(cap, x, outer)
    return found


def _receiver(cap: Captured, x, scope: str) -> str | None:
    """The outermost module inside ``scope`` that consumes ``x`` but did not produce it (see
    :func:`input_path_of`): one whose first input of X's shape is X and whose other inputs cannot be taken for
    X; failing that, one that also reads activations of other shapes, none with X's rank and width but X."""
    # a no-op cast (T5LayerNorm's .to(float32) on a float32 tensor) aliases X inside a sub-module: go back
    # to the op that really made X, and consider the users of every alias (also of copies made from X: a
    # clone read by the sub-layer)
    chain = [x]
    while _is_noop_alias(chain[-1]):
        chain.append(chain[-1].args[0])
    made_in = set(cap.module_stack(chain[-1]))
    x_shape = _shape(chain[0])
    best: dict[bool, str] = {}
    outside = _outside_inputs(cap)
    values = _with_copies(chain)
    for user in [u for n in values for u in n.users if u not in values]:
        for call, (path, _type) in (user.meta.get("nn_module_stack") or {}).items():
            if path in made_in or not (path == scope or path.startswith(scope + ".")):
                continue
            # the module's first input must be X, in the call that receives X (a module called on several
            # streams, e.g. Pegasus-X's FFN norm on the token and the global stream, takes one of them per
            # call): skip one that reads another value of X's shape before X (a layer taking two streams: it
            # receives the second as its second input). A module that also takes activations of another shape
            # (BERT's output sub-module takes the FFN's hidden state first and X second; an attention over the
            # outputs of earlier blocks takes their stack first) is a second choice, when no other value it
            # reads has X's rank and width: the eager back end takes the input of that rank and width
            reads = outside.get(call, [])
            plain = all(_fits_block_input(_shape(a), x_shape) for a in reads)
            if plain:
                first = next((a for a in reads if _shape(a) == x_shape), None)
                if first is not None and first not in values:
                    continue
            elif any(_like_x(_shape(a), x_shape) and a not in values for a in reads) or \
                    not any(a in values for a in reads):
                continue
            if plain not in best or len(path) < len(best[plain]):
                best[plain] = path
            if plain:  # a second choice goes on to the modules inside it
                break
    return best.get(True, best.get(False))


def _like_x(shape: tuple | None, x_shape: tuple | None) -> bool:
    """Whether an activation of ``shape`` could be taken for X by its rank and width (see eager.StashInput)."""
    return shape is not None and x_shape is not None and len(shape) == len(x_shape) and shape[-1:] == x_shape[-1:]


def _block_scope(b: Block) -> str | None:
    """Where the module receiving X is looked for: the block's layer, or, for a residual branch outside any
    repeated layer (an intermediate head added back between two layers), the module holding the block."""
    return b.layer_path if b.layer_path is not None else (b.block_path or None)


def _with_copies(chain: list) -> list:
    """``chain`` and every no-op alias or copy made from its nodes (their values equal X)."""
    out, todo = list(chain), list(chain)
    while todo:
        n = todo.pop()
        for u in n.users:
            if u not in out and _is_noop_alias(u):
                out.append(u)
                todo.append(u)
    return out


def _fits_block_input(shape: tuple | None, x_shape: tuple | None) -> bool:
    """Whether an activation of ``shape`` that a module reads beside the block input X (of ``x_shape``) leaves X
    its first input: it is X's shape, or one value per token (X's shape without its channel axis: a padding
    mask, per-token weights), which is not a hidden state the module could take in X's place."""
    return shape == x_shape or (shape is not None and x_shape is not None and shape == x_shape[:-1])


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if hasattr(node, "meta") else None
    try:
        return tuple(int(d) for d in val.shape) if val is not None and hasattr(val, "shape") else None
    except Exception:  # noqa: BLE001 -- symbolic sizes
        return None


def _outside_inputs(cap: Captured) -> dict[str, list]:
    """For every module call (its ``nn_module_stack`` key: one per call of a module called several times): the
    float activations (>= 2-D, not parameters or buffers) its graph nodes read from outside the module, in the
    order the call first reads them. Cached on the captured graph."""
    cached = getattr(cap, "_outside_inputs", None)
    if cached is not None:
        return cached
    weights = set(cap.param_names) | set(cap.buffer_names)
    out: dict[str, dict] = {}
    for n in cap.graph.nodes:
        if n.op != "call_function":
            continue
        inside = n.meta.get("nn_module_stack") or {}
        for a in n.all_input_nodes:
            if a.name in weights:
                continue
            val = a.meta.get("val")
            if val is None or not hasattr(val, "dtype") or not val.dtype.is_floating_point or val.dim() < 2:
                continue
            theirs = set((a.meta.get("nn_module_stack") or {}))
            for call in inside:
                if call not in theirs:
                    out.setdefault(call, {}).setdefault(a, None)
    ordered = {call: list(reads) for call, reads in out.items()}
    object.__setattr__(cap, "_outside_inputs", ordered)
    return ordered


def _is_noop_alias(node) -> bool:
    import torch

    if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    if getattr(node.target, "overloadpacket", None) not in (torch.ops.aten.to, torch.ops.aten.alias,
                                                            torch.ops.aten._to_copy, torch.ops.aten.clone):
        return False
    a, b = node.args[0].meta.get("val"), node.meta.get("val")
    return a is not None and b is not None and a.shape == b.shape and a.dtype == b.dtype


def spec_width(spec: tuple[int, ...]) -> int:
    return (spec[1] - spec[0]) * (spec[3] if len(spec) == 4 else 1)


def sites_of(blocks: list[Block], cap: Captured | None = None) -> list[Site]:
    sites: list[Site] = []
    outputs: set[tuple] = set()
    for b in blocks:
        x = block_input(b)
        x_shape = _shape(x) if x is not None else None
        where = dict(block_path=b.block_path, layer_path=b.layer_path, input_path=input_path_of(cap, b),
                     input_node=x.name if x is not None else None,
                     input_features=x_shape[-1] if x_shape else None, input_rank=len(x_shape) if x_shape else None)
        slices = b.extra.get("slices", {})
        for role, projs in b.projections.items():
            for p in projs:
                spec = slices.get(role)
                out = spec_width(spec) if spec else p.out_features
                sites.append(
                    Site(b.stack, b.layer, b.block, role, p.path, p.in_features, out, spec,
                         node=p.node.name, param=p.param, x_node=p.x.name, **where)
                )
        width_in, width_out = b.widths()
        # two blocks of one sub-layer (the routed and the shared experts of a mixture) have one output
        mark = (b.stack, b.layer, b.block, b.output_path, b.output)
        if b.output is not None and mark in outputs:
            continue
        outputs.add(mark)
        sites.append(
            Site(b.stack, b.layer, b.block, "output", b.output_path, width_in, width_out,
                 node=b.output.name if b.output is not None else b.end_node().name, param=None, **where)
        )
    return sites


def _renamed(site: Site, prefix_from: str, prefix_to: str, layer_path: str) -> Site:
    def sub(text: str | None) -> str | None:
        if text is not None and text == prefix_from[:-1]:
            return prefix_to[:-1]
        return prefix_to + text[len(prefix_from):] if text and text.startswith(prefix_from) else text

    def moved(a):
        return a._replace(path=sub(a.path), parent=sub(a.parent)) if a is not None else None

    return replace(site, path=sub(site.path), param=sub(site.param), block_path=sub(site.block_path),
                   layer_path=layer_path, input_path=sub(site.input_path), node=None, input_node=None, x_node=None,
                   anchor=moved(site.anchor), input_anchor=moved(site.input_anchor))


def expand_reduced(sites: list[Site], red: Reduction) -> list[Site] | None:
    """Re-create the sites of the layers that :func:`reduced` dropped; ``None`` if the reduction does not
    line up with the discovered layers (then the caller captures the full model)."""
    for path in red.representative:
        inside = [s for s in sites if any(x and x.startswith(path + ".") for x in (s.path, s.param, s.block_path))]
        if any(not s.layer_path or s.layer_path.rpartition(".")[0] != path for s in inside):
            return None
    out: list[Site] = []
    for stack in dict.fromkeys(s.stack for s in sites):
        mine = [s for s in sites if s.stack == stack]
        by_layer: dict[int, list[Site]] = {}
        for s in mine:
            by_layer.setdefault(s.layer, []).append(s)
        by_path = {ls[0].layer_path: ls for ls in by_layer.values()}
        layers: list[list[Site]] = []
        for number in sorted(by_layer):
            group = by_layer[number]
            layers.append(group)
            list_path, _, index = (group[0].layer_path or "").rpartition(".")
            if list_path in red.tail and index.isdigit() and int(index) == red.kept[list_path]:
                last = red.lists[list_path] - 1  # the list's last element, captured after the kept prefix
                layers[-1] = [_renamed(s, f"{list_path}.{index}.", f"{list_path}.{last}.", f"{list_path}.{last}")
                              for s in group]
            if list_path in red.representative and index.isdigit() and int(index) == red.kept[list_path] - 1:
                for j, rep in sorted(red.representative[list_path].items()):
                    src = by_path.get(f"{list_path}.{rep}")
                    if src is None:
                        return None
                    layers.append([_renamed(s, f"{list_path}.{rep}.", f"{list_path}.{j}.", f"{list_path}.{j}") for s in src])
        for number, group in enumerate(layers):
            out.extend(replace(s, layer=number) for s in group)
    return out


def discover(model: nn.Module, example_inputs: Any = None, *, captured: Captured | None = None,
             name: str | None = None, fast: bool = True) -> SiteTable:
    """Find every candidate PET insertion site of ``model`` from its dataflow graph.

    With ``fast=True`` (and no ``captured`` graph given) repeated, structurally identical layers are
    captured once and their sites replicated (see :mod:`vlpet_fx.capture.reduce`); the result is the same
    table as a full capture, which a test checks, but ``Site.node`` is then ``None``.
    """
    t0 = time.perf_counter()
    sites = None
    graph_nodes = 0
    method = "export"
    norms: list[str] = []
    if captured is None and fast:
        for keep_last in (False, True):
            with reduced(model, keep_last=keep_last) as red:
                if not red:
                    break
                try:
                    cap = capture(model, example_inputs)
                    found, dead = _analysed(model, cap, lambda: without_dead(_sites(model, cap), cap))
                    if not keep_last and any(_in_lists(s, red) for s in dead):
                        # the reduced model ends with its last kept layer, so a value that reaches no output there
                        # may reach the next layer in the full model: capture with the real last layer kept too
                        continue
                    sites = expand_reduced(found, red)
                    norms = expand_paths(norm_modules(cap), red)
                    graph_nodes, method = len(cap.graph.nodes), "export (reduced depth)"
                except VlpetError:
                    # some forwards depend on the full depth (e.g. hidden states indexed by the config's layer
                    # count): capture the whole model instead, which reports its own error if it fails too
                    sites = None
                break
    if sites is None:
        cap = captured if captured is not None else capture(model, example_inputs)
        sites, _ = _analysed(model, cap, lambda: without_dead(_sites(model, cap), cap))
        norms = norm_modules(cap)
        graph_nodes, method = len(cap.graph.nodes), cap.method
    t2 = time.perf_counter()
    return SiteTable(
        merge_calls(sites),
        model=name or type(model).__name__,
        total_params=count_params(model),
        meta={"seconds": t2 - t0, "graph_nodes": graph_nodes, "method": method, "norms": norms},
    )


def _in_lists(site: Site, red: Reduction) -> bool:
    """Whether ``site`` is in an element of a list that ``red`` shortened."""
    return bool(site.layer_path) and site.layer_path.rpartition(".")[0] in red.representative


def _sites(model: nn.Module, cap: Captured) -> list[Site]:
    """The sites of one capture; a site whose module does not return its value is left to the graph back end."""
    return settle_paths(unclaimed_calls(sites_of(_checked_blocks(model, cap), cap), cap), cap)


def _analysed(model: nn.Module, cap: Captured, run):
    """Run the analysis; an unexpected exception becomes one DiscoveryError line naming it (never a traceback)."""
    try:
        return run()
    except VlpetError:
        raise
    except Exception as exc:  # noqa: BLE001 -- reported as one line with its type
        first = next((t.strip() for t in str(exc).splitlines() if t.strip()), "")[:160]
        raise DiscoveryError(
            f"cannot analyse {type(model).__name__}: {type(exc).__name__}: {first} -- its graph has a pattern the "
            "analysis does not handle yet: register one (vlpet_fx patterns) or report it with this line"
        ) from exc


def _in_list(path: str, lists) -> tuple[str, str, str] | None:
    """``(list path, element index, the rest of the path)`` when ``path`` lies inside an element of one of
    ``lists`` (module paths of layer lists), else ``None``."""
    for lp in lists:
        if path.startswith(lp + "."):
            index, _, rest = path[len(lp) + 1:].partition(".")
            if index.isdigit():
                return lp, index, rest
    return None


def expand_paths(paths: list[str], red: Reduction) -> list[str]:
    """Module paths inside shortened layer lists, repeated for the layers the reduction dropped."""
    out: dict[str, None] = {}
    for path in paths:
        hit = _in_list(path, red.representative)
        if hit is None:
            out.setdefault(path, None)
            continue
        list_path, index, rest = hit
        rest = f".{rest}" if rest else ""
        if list_path in red.tail and int(index) == red.kept[list_path]:  # the list's last element
            out.setdefault(f"{list_path}.{red.lists[list_path] - 1}{rest}", None)
            continue
        out.setdefault(path, None)
        for j, rep in sorted(red.representative[list_path].items()):
            if rep == int(index):
                out.setdefault(f"{list_path}.{j}{rest}", None)
    return list(out)


def _checked_blocks(model: nn.Module, cap: Captured) -> list[Block]:
    blocks = blocks_of(model, cap)
    if not blocks:
        raise DiscoveryError(
            f"no attention or feed-forward blocks found in {type(model).__name__}: its graph has no "
            "scaled-dot-product attention, matmul-softmax-matmul or linear-activation-linear pattern and no "
            "residual branch x + f(x) with a weight in f"
        )
    return blocks
