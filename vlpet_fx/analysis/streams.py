"""Residual streams: which blocks form a stack, which stack is encoder/decoder/visual, layer order.

* Two blocks are consecutive in a stack when the residual operand of the later one reaches the residual
  add of the earlier one through light ops only (no projection, matmul, attention or concatenation).
* An attention block is *cross* attention when its keys come from a different stream than its queries.
* A stack fed only by image inputs is visual (float inputs, no token ids, and either a 4-D input or a
  convolution with a 2-D/3-D kernel on the way), even with cross attention (a pooling head's learned probe
  attending to the patches); otherwise a stack with cross attention is a decoder; a stack whose
  self-attention is causal (its mask compares query positions with key positions, or SDPA's ``is_causal``)
  is a decoder (a causal LM, the language model of a VLM); others encode.
* Blocks are grouped into layers by the module that holds them as an element of a homogeneous
  ``ModuleList`` / ``Sequential`` (all elements of one class: a structural fact, not a name); layers are
  ordered along the residual stream. Without such a container a new layer starts when a block kind repeats.
"""

from __future__ import annotations

from torch import nn

from . import ops
from .behaviour import causal_streams
from .dataflow import Block, Dataflow, Node, backward, forward, walk


def _frontier(flow: Dataflow, start: Node, barriers: set[Node]) -> frozenset[Node]:
    """The heavy ops and residual adds ``start`` is computed from through light ops (operands read only for their
    dtype or shape, such as ``type_as``'s second, carry no value: image features cast like the vision tower's
    output do not join the text stream to the vision tower's)."""
    if start in barriers:
        return frozenset([start])
    return frozenset(walk([start], ops.value_inputs, lambda n: not ops.is_heavy(n) and n not in barriers))


def _user_inputs_reaching(flow: Dataflow, node: Node) -> list[Node]:
    names = set(flow.cap.user_inputs)
    seen, stack, found = set(), [node], []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" and n.name in names:
            found.append(n)
        stack.extend(n.all_input_nodes)
    return found


_COMPARE = ops._overloads(ops.aten.le, ops.aten.lt, ops.aten.ge, ops.aten.gt)
_TRIANGLE = ops._overloads(ops.aten.tril, ops.aten.triu)
_ARANGE = ops._overloads(ops.aten.arange)


def _light_closure(start: list[Node], flow: Dataflow | None = None) -> list[Node]:
    """``start`` and every node upstream of it through light ops (stops at heavy ops and placeholders; passes a
    concatenation with learned logits when ``flow`` is given)."""
    seen: set[Node] = set()
    todo = [n for n in start if isinstance(n, Node)]
    out = []
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        out.append(n)
        if n.op == "call_function" and (not ops.is_heavy(n) or (flow is not None and flow.concat_with_weights(n))):
            todo.extend(n.all_input_nodes)
    return out


def _from_positions(node: Node) -> bool:
    return any(ops.is_kind(n, _ARANGE) for n in _light_closure([node]))


def is_causal(b: Block, flow: Dataflow | None = None) -> bool:
    """Whether an attention core masks keys by position: SDPA's ``is_causal``, a triangular mask, or a mask
    that compares two position ranges (``kv_idx <= q_idx``) — a fact of the dataflow, not of names."""
    core = b.core
    if core is None:
        return False
    n = core.node
    if ops.is_kind(n, ops.SDPA):
        if n.kwargs.get("is_causal") is True or (len(n.args) > 5 and n.args[5] is True):
            return True
        mask = n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None)
        start = [mask] if isinstance(mask, Node) else []
    else:  # matmul -> softmax -> matmul: the mask is added to the scores before the softmax
        hits = walk([n], backward, lambda x: not ops.is_heavy(x))
        sm = next((h for h in hits if ops.is_kind(h, ops.SOFTMAX)), None)
        start = list(sm.all_input_nodes) if sm is not None else []
    for m in _light_closure(start, flow):
        if ops.is_kind(m, _TRIANGLE):
            return True
        if ops.is_kind(m, _COMPARE):
            tensors = [a for a in m.args[:2] if isinstance(a, Node)]
            if len(tensors) == 2 and all(_from_positions(t) for t in tensors):
                return True
    return False


def _upstream(node: Node) -> set[Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return seen


def _is_visual(flow: Dataflow, node: Node) -> bool:
    """Fed by float inputs only (no token ids) that are images: a 4-D+ input or a 2-D/3-D convolution upstream."""
    names = set(flow.cap.user_inputs)
    up = _upstream(node)
    inputs = [n for n in up if n.op == "placeholder" and n.name in names]
    vals = [n.meta.get("val") for n in inputs]
    tensors = [v for v in vals if hasattr(v, "dtype")]
    floats = [v for v in tensors if v.dtype.is_floating_point]
    if not floats:
        return False
    # integer inputs that are not token ids (e.g. an image grid) may be there; token ids reach an embedding
    for n in inputs:
        v = n.meta.get("val")
        if hasattr(v, "dtype") and not v.dtype.is_floating_point and any(
                ops.is_kind(u, ops.EMBEDDING) for u in _down_light(n)):
            return False
    if any(ops.is_float_image(n) for n in inputs):
        return True
    for n in up:
        if ops.is_kind(n, ops.CONV) and len(n.args) > 1 and isinstance(n.args[1], Node):
            w = ops.shape(n.args[1])
            if w is not None and len(w) >= 4:
                return True
    return False


def _down_light(n: Node) -> list[Node]:
    """``n``'s users through light ops, with the first heavy op on each path."""
    return walk([n], forward, lambda x: not ops.is_heavy(x)) + [n]


def _stream_key(flow: Dataflow, node: Node, barriers: set[Node]) -> tuple:
    """Which stream a value comes from: the latest residual add upstream of it (through any op; e.g. past a
    partial rotary embedding's concatenation), and the model inputs reached before any residual add."""
    names = set(flow.cap.user_inputs)
    seen, todo, hits, inputs = set(), [node], [], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in barriers and n is not node:
            hits.append(n)
            continue
        if n.op == "placeholder" and n.name in names:
            inputs.add(n)
        todo.extend(n.all_input_nodes)
    latest = max(hits, key=flow.order.__getitem__) if hits else None
    return latest, frozenset(inputs)


def _stream_input(b: Block) -> Node:
    """The residual-stream value a block reads: its residual operand, or (without a residual add) the value its
    queries come from, or its first input (the keys and values of an attention read the stream of another)."""
    if b.residual is not None:
        return b.residual
    q = b.projections.get("q")
    if q:
        return q[0].x
    return b.core.q if b.core is not None and isinstance(b.core.q, Node) else b.first().x


def _common_prefix(stacks: list[list[str]]) -> list[str]:
    out = []
    for items in zip(*stacks):
        if all(i == items[0] for i in items):
            out.append(items[0])
        else:
            break
    return out


def assign_streams(flow: Dataflow, blocks: list[Block], model: nn.Module) -> None:
    """Fill ``stack``, ``block``, ``layer``, ``layer_path``, ``block_path`` and ``output_path``."""
    cap = flow.cap
    barriers = {b.residual_add: b for b in blocks if b.residual_add is not None}
    bar_set = set(barriers)

    # 1. predecessor along the residual stream -> union-find into stacks
    parent = list(range(len(blocks)))
    index = {id(b): i for i, b in enumerate(blocks)}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    last_of = {bl.end_node(): j for j, bl in enumerate(blocks)}
    for i, b in enumerate(blocks):
        front = _frontier(flow, _stream_input(b), bar_set)
        hits = [h for h in front if h in barriers]
        if hits:
            pred = barriers[max(hits, key=flow.order.__getitem__)]
            parent[find(i)] = find(index[id(pred)])
        # parallel blocks (attention and FFN read the same input, x + attn(x) + ffn(x)): the residual
        # operand of one is the other's output; they belong to the same stream
        for h in front:
            j = last_of.get(h)
            if j is not None and j != i and b.residual is not None:
                parent[find(i)] = find(j)
                # the stream value X both read is the other operand of the add after theirs
                users = list(b.residual_add.users) if b.residual_add is not None else []
                if len(users) == 1 and ops.is_tensor_add(users[0]):
                    nxt = users[0]
                    b.extra["stream_x"] = nxt.args[1] if nxt.args[0] is b.residual_add else nxt.args[0]

    # 2. self vs cross attention
    for b in blocks:
        if b.kind != "attn":
            b.block = b.kind  # "ffn" or "mixer" (token mixing that is not softmax attention)
            continue
        q = b.projections.get("q", [None])[0]
        q_in = q.x if q is not None else b.core.q
        # keys joined from several parts (a merged self + cross attention): cross when any part comes from another
        # stream
        k_ins = [k.x for k in b.projections.get("k", ())] or [b.core.k]
        same = all(q_in is k_in or _frontier(flow, q_in, bar_set) == _frontier(flow, k_in, bar_set)
                   or _stream_key(flow, q_in, bar_set) == _stream_key(flow, k_in, bar_set) for k_in in k_ins)
        b.block = "self_attn" if same else "cross_attn"
        b.extra["causal"] = is_causal(b, flow)

    # 3. stack kinds
    groups: dict[int, list[Block]] = {}
    for i, b in enumerate(blocks):
        groups.setdefault(find(i), []).append(b)
    undecided = []
    for members in groups.values():
        members.sort(key=lambda b: flow.order[b.start_node()])
        # a stream fed by images only is visual even where its attention reads another stream (a vision tower's
        # pooling head: a learned probe attends to the patch tokens); a stream that starts from weights only (the
        # probe) is judged by what it reads: its first block's input
        fed = next((_stream_input(b) for b in members if _user_inputs_reaching(flow, _stream_input(b))),
                   members[0].first().x if members[0].all_projections() else _stream_input(members[0]))
        if _is_visual(flow, fed):
            kind = "visual"
        elif any(b.block == "cross_attn" for b in members):
            kind = "decoder"
        elif any(b.extra.get("causal") for b in members if b.block == "self_attn"):
            kind = "decoder"
        else:
            kind = "encoder"
            if not any(b.kind == "attn" for b in members):
                undecided.append(members)  # no mask to read: decided by what the stream computes
        for b in members:
            b.stack = kind

    # 4. module structure: block path, layer container, output path
    modules = dict(model.named_modules())
    for b in blocks:
        stacks = [cap.module_stack(p.node) for p in b.all_projections()]
        common = _common_prefix(stacks)
        b.output_path = _output_path(cap, b, common)
        b.block_path = common[-1] if common else ""
        if b.branch is not None and b.output_path is not None and all(b.output_path in st for st in stacks):
            # a residual branch: the block is the module that produces its value when it holds every projection
            # (the mixture of experts around its shared expert; a branch without projections)
            b.block_path = b.output_path
        b.layer_path = _layer_container(b.block_path, modules)
        # a feed-forward map on no residual stream and in no repeated layer (a projector between two towers)
        # is not a layer of a stack
        b.extra["off_stream"] = b.kind == "ffn" and b.residual_add is None and b.layer_path is None

    # 4b. a stream piece without attention (an FFN whose residual add was not found, e.g. behind a norm on the
    # sub-layer's output) takes the stack of the attention in the same layer container
    kind_of_layer: dict[str, str] = {}
    for members in groups.values():
        if any(b.kind == "attn" for b in members):
            for b in members:
                if b.layer_path is not None:
                    kind_of_layer.setdefault(b.layer_path, b.stack)
    for members in groups.values():
        if not any(b.kind == "attn" for b in members):
            kinds = {kind_of_layer.get(b.layer_path) for b in members} - {None}
            if len(kinds) == 1:
                for b in members:
                    b.stack = next(iter(kinds))
                undecided = [ms for ms in undecided if ms is not members]

    # 4c. a stream without attention in any of its layers (SSM, recurrence) is a decoder when its values at a
    # position do not depend on later tokens (behaviour.py: the graph run on token ids that differ in one place)
    for members, causal in zip(undecided, causal_streams(flow, undecided)):
        if causal:
            for b in members:
                b.stack = "decoder"

    # 5. layers, numbered per stack kind along the stream (a layer container keeps its number across pieces)
    by_kind: dict[str, list[list[Block]]] = {}
    for members in sorted(groups.values(), key=lambda ms: flow.order[ms[0].start_node()]):
        by_kind.setdefault(members[0].stack, []).append(members)
    for kind, stacks in by_kind.items():
        layer = -1
        numbered: dict[str, int] = {}
        last_key: str | None = None  # the layer container of the last block numbered
        for members in stacks:
            current_key, current_kinds = object(), set()
            for b in members:
                if b.extra.get("off_stream"):
                    continue
                key = b.layer_path
                if key is not None and key in numbered:
                    b.layer, current_key, last_key = numbered[key], key, key
                    continue
                # a block outside any layer container right after a container's layer (a vision tower's pooling
                # head after its layer list) starts a layer of its own, as a repeated block kind does
                new = key != current_key if key is not None else (
                    b.block in current_kinds or layer < 0 or last_key is not None)
                if new:
                    layer += 1
                    current_key, current_kinds = key, set()
                current_kinds.add(b.block)
                b.layer, last_key = layer, key
                if key is not None:
                    numbered[key] = layer


def _layer_container(block_path: str, modules: dict[str, nn.Module]) -> str | None:
    """The element of a module list on ``block_path`` that is the block's layer: the innermost element of a
    homogeneous list (repeated layers, not a list of heterogeneous sub-layers such as T5's attention and FFN
    sub-layers inside its repeated block), or, when there is none, the outermost element of a list of composite
    modules of several classes (a hybrid's attention and recurrent layers)."""
    parts = block_path.split(".") if block_path else []
    mixed: str | None = None
    for i in range(len(parts), 0, -1):
        parent = ".".join(parts[: i - 1])
        container = modules.get(parent)
        if parts[i - 1].isdigit() and isinstance(container, (nn.ModuleList, nn.Sequential)):
            if len({type(m) for m in container}) == 1:
                return ".".join(parts[:i])
            if len(container) > 1 and all(next(m.children(), None) is not None for m in container):
                mixed = ".".join(parts[:i])
    return mixed


def _output_path(cap, b: Block, common: list[str]) -> str | None:
    if b.branch is not None:
        # the outermost module that produced the branch value and is not the one that adds it back
        add_scope = set(cap.module_stack(b.residual_add))
        outer = [p for p in cap.module_stack(b.output) if p not in add_scope]
        if outer:
            return outer[0]
        if not b.all_projections():
            return None
    last = b.last()
    if b.residual_add is None:
        return common[-1] if common and common[-1] else last.path
    add_scope = set(cap.module_stack(b.residual_add))
    for path in cap.module_stack(last.node):
        if path in add_scope:
            continue
        if path in common:
            return path
    return last.path
