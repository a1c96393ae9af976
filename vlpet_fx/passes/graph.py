"""Graph back end: apply a plan to the captured torch.fx graph.

The model is captured in full (every layer), the plan's sites are found again in that graph by their key
(``Site.key``, checked to name the same projection), and each PET module is inserted as a ``call_module`` node
right after the site's node (``after``: ``y' = pet.after(y)``; ``parallel``: ``y' = pet.parallel(x, y)`` with
``x`` the projection's input; on a slice site only the slice of ``y`` changes). Methods that read the block
input X get its node (``Site.input_node``: the residual-stream value entering the sub-layer, see
``analysis.discover.tie_block_input``). The graph is linted and recompiled. The result
is a ``torch.fx.GraphModule`` that takes the same inputs as the model; sites that are not module outputs
(packed ``in_proj_weight`` slices) are reachable here.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..analysis import SiteTable, ops
from ..errors import PlanError
from ..modules.base import get_method
from ..planner.plan import Plan
from .base import SiteApply, build_pet, gated_on_block_input, site_device_dtype

_SAFE = re.compile(r"[^0-9A-Za-z_]")


class _Apply(nn.Module):
    """A ``call_module`` target: one of the PET module's placement methods (``after``, ``gated``, ``parallel``),
    on the site's slice of the value for a slice site (the same :class:`SiteApply` as the eager back end)."""

    def __init__(self, pet: nn.Module, method: str, out_slice=None):
        super().__init__()
        self.pet = pet
        self.method = method
        self.site_apply = SiteApply(pet, method, out_slice).apply  # not `_apply`: nn.Module.to() calls that

    def forward(self, *tensors):
        return self.site_apply(*tensors)


class _ApplyAsBlockInput(_Apply):
    """``gated(X, y)`` where the op made ``y`` flattened to 2-D (``addmm``: HF Conv1D) while the block input ``X``
    keeps its token axes: ``y`` is viewed with ``X``'s leading shape for the call (as the eager back end sees
    the module's output) and flattened back."""

    def forward(self, x, y):
        return gated_on_block_input(self.site_apply, x, y)


class GraphPatch(PassBase):
    def __init__(self, plan: Plan, table: SiteTable, *, seed: int = 0):
        """``table`` is the site table of the full capture whose graph is rewritten (it names the nodes)."""
        super().__init__()
        self.plan = plan
        self.table = table
        self.seed = seed

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        table = self.table
        nodes = {n.name: n for n in graph_module.graph.nodes}
        modified = False
        for i, p in enumerate(self.plan.placements):
            if not get_method(p.method).module.inserts_module:
                continue
            s = p.site
            full = table[s.key] if s.key in table else None
            if full is None or full.public() != s.public():
                raise PlanError(f"site {s} is not in the full capture's graph: plan against this model's own sites")
            node = nodes.get(full.node)
            if node is None:
                raise PlanError(f"graph node '{full.node}' of site {s} is missing from the graph module")
            device, dtype = site_device_dtype(graph_module)
            pet = build_pet(p, seed=self.seed, device=device, dtype=dtype)
            name = "vlpet_{}_{}_{}".format(i, _SAFE.sub("_", s.key), p.placement)
            if p.placement == "parallel":
                x = nodes.get(full.x_node) if full.x_node else None
                if x is None or s.role == "output":
                    raise PlanError(f"a parallel placement needs the input of a projection; {s} has none in the graph")
                wrapper, args = _Apply(pet, "parallel", s.out_slice), (x, node)
            elif getattr(pet, "needs_block_input", False):
                if full.input_node not in nodes:
                    raise PlanError(f"no block input found in the graph for {s}")
                x_in = nodes[full.input_node]
                xs, ys = ops.shape(x_in), ops.shape(node)
                same = xs is None or ys is None or xs[:-1] == ys[:-1]
                wrapper = (_Apply if same else _ApplyAsBlockInput)(pet, "gated", s.out_slice)
                args = (x_in, node)
            else:
                wrapper, args = _Apply(pet, "after", s.out_slice), (node,)
            graph_module.add_submodule(name, wrapper)
            with graph_module.graph.inserting_after(node):
                new = graph_module.graph.call_module(name, args)
            node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
            new.meta = dict(node.meta)
            modified = True
        graph_module.graph.lint()
        graph_module.recompile()
        return PassResult(graph_module, modified)

