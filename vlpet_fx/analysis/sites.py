"""Sites: the places where a PET module can be inserted, as a table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable, Iterator, NamedTuple

STACKS = ("visual", "encoder", "decoder")
BLOCKS = ("self_attn", "cross_attn", "mixer", "ffn")
ROLES = ("q", "k", "v", "o", "in", "gate", "up", "out", "output")
PUBLIC_FIELDS = ("key", "stack", "layer", "block", "role", "path", "in_features", "out_features", "out_slice")


def slice_text(out_slice: tuple[int, ...] | None) -> str:
    """``[a:b]`` for one range of output channels, ``[a:b/p×n]`` for a range in each of n blocks of p channels."""
    if not out_slice:
        return ""
    a, b = out_slice[0], out_slice[1]
    return f"[{a}:{b}]" if len(out_slice) == 2 else f"[{a}:{b}/{out_slice[2]}x{out_slice[3]}]"


def slice_channels(out_slice: tuple[int, ...]) -> list[int]:
    """The output channels an ``out_slice`` names, in order."""
    a, b = out_slice[0], out_slice[1]
    if len(out_slice) == 2:
        return list(range(a, b))
    period, count = out_slice[2], out_slice[3]
    return [j * period + c for j in range(count) for c in range(a, b)]


class Anchor(NamedTuple):
    """Where the eager back end reaches a site value that no module returns at every call (``Site.path`` is
    ``None``): the value is the only tensor that one call of module ``path`` returns (``at="output"``) or
    receives (``at="input"``). ``parent`` is ``None`` when the graph calls ``path`` once: every call is the
    site's. Else ``path`` is called ``period`` times inside the one call of module ``parent`` and the site is the
    ``index``-th of them (0-based; counted again from each call of ``parent``). ``reads_x``: the call
    (``at="output"``) is the site's projection itself, its one activation read the projection's input x, so
    a ``parallel`` placement sees x there (a projection whose weight is tied to another module's, e.g. one
    transformer block's weights shared by several hybrid layers, each with a module object of its own)."""

    path: str
    at: str
    parent: str | None
    index: int
    period: int
    reads_x: bool = False


class Call(NamedTuple):
    """One call of a site's module in the captured graph: the node of its value, of the projection's input x
    and of the block input X (graph node names; ``None`` where there is none)."""

    node: str | None
    x_node: str | None
    input_node: str | None


@dataclass(frozen=True)
class Site:
    """One insertion site. ``key`` and the fields up to ``out_slice`` are the public (JSON) contract.

    ``key`` is the site's one identity (unique in its table, stable between the fast and the full capture):
    ``stack.layer.block.role``, qualified with ``@path`` (or ``@<param>``) and the slice only when two sites
    would otherwise share it. ``out_slice`` is ``None`` when the site is the whole output of ``path``; for one
    of q, k, v made by a fused (packed) projection it names the output channels: ``(start, stop)``, or
    ``(start, stop, period, count)`` for ``start:stop`` in each of ``count`` blocks of ``period`` channels
    (per-head packing). ``out_features`` is then the slice's width.

    A module called more than once (one FFN applied to two token streams, a layer reused by a recurrence, a
    projection applied to the decoder's and the encoder's states of a merged attention) is *one* site: a PET
    module placed on it applies at every call, in both back ends. ``calls`` lists them in graph order (the
    first is ``node``/``x_node``/``input_node``); the site's stack, layer and block are those of the first call.
    """

    stack: str
    layer: int
    block: str
    role: str
    path: str | None
    in_features: int
    out_features: int
    out_slice: tuple[int, ...] | None = None
    key: str = field(default="", compare=False)
    # where the site lives in the captured graph and the model (not part of the JSON contract)
    node: str | None = field(default=None, compare=False)
    param: str | None = field(default=None, compare=False)
    block_path: str | None = field(default=None, compare=False)
    layer_path: str | None = field(default=None, compare=False)
    input_path: str | None = field(default=None, compare=False)  # module whose input is the block input X
    input_node: str | None = field(default=None, compare=False)  # graph node of the block input X
    x_node: str | None = field(default=None, compare=False)  # graph node of the projection's input x
    input_features: int | None = field(default=None, compare=False)  # width of the block input X
    calls: tuple[Call, ...] = field(default=(), compare=False)  # every call of the module (graph nodes)
    input_call: str | None = field(default=None, compare=False)  # which call of input_path receives X
    anchor: Anchor | None = field(default=None, compare=False)  # eager hook point of a path-less value
    input_rank: int | None = field(default=None, compare=False)  # number of axes of the block input X
    # where the eager back end takes X when no module receives it as its input (input_path is None): the one
    # tensor a module call hands out or reads (see settle_paths)
    input_anchor: Anchor | None = field(default=None, compare=False)

    def call_nodes(self) -> tuple[Call, ...]:
        """The site's calls in the captured graph (``(node, x_node, input_node)``; one unless the module is
        called several times)."""
        return self.calls or (Call(self.node, self.x_node, self.input_node),)

    @property
    def base_key(self) -> str:
        return f"{self.stack}.{self.layer}.{self.block}.{self.role}"

    def public(self) -> dict:
        d = asdict(self)
        out = {k: d[k] for k in PUBLIC_FIELDS}
        out["out_slice"] = list(self.out_slice) if self.out_slice else None
        return out

    def __str__(self) -> str:
        where = self.path if self.path is not None else f"<{self.param or 'a value in the graph'}>"
        shape = f"{self.in_features}->{self.out_features}"
        return f"{self.key or self.base_key} ({where}{slice_text(self.out_slice)}: {shape})"


def assign_keys(sites: Iterable[Site]) -> list[Site]:
    """Give every site its unique ``key`` (see :class:`Site`); deterministic for a given set of sites."""
    sites = sorted(sites, key=_sort_key)
    base: dict[str, int] = {}
    for s in sites:
        base[s.base_key] = base.get(s.base_key, 0) + 1
    keys = []
    for s in sites:
        k = s.base_key
        if base[k] > 1:
            where = s.path if s.path is not None else f"<{s.param or s.block_path or ''}>"
            k = f"{k}@{where}{slice_text(s.out_slice)}"
        keys.append(k)
    seen: dict[str, int] = {}
    for k in keys:
        seen[k] = seen.get(k, 0) + 1
    counter: dict[str, int] = {}
    out = []
    for s, k in zip(sites, keys):
        if seen[k] > 1:  # still shared (two path-less sites in one block): number them in table order
            counter[k] = counter.get(k, 0) + 1
            k = f"{k}#{counter[k]}"
        out.append(replace(s, key=k))
    return out


def _merge_key(s: Site, i: int) -> tuple:
    """Sites with one key are calls of one module's site (:func:`merge_calls`); ``i`` keeps a site without a
    module path apart."""
    return (s.path, s.role, s.out_slice, s.in_features, s.out_features) if s.path is not None else ("#", i)


def nodes_reaching_outputs(cap) -> set[str]:
    """Names of the graph's nodes whose value reaches one of its outputs (the model's outputs, the buffers it
    updates), also through in-place writes: a write into a tensor (or a view of it) reaches what that tensor
    reaches (RWKV's recurrence fills its output step by step), which the graph's edges do not show."""
    from .dataflow import in_place_writes

    written_by, _ = in_place_writes(list(cap.graph.nodes))
    todo = [n for n in cap.graph.nodes if n.op == "output"]
    seen: set[str] = set()
    while todo:
        n = todo.pop()
        if n.name not in seen:
            seen.add(n.name)
            todo.extend(n.all_input_nodes)
            todo.extend(written_by.get(n, ()))
    return seen


def without_dead(sites: Iterable[Site], cap) -> tuple[list[Site], list[Site]]:
    """The sites whose value reaches an output of the graph, and those whose value (at every call of the site's
    module) reaches none: a PET module there would change no output and get no gradient (e.g. the last layer's
    update of a stream the model drops after it, or a vision tower's pooling head whose output the model does not
    read, as SigLIP's under Gemma 3). A value the model returns counts, even if nothing else reads it. A site
    without a graph node is kept."""
    sites = list(sites)
    live = nodes_reaching_outputs(cap)
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(sites):
        groups.setdefault(_merge_key(s, i), []).append(i)
    dead: set[int] = set()
    for members in groups.values():
        nodes = [c.node for i in members for c in sites[i].call_nodes()]
        if nodes and all(n is not None and n not in live for n in nodes):
            dead.update(members)
    return ([s for i, s in enumerate(sites) if i not in dead], [s for i, s in enumerate(sites) if i in dead])


def merge_calls(sites: Iterable[Site]) -> list[Site]:
    """One site per module: sites that name the same module, role and output slice (the module is
    called several times) become one site whose ``calls`` are all of theirs, at the first call's place
    (stack, layer, block). A PET module on a module sees every call of it, so two sites there could never get
    two different modules; the graph back end applies the one module at every call as the eager hook does.

    Calls whose shapes differ (in or out features) stay separate sites (the planner refuses two modules with
    one name on one module). The block input X is kept only when every call reads it from the same module,
    each from a call of its own (``input_call``) or all from one call of it."""
    sites = list(sites)
    groups: dict[tuple, list[Site]] = {}
    order: list[tuple] = []
    for i, s in enumerate(sites):
        k = _merge_key(s, i)
        if k not in groups:
            groups[k] = []
            order.append(k)
        groups[k].append(s)
    out = []
    for k in order:
        group = groups[k]
        first = group[0]
        if len(group) == 1:
            out.append(first)
            continue
        calls: dict[Call, None] = {}
        for s in group:
            for c in s.call_nodes():
                calls.setdefault(c, None)
        # the eager back end takes X from the latest call of input_path: right when every call of the site has
        # its own call of that module, or when all read X from one call of it (then they read the same value:
        # that call's first input, see discover.input_path_of; e.g. ProphetNet's main and n-gram streams
        # attended with one key projection call); a module called once for some calls and again for others
        # could hand a call another's X
        inputs = {s.input_path for s in group}
        own = [s.input_call for s in group]
        one_each = len(set(own)) == len(own) or len(set(own)) == 1
        input_path = first.input_path if len(inputs) == 1 and None not in own and one_each else None
        widths = {s.input_features for s in group}
        out.append(replace(first, calls=tuple(calls) if any(c.node for c in calls) else (),
                           input_path=input_path, input_features=first.input_features if len(widths) == 1 else None,
                           input_anchor=None))  # an anchor names one call
    return out


def _sort_key(s: Site) -> tuple:
    return (
        STACKS.index(s.stack) if s.stack in STACKS else 99,
        s.layer,
        BLOCKS.index(s.block) if s.block in BLOCKS else 99,
        ROLES.index(s.role) if s.role in ROLES else 99,
        s.path or "",
        s.out_slice or (),
    )


class SiteTable:
    """An ordered, immutable collection of :class:`Site` with simple queries."""

    def __init__(self, sites: Iterable[Site], *, model: str = "", total_params: int = 0, meta: dict | None = None):
        sites = list(sites)
        if any(not s.key for s in sites):
            if not all(not s.key for s in sites):
                raise ValueError("SiteTable: either every site has a key or none (then the table assigns them)")
            sites = assign_keys(sites)
        self.sites: tuple[Site, ...] = tuple(sorted(sites, key=_sort_key))
        self._by_key = {s.key: s for s in self.sites}
        if len(self._by_key) != len(self.sites):
            dup = next(s.key for s in self.sites if sum(t.key == s.key for t in self.sites) > 1)
            raise ValueError(f"SiteTable: two sites share the key '{dup}'")
        self.model = model
        self.total_params = total_params
        self.meta = dict(meta or {})

    def __iter__(self) -> Iterator[Site]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def __getitem__(self, i: "int | str") -> Site:
        """``table[i]`` by position, ``table["encoder.0.ffn.gate"]`` by key."""
        if isinstance(i, str):
            if i not in self._by_key:
                raise KeyError(f"no site with key '{i}' in {self.model or 'this table'}")
            return self._by_key[i]
        return self.sites[i]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._by_key

    def keys(self) -> list[str]:
        return [s.key for s in self.sites]

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.num_layers().items())
        return f"SiteTable({len(self)} sites; layers: {counts})"

    def where(self, **conditions) -> "SiteTable":
        """Sites whose fields equal the given values (a value may also be a set/tuple/list of values)."""

        def ok(s: Site) -> bool:
            for k, v in conditions.items():
                have = getattr(s, k)
                if isinstance(v, (set, frozenset, tuple, list)):
                    if have not in v:
                        return False
                elif have != v:
                    return False
            return True

        return SiteTable([s for s in self.sites if ok(s)], model=self.model, total_params=self.total_params, meta=self.meta)

    def stacks(self) -> list[str]:
        return sorted({s.stack for s in self.sites}, key=lambda k: STACKS.index(k) if k in STACKS else 99)

    def num_layers(self) -> dict[str, int]:
        return {k: len({s.layer for s in self.sites if s.stack == k}) for k in self.stacks()}

    def blocks(self) -> list[tuple[str, int, str]]:
        seen: dict[tuple[str, int, str], None] = {}
        for s in self.sites:
            seen.setdefault((s.stack, s.layer, s.block), None)
        return list(seen)

    def get(self, stack: str, layer: int, block: str, role: str) -> Site:
        """The one site at ``stack.layer.block.role``; a ``KeyError`` if there is none or several (then look
        one up by its key, ``table[key]``)."""
        found = [s for s in self.sites if (s.stack, s.layer, s.block, s.role) == (stack, layer, block, role)]
        if not found:
            raise KeyError(f"no site {stack}.{layer}.{block}.{role}")
        if len(found) > 1:
            raise KeyError(f"{len(found)} sites are {stack}.{layer}.{block}.{role} "
                           f"({', '.join(s.key for s in found)}): look one up by its key, table[key]")
        return found[0]

    def to_dict(self) -> dict:
        # base_params: the model's parameters before any patch (docs/CLI.md, "Field names")
        return {"model": self.model, "base_params": self.total_params, "sites": [s.public() for s in self.sites]}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)


# -- a site's module must return the site's value ----------------------------------------------------------

def module_exits(cap) -> dict[str, set]:
    """For every module path: the graph nodes its calls return (made inside it, used outside it or returned)."""
    out: dict[str, set] = {}
    for n in cap.graph.nodes:
        inside = cap.module_stack(n)
        if not inside:
            continue
        for u in n.users:
            theirs = () if u.op == "output" else cap.module_stack(u)
            for path in inside:
                if path not in theirs:
                    out.setdefault(path, set()).add(n)
    return out


def returns_value(cap, site: Site, exits: set, nodes: dict) -> bool:
    """Whether the site's module hands out the site's value at every call: the value's node is among what
    the module returns, or reaches it (or is reached from it) through light ops only (a dropout, a cast, a
    scaling or a view between them), and what the module returns there has the value's width. Otherwise an
    eager hook on the module would change another value (of another width, or before a non-linearity) than
    the graph back end does."""
    from . import ops

    width = site.out_features if not site.out_slice else None
    for call in site.call_nodes():
        start = nodes.get(call.node) if call.node else None
        if start is None:
            continue
        ok = False
        for step in (lambda n: n.all_input_nodes, lambda n: list(n.users)):
            seen, todo = set(), [start]
            while todo and not ok:
                n = todo.pop()
                if n in seen:
                    continue
                seen.add(n)
                if n in exits:
                    shape = ops.shape(n)
                    ok = width is None or shape is None or (len(shape) > 0 and shape[-1] == width)
                    if ok:
                        break
                if n is start or not ops.is_heavy(n):
                    todo.extend(step(n))
            if ok:
                break
        if not ok:
            return False
    return True


def settle_paths(sites: Iterable[Site], cap) -> list[Site]:
    """Sites whose module does not return their value keep it only in the graph (``path=None``); the eager
    back end reaches such a value through its :class:`Anchor` when it has one (:func:`find_anchor`), and
    refuses it at patch time, in one line, when it has none (instead of a shape error in the forward)."""
    nodes = {n.name: n for n in cap.graph.nodes}
    exits = module_exits(cap)
    calls: ModuleCalls | None = None
    out = []
    for s in sites:
        if s.path is not None and not (returns_value(cap, s, exits.get(s.path, set()), nodes)
                                       and every_call_returns_width(s, exits.get(s.path, set()))
                                       and one_shape_per_call(s, exits.get(s.path, set()))):
            s = replace(s, path=None)
        if s.path is None:
            calls = calls or ModuleCalls(cap)
            s = replace(s, anchor=find_anchor(cap, s, nodes, calls))
        if s.input_path is not None and s.input_node in nodes:
            s = replace(s, input_call=_call_receiving(nodes[s.input_node], s.input_path))
        elif s.input_node in nodes and s.input_features and len(s.call_nodes()) == 1:
            # no module receives X as its input: X may still be the one tensor a module call hands out (a norm
            # of a post-LN layer whose output feeds the next sub-layer inside one module) or reads
            calls = calls or ModuleCalls(cap)
            s = replace(s, input_anchor=anchor_of(cap, nodes[s.input_node], s.input_features, calls))
        out.append(s)
    return out


def every_call_returns_width(site: Site, exits: set) -> bool:
    """Whether every call of the site's module (also calls that are not the site's, e.g. a dropout module used on
    the attention probabilities and again on the output) returns a value of the site's width: an eager hook acts
    on every call."""
    from . import ops

    if site.out_slice or site.path is None:
        return True
    calls: dict[str, bool] = {}
    for n in exits:
        key = next((k for k, (p, _t) in (n.meta.get("nn_module_stack") or {}).items() if p == site.path), None)
        if key is None:
            continue
        shape = ops.shape(n)
        fits = shape is None or (len(shape) > 0 and shape[-1] == site.out_features)
        calls[key] = calls.get(key, False) or fits
    return all(calls.values())


def one_shape_per_call(site: Site, exits: set) -> bool:
    """Whether no call of the site's module returns values of the site's width in two shapes of one rank (two
    token streams of other lengths, e.g. Pegasus-X's attention returning the token and the global stream's
    outputs): the eager hook changes the first one the module returns, which the graph does not tell."""
    from . import ops

    if site.out_slice or site.path is None:
        return True
    shapes: dict[str, set] = {}
    for n in exits:
        shape = ops.shape(n)
        if shape is None or not shape or shape[-1] != site.out_features:
            continue
        key = next((k for k, (p, _t) in (n.meta.get("nn_module_stack") or {}).items() if p == site.path), None)
        if key is not None:
            shapes.setdefault(key, set()).add(tuple(shape))
    return all(len({len(sh) for sh in group}) == len(group) for group in shapes.values())


def _call_receiving(x, path: str) -> str | None:
    """Which call of module ``path`` takes ``x`` (its ``nn_module_stack`` key, unique per call), if one does."""
    keys = {k for u in x.users for k, (p, _t) in (u.meta.get("nn_module_stack") or {}).items() if p == path}
    return next(iter(keys)) if len(keys) == 1 else None


# -- where the eager back end reaches a value no module returns at every call ---------------------------------

class ModuleCalls:
    """Every module call of a captured graph: its ``nn_module_stack`` key (unique per call) -> module path, the
    nodes run inside it, and the calls in graph order."""

    def __init__(self, cap):
        self.path: dict[str, str] = {}
        self.nodes: dict[str, set] = {}
        self.order: list[str] = []
        for n in cap.graph.nodes:
            for key, (path, _type) in (n.meta.get("nn_module_stack") or {}).items():
                if key not in self.path:
                    self.path[key] = path
                    self.nodes[key] = set()
                    self.order.append(key)
                self.nodes[key].add(n)

    def of(self, path: str, within: str | None = None) -> list[str]:
        """The calls of module ``path`` (inside the call ``within``, if given), in graph order."""
        inside = self.nodes[within] if within is not None else None
        return [k for k in self.order if self.path[k] == path
                and (inside is None or next(iter(self.nodes[k])) in inside)]


def unclaimed_calls(sites: Iterable[Site], cap) -> list[Site]:
    """Projection sites whose module the graph also calls where no site is (a call of another value of the site's
    width: e.g. an output projection applied to a second stream whose attention discovery does not see) lose
    their module path: an eager hook on the module would change that call's value too, which the graph back end
    leaves alone. :func:`settle_paths` then anchors each at its own call (:func:`find_anchor`) where it can."""
    from . import ops

    sites = list(sites)
    nodes = {n.name: n for n in cap.graph.nodes}
    claimed: dict[str, set] = {}
    for s in sites:
        n = nodes.get(s.node) if s.node else None
        if s.path is None or s.role == "output" or n is None:
            continue
        claimed.setdefault(s.path, set()).update(k for k, (p, _t) in (n.meta.get("nn_module_stack") or {}).items()
                                                 if p == s.path)
    if not claimed:
        return sites
    calls = ModuleCalls(cap)
    out = []
    for s in sites:
        if s.path in claimed and s.role != "output" and s.node in nodes:
            for key in calls.of(s.path):
                if key in claimed[s.path]:
                    continue
                inside = calls.nodes[key]
                widths = {(ops.shape(n) or (None,))[-1:] for n in inside
                          if _tensor(n) and any(u.op == "output" or u not in inside for u in n.users)}
                if (s.out_features,) in widths or (s.out_slice and widths):
                    s = replace(s, path=None)
                    break
        out.append(s)
    return out


def _tensor(n) -> bool:
    val = n.meta.get("val") if hasattr(n, "meta") else None
    return val is not None and hasattr(val, "shape") and hasattr(val, "dtype")


def find_anchor(cap, site: Site, nodes: dict, calls: ModuleCalls) -> Anchor | None:
    """How the eager back end can change a site value that no module returns at every call, or ``None``.

    The value must be the only tensor one call of a module makes and hands out (``output``: a module called on
    the attention probabilities and the output, a method's computation returned by a sub-module, a projection
    whose tied weight is named after another module; or an unchanged copy of that tensor, see
    :func:`_same_value`: one stream's output of an attention that returns two, dropped out by the layer), or the only
    floating-point activation one call of a module reads (``input``: a value computed in a method and passed
    to a projection). Where that module is called several times, the call is told apart by its position
    among the module's calls inside one call of the enclosing module (which the graph must show called once),
    so the eager hook changes exactly the graph's value. Slices of packed projections have none."""
    v = nodes.get(site.node) if site.node else None
    if v is None or site.out_slice or len(site.call_nodes()) != 1:
        return None
    return anchor_of(cap, v, site.out_features, calls, nodes.get(site.x_node) if site.x_node else None)


def anchor_of(cap, v, width: int, calls: ModuleCalls, x=None) -> Anchor | None:
    """The :class:`Anchor` of graph node ``v`` (a value ``width`` wide; ``x``: the input of the projection that
    makes it, if any), or ``None``: see :func:`find_anchor`."""
    from . import ops

    shape = ops.shape(v)
    if not shape or shape[-1] != width:
        return None
    # made and handed out by one call: the value, or the value it is a copy of (see _same_value)
    weights = set(cap.param_names) | set(cap.buffer_names)
    for u in _same_value(v):
        found = _handed_out(calls, u, x, weights)
        if found is not None:
            return found
    # read by one call: the outermost call that holds every user of the value and not the value itself
    users = list(v.users)
    if not users or any(u.op == "output" for u in users):
        return None
    mine = set(v.meta.get("nn_module_stack") or {})
    keys = [k for k in (users[0].meta.get("nn_module_stack") or {}) if k not in mine
            and all(k in (u.meta.get("nn_module_stack") or {}) for u in users)]
    if not keys:
        return None
    key = keys[0]
    if _reads(calls.nodes[key], weights) != {v}:
        return None
    user_stack = list(users[0].meta["nn_module_stack"])
    parent = user_stack[user_stack.index(key) - 1]
    return _placed(calls, key, parent, "input")


def _reads(inside: set, weights: set) -> set:
    """The floating-point activations a call reads from outside it (not its weights)."""
    return {a for n in inside for a in n.all_input_nodes if a not in inside and a.name not in weights
            and _tensor(a) and a.meta["val"].dtype.is_floating_point}


def _same_value(v) -> list:
    """``v`` and the values it is an unchanged copy of, nearest first: back through ops of one tensor operand that
    keep its shape and dtype and change no value at inference (a dropout, an alias, a clone, a view or a
    ``contiguous`` to the same shape), each the only use of its operand. A hook on the call that hands out one of
    them changes ``v`` and nothing else, as the graph back end does (before the dropout instead of after it, as
    for a site module that returns its value before a dropout: :func:`returns_value`)."""
    from . import ops

    out = [v]
    while len(out) < 16:
        n = out[-1]
        if not ops.is_kind(n, ops.SAME_VALUE):
            break
        ins = ops.tensor_inputs(n)
        if len(ins) != 1 or len(ins[0].users) != 1 or not _tensor(ins[0]):
            break
        a, b = ins[0].meta["val"], n.meta["val"]
        if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
            break
        out.append(ins[0])
    return out


def _handed_out(calls: ModuleCalls, v, x, weights: set) -> Anchor | None:
    """The anchor of the call that makes ``v`` and hands out nothing else (innermost call first, while ``v``
    leaves the call), or ``None``. ``reads_x`` when that call reads the projection input ``x`` and no other
    activation."""
    stack = list((v.meta.get("nn_module_stack") or {}).items())
    for i in range(len(stack) - 1, 0, -1):
        key = stack[i][0]
        inside = calls.nodes[key]
        exits = {n for n in inside if _tensor(n) and any(u.op == "output" or u not in inside for u in n.users)}
        if v not in exits:
            return None
        if exits == {v}:
            anchor = _placed(calls, key, stack[i - 1][0], "output")
            if anchor is not None and x is not None and _reads(inside, weights) == {x}:
                anchor = anchor._replace(reads_x=True)
            return anchor
    return None


def _placed(calls: ModuleCalls, key: str, parent_key: str, at: str) -> Anchor | None:
    """The anchor of call ``key``: every call of its module when it is the module's only call, else its position
    among the module's calls inside the call ``parent_key`` (``None`` if that parent is called more than once:
    the position would name a call of another value there)."""
    path, parent = calls.path[key], calls.path[parent_key]
    if calls.of(path) == [key]:
        return Anchor(path, at, None, 0, 1)
    if len(calls.of(parent)) != 1:
        return None
    mine = calls.of(path, within=parent_key)
    return Anchor(path, at, parent, mine.index(key), len(mine))
