"""The public API: plan → patch (eager or graph back end) → summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .analysis import SiteTable, discover
from .capture import capture
from .errors import PlanError
from .passes import EagerPatch, Freeze, GraphPatch, unpatch
from .planner import Plan, plan
from .rules import RuleSet, load_rules


def patch(model: nn.Module, rules: "RuleSet | str | Plan", *, seed: int = 0, table: SiteTable | None = None,
          example_inputs: Any = None, backend: str = "eager") -> nn.Module:
    """Insert the PET modules the rules call for and freeze everything not declared trainable.

    ``backend="eager"`` (default) changes ``model`` in place and returns it; ``backend="graph"`` returns a
    new ``torch.fx.GraphModule`` (see :func:`patch_graph`). A given ``Plan`` must have been made for this model
    (same parameter and buffer names and shapes), else PlanError. If patching fails midway the model is left
    exactly as it was: no PET module, no hook, every ``requires_grad`` flag as before.
    """
    if backend == "graph":
        return patch_graph(model, rules, seed=seed, example_inputs=example_inputs)
    if backend != "eager":
        raise PlanError(f"unknown back end '{backend}': use 'eager' or 'graph'")
    the_plan = rules if isinstance(rules, Plan) else plan(model, load_rules(rules), table=table,
                                                          example_inputs=example_inputs)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    result = EagerPatch(the_plan, seed=seed)(model)  # all or nothing by itself
    try:
        Freeze(the_plan, list(result.graph_module.vlpet_patch.attached))(result.graph_module)
    except BaseException:
        unpatch(model)
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    return result.graph_module


def patch_graph(model: nn.Module, rules: "RuleSet | str | Plan", *, seed: int = 0,
                example_inputs: Any = None) -> torch.fx.GraphModule:
    """The graph back end: capture ``model`` in full, insert PET ``call_module`` nodes, lint and recompile.

    Returns a GraphModule taking the model's inputs; its PET modules equal the eager back end's (same seed).
    """
    if isinstance(rules, Plan):
        rules.check_model(model)
    cap = capture(model, example_inputs)
    table = discover(model, captured=cap)  # the full capture's table: it names the graph nodes
    the_plan = rules if isinstance(rules, Plan) else plan(model, load_rules(rules), table=table)
    gm = GraphPatch(the_plan, table, seed=seed)(cap.exported.module()).graph_module
    # the GraphModule shares the model's parameters: a failed freeze must give them their flags back
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        Freeze(the_plan, [n for n, _ in gm.named_children() if n.startswith("vlpet_")])(gm)
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    gm.vlpet_plan = the_plan
    _fix_to_example(gm, cap.example_inputs)
    return gm


class GraphShapeWarning(UserWarning):
    """The graph back end's module is specialised to the example inputs (said once, at creation)."""


def _describe(args: tuple, kwargs: dict) -> dict[str, Any]:
    named = {f"arg{i}": a for i, a in enumerate(args)} | dict(kwargs)
    return {k: (tuple(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in named.items()}


def _fix_to_example(gm: torch.fx.GraphModule, example: tuple[tuple, dict]) -> None:
    """torch.export specialised the graph to the example's shapes and keywords, in eval mode: say so now, and
    refuse other inputs with one line (instead of torch's guard error)."""
    import warnings

    want = _describe(*example)
    gm.vlpet_example_inputs = want
    text = ", ".join(f"{k} {v}" for k, v in want.items())
    warnings.warn(f"graph back end: this GraphModule is fixed to the example inputs ({text}) and eval mode (no "
                  "dropout); use backend='eager' to train or to run other shapes", GraphShapeWarning, stacklevel=3)

    def check(module, args, kwargs):
        got = _describe(args, kwargs)
        if got != want:
            diff = next((k for k in dict.fromkeys([*want, *got]) if got.get(k, "absent") != want.get(k, "absent")))
            raise PlanError(f"the graph back end's module is fixed to its example inputs: '{diff}' is "
                            f"{got.get(diff, 'absent')}, the graph was made for {want.get(diff, 'absent')}; use "
                            "backend='eager' for other shapes, or patch_graph(..., example_inputs=...) with these")

    gm.register_forward_pre_hook(check, with_kwargs=True)


@dataclass
class Summary:
    rows: list[dict] = field(default_factory=list)  # {"group": "method"|"stack", "name", "trainable", "total"}
    trainable: int = 0
    total: int = 0

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        # the model as given (after patching: patched_params; field names in docs/CLI.md)
        return {"trainable_params": self.trainable, "patched_params": self.total,
                "trainable_percent": round(self.percent, 4), "rows": self.rows}


def summary(model: nn.Module) -> Summary:
    """Trainable / total parameters per PET method, per stack and overall (tied weights counted once)."""
    state = getattr(model, "vlpet_patch", None)
    the_plan = state.plan if state is not None else getattr(model, "vlpet_plan", None)
    roots = {}
    if the_plan is not None:
        from .planner.select import stack_roots

        roots = stack_roots(the_plan.table)
    by_method: dict[str, list[int]] = {}
    by_stack: dict[str, list[int]] = {}
    seen: set[int] = set()
    out = Summary()
    deepest_first = sorted(roots.items(), key=lambda kv: -len(kv[1]))
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        placement = state.placement_of_param(name) if state is not None else None
        method = placement.method if placement is not None else "base"
        if placement is not None:
            stack = placement.site.stack
        else:
            stack = next((k for k, r in deepest_first if r == "" or name.startswith(r + ".")), "other")
        for d, key in ((by_method, method), (by_stack, stack)):
            t = d.setdefault(key, [0, 0])
            t[1] += p.numel()
            if p.requires_grad:
                t[0] += p.numel()
        out.total += p.numel()
        if p.requires_grad:
            out.trainable += p.numel()
    for group, d in (("method", by_method), ("stack", by_stack)):
        for key, (tr, tot) in d.items():
            out.rows.append({"group": group, "name": key, "trainable": tr, "total": tot})
    return out
