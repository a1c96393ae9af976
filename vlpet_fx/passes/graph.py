"""Graph back end: apply a plan to the captured torch.fx graph.

The model is captured in full (every layer), the plan's sites are found again in that graph by their
(stack, layer, block, role), and each PET module is inserted as a ``call_module`` node right after the
site's node (``after``: ``y' = pet.after(y)``; ``parallel``: ``y' = pet.parallel(x, y)`` with ``x`` the
linear op's input). Methods that read the block input X get the residual operand of the block's residual
add. The graph is linted and recompiled. The result is a ``torch.fx.GraphModule`` that takes the same
inputs as the model; sites that are not module outputs (packed ``in_proj_weight`` slices) are reachable here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..analysis import discover
from ..capture import Captured
from ..errors import PlanError
from ..modules.base import get_method
from ..planner.plan import Plan
from .base import build_pet, site_device_dtype


class _After(nn.Module):
    def __init__(self, pet):
        super().__init__()
        self.pet = pet

    def forward(self, y):
        return self.pet.after(y)


class _AfterWithInput(nn.Module):
    def __init__(self, pet):
        super().__init__()
        self.pet = pet

    def forward(self, x, y):
        return self.pet.gated(x, y)


class _Parallel(nn.Module):
    def __init__(self, pet):
        super().__init__()
        self.pet = pet

    def forward(self, x, y):
        return self.pet.parallel(x, y)


class GraphPatch(PassBase):
    def __init__(self, plan: Plan, model: nn.Module, captured: Captured, *, seed: int = 0):
        super().__init__()
        self.plan = plan
        self.model = model
        self.cap = captured
        self.seed = seed

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        table = discover(self.model, captured=self.cap)  # the full table, with node names
        nodes = {n.name: n for n in graph_module.graph.nodes}
        residual = _residual_nodes(self.model, self.cap)
        modified = False
        for i, p in enumerate(self.plan.placements):
            if not get_method(p.method).module.inserts_module:
                continue
            s = p.site
            try:
                full = table.get(s.stack, s.layer, s.block, s.role)
            except KeyError:
                raise PlanError(f"site {s} is not in the full capture's graph") from None
            node = nodes.get(full.node)
            if node is None:
                raise PlanError(f"graph node '{full.node}' of site {s} is missing from the graph module")
            device, dtype = site_device_dtype(graph_module)
            pet = build_pet(p, seed=self.seed, device=device, dtype=dtype)
            name = f"vlpet_{i}_{p.site.stack}_{p.site.layer}_{p.site.block}_{p.site.role}_{p.placement}"
            if p.placement == "parallel":
                x = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
                if x is None or s.role == "output":
                    raise PlanError(f"a parallel placement needs the input of a linear site; {s} has none in the graph")
                wrapper, args = _Parallel(pet), (x, node)
            elif getattr(pet, "needs_block_input", False):
                xnode = residual.get((s.stack, s.layer, s.block))
                if xnode is None:
                    raise PlanError(f"no block input found in the graph for {s}")
                wrapper, args = _AfterWithInput(pet), (nodes[xnode], node)
            else:
                wrapper, args = _After(pet), (node,)
            graph_module.add_submodule(name, wrapper)
            with graph_module.graph.inserting_after(node):
                new = graph_module.graph.call_module(name, args)
            node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
            new.meta = dict(node.meta)
            modified = True
        graph_module.graph.lint()
        graph_module.recompile()
        return PassResult(graph_module, modified)


def _residual_nodes(model: nn.Module, cap: Captured) -> dict[tuple, str]:
    from ..analysis.discover import blocks_of

    out = {}
    for b in blocks_of(model, cap):
        if b.residual is not None:
            out[(b.stack, b.layer, b.block)] = b.residual.name
    return out
