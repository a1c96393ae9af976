"""Graph back end: apply a plan to the captured torch.fx graph.

The model is captured in full (every layer), the plan's sites are found again in that graph by their key
(``Site.key``, checked to name the same projection), and each PET module is inserted as a ``call_module`` node
right after the site's node — after every call's node when the site's module is called several times, with
one PET module (``after``: ``y' = pet.after(y)``; ``parallel``: ``y' = pet.parallel(x, y)`` with
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
        changed: dict[torch.fx.Node, torch.fx.Node] = {}  # a site's node -> the node that now stands for it
        modified = False
        for i, p in enumerate(self.plan.placements):
            if not get_method(p.method).module.inserts_module:
                continue
            s = p.site
            full = table[s.key] if s.key in table else None
            if full is None or full.public() != s.public():
                raise PlanError(f"site {s} is not in the full capture's graph: plan against this model's own sites")
            calls = full.call_nodes()
            if any(c.node not in nodes for c in calls):
                missing = next(c.node for c in calls if c.node not in nodes)
                raise PlanError(f"graph node '{missing}' of site {s} is missing from the graph module")
            device, dtype = site_device_dtype(graph_module)
            pet = build_pet(p, seed=self.seed, device=device, dtype=dtype)
            name = "vlpet_{}_{}_{}".format(i, _SAFE.sub("_", s.key), p.placement)
            wrappers: dict[type, str] = {}  # one PET module for every call of the site's module
            for call in calls:
                node = nodes[call.node]
                if p.placement == "parallel":
                    x = changed.get(nodes.get(call.x_node)) or nodes.get(call.x_node) if call.x_node else None
                    if x is None or s.role == "output":
                        raise PlanError(f"a parallel placement needs the input of a projection; {s} has none in the graph")
                    kind, args = _Apply, (x, node)
                    method = "parallel"
                elif getattr(pet, "needs_block_input", False):
                    if call.input_node not in nodes:
                        raise PlanError(f"no block input found in the graph for {s}")
                    x_in = changed.get(nodes[call.input_node]) or nodes[call.input_node]
                    xs, ys = ops.shape(x_in), ops.shape(node)
                    same = xs is None or ys is None or xs[:-1] == ys[:-1]
                    kind, args, method = (_Apply if same else _ApplyAsBlockInput), (x_in, node), "gated"
                else:
                    kind, args, method = _Apply, (node,), "after"
                if kind not in wrappers:  # (a second wrapper kind shares the same PET module)
                    wrappers[kind] = name if not wrappers else f"{name}_{len(wrappers) + 1}"
                    graph_module.add_submodule(wrappers[kind], kind(pet, method, s.out_slice))
                with graph_module.graph.inserting_after(node):
                    new = graph_module.graph.call_module(wrappers[kind], args)
                node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
                new.meta = dict(node.meta)
                changed[node] = new
                modified = True
        graph_module.graph.lint()
        graph_module.recompile()
        return PassResult(graph_module, modified)

