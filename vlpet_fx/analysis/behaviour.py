"""Causality of a stack without attention, read from what its graph computes.

A stack made only of token mixers that are not softmax attention (Mamba's scan, RWKV's recurrence, xLSTM's
cells) has no mask to read. It is causal when its residual-stream values at positions before ``p`` do not
change when the token at ``p`` changes: the captured graph is run twice (``torch.fx.Interpreter``) on the
same inputs except the token ids at the middle position, with seeded random parameters (causality is a fact
of the structure, not of the weights: a meta-device model gets the same answer as one with weights), and the
stream values are compared along their position axis. A stream whose earlier positions change, or a run that
cannot be made (no token ids, a value that is not finite, an op that fails on the synthetic values), is not
called causal.
"""

from __future__ import annotations

import torch

from . import ops
from .dataflow import Block, Dataflow, Node, forward, walk

# stream values at earlier positions may differ by this much relative to the change at later positions
# (exact zero in practice; the margin only covers reordered float sums)
REL_TOL = 1e-6
_SEED = 0
_SCALE = 0.1


def _token_ids(flow: Dataflow) -> tuple[Node, int] | None:
    """The first integer model input that reaches an embedding (through light ops), and the embedding's rows."""
    names = set(flow.cap.user_inputs)
    for n in flow.cap.graph.nodes:
        if n.op != "placeholder" or n.name not in names:
            continue
        val = n.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dtype.is_floating_point or val.dtype == torch.bool:
            continue
        if val.dim() < 1 or ops.shape(n) is None or ops.shape(n)[-1] < 2:
            continue
        for u in walk([n], forward, lambda x: not ops.is_heavy(x)):
            if ops.is_kind(u, ops.EMBEDDING) and len(u.args) > 1 and isinstance(u.args[0], Node):
                rows = ops.shape(u.args[0])
                if rows and rows[0] >= 2:
                    return n, rows[0]
    return None


def _values(flow: Dataflow, ids: Node, rows: int) -> list | None:
    """A value for every placeholder of the graph: seeded random parameters; buffers, constants and inputs as
    captured when they hold data (a meta-device capture gets random floats, ones for other integer inputs and
    random token ids)."""
    cap = flow.cap
    ep = cap.exported
    if ep is None:
        return None
    args, kwargs = cap.example_inputs
    try:
        captured = ep._graph_module_flat_inputs(args, kwargs)
    except Exception:  # noqa: BLE001 -- inputs torch.export itself does not take back: no verdict
        return None
    placeholders = [n for n in cap.graph.nodes if n.op == "placeholder"]
    if len(captured) != len(placeholders):
        return None
    gen = torch.Generator().manual_seed(_SEED)
    out = []
    for node, value in zip(placeholders, captured):
        val = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            out.append(value)
            continue
        shape = tuple(int(s) for s in value.shape)
        if node.name in cap.param_names and value.dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen, dtype=torch.float32).to(value.dtype) * _SCALE)
        elif value.device.type != "meta":
            out.append(value.detach().to("cpu").clone())
        elif node is ids:
            out.append(torch.randint(0, rows, shape, generator=gen, dtype=value.dtype))
        elif value.dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen, dtype=torch.float32).to(value.dtype) * _SCALE)
        elif node.name in cap.user_inputs:
            out.append(torch.ones(shape, dtype=value.dtype))  # attention masks and flags: keep every token
        else:
            return None  # an integer buffer without data: nothing sensible to make up
        if isinstance(val, torch.Tensor) and tuple(out[-1].shape) != tuple(int(s) for s in val.shape):
            return None
    return out


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, wanted: set[Node]):
        super().__init__(gm, garbage_collect_values=True)
        self.wanted = wanted
        self.seen: dict[Node, torch.Tensor] = {}

    def run_node(self, n: Node):
        result = super().run_node(n)
        if n in self.wanted and isinstance(result, torch.Tensor):
            self.seen[n] = result.detach().clone()
        return result


def _causal_value(before: torch.Tensor, after: torch.Tensor, length: int, pos: int) -> bool | None:
    """True when the change is confined to positions >= ``pos`` along some axis of size ``length``; False when
    it is not; None when nothing changed (the value does not depend on the token)."""
    if before.shape != after.shape or not before.is_floating_point():
        return None
    if not (torch.isfinite(before).all() and torch.isfinite(after).all()):
        return None
    diff = (after.float() - before.float()).abs()
    total = float(diff.max()) if diff.numel() else 0.0
    if total == 0.0:
        return None
    for axis, size in enumerate(diff.shape):
        if size != length:
            continue
        earlier = float(diff.narrow(axis, 0, pos).max())
        if earlier <= REL_TOL * total:
            return True
    return False


def causal_streams(flow: Dataflow, groups: list[list[Block]]) -> list[bool]:
    """For each group of blocks (one residual stream): whether its values at a position depend only on the
    tokens up to that position (see the module docstring). Never raises: a run that cannot be made is False."""
    if not groups:
        return []
    found = _token_ids(flow)
    if found is None:
        return [False] * len(groups)
    ids, rows = found
    targets = [[b.residual_add if b.residual_add is not None else b.output for b in members] for members in groups]
    wanted = {n for ts in targets for n in ts if n is not None}
    try:
        values = _values(flow, ids, rows)
        if values is None:
            return [False] * len(groups)
        index = [n for n in flow.cap.graph.nodes if n.op == "placeholder"].index(ids)
        tokens = values[index]
        length = int(tokens.shape[-1])
        pos = length // 2
        changed = tokens.clone()
        changed[..., pos] = (changed[..., pos] + 1) % rows
        runs = []
        with torch.no_grad():
            for t in (tokens, changed):
                rec = _Recorder(flow.cap.graph_module, wanted)
                rec.run(*values[:index], t, *values[index + 1:])
                runs.append(rec.seen)
    except Exception:  # noqa: BLE001 -- a graph that does not run on synthetic values gives no verdict
        return [False] * len(groups)
    verdicts = []
    for ts in targets:
        seen = [_causal_value(runs[0][n], runs[1][n], length, pos) for n in ts if n in runs[0] and n in runs[1]]
        informative = [v for v in seen if v is not None]
        verdicts.append(bool(informative) and all(informative))
    return verdicts
