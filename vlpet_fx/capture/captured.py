"""The result of capture: a torch.fx graph plus the maps from its nodes back to the model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx


@dataclass
class Captured:
    """A model's computation as a torch.fx graph.

    ``graph_module`` is the ATen-level graph produced by ``torch.export`` (parameters and buffers are
    placeholders). ``param_names`` maps a placeholder node's name to the parameter's qualified name in
    the model; ``user_inputs`` lists the placeholders that are the model's own inputs.
    """

    graph_module: torch.fx.GraphModule
    method: str
    param_names: dict[str, str]
    buffer_names: dict[str, str]
    user_inputs: list[str]
    exported: object | None = None  # torch.export.ExportedProgram when method == "export"
    example_inputs: tuple[tuple, dict] = ((), {})
    # where the forward branched or looped on tensor values: the graph follows the example inputs' path there and
    # asserts it at run time (capture fell back to torch.export.draft_export); empty for an ordinary capture
    specialised: tuple[str, ...] = ()
    # modules kept as one opaque call each (their forward depends on tensor values in a way torch.export cannot
    # trace, see capture/opaque.py): the graph runs their real forward, the analysis finds no site inside them
    opaque: tuple[str, ...] = ()
    _order: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def graph(self) -> torch.fx.Graph:
        return self.graph_module.graph

    def order(self, node: torch.fx.Node) -> int:
        """Position of ``node`` in the graph's (topological) node order."""
        if not self._order:
            self._order.update({n.name: i for i, n in enumerate(self.graph.nodes)})
        return self._order[node.name]

    def param_of(self, node: torch.fx.Node) -> str | None:
        """The qualified parameter name a placeholder/get_attr node stands for, if any."""
        return self.param_names.get(node.name)

    def module_stack(self, node: torch.fx.Node) -> list[str]:
        """Module paths active when ``node`` ran, outermost first (the root module is ``""``)."""
        stack = node.meta.get("nn_module_stack") or {}
        return [path for path, _type in stack.values()]

    def module_path(self, node: torch.fx.Node) -> str | None:
        """The innermost module that executed ``node``."""
        stack = self.module_stack(node)
        return stack[-1] if stack else None

    def user_input_nodes(self) -> list[torch.fx.Node]:
        names = set(self.user_inputs)
        return [n for n in self.graph.nodes if n.op == "placeholder" and n.name in names]

    def __len__(self) -> int:
        return len(self.graph.nodes)
