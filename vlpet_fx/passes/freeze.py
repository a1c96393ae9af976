"""Freeze pass: exactly the plan's trainable parameters (PET modules + declared existing ones) require grad."""

from __future__ import annotations

from torch import nn
from torch.fx.passes.infra.pass_base import PassResult

from ..errors import PlanError
from ..planner.plan import Plan
from .base import ModulePass


class Freeze(ModulePass):
    def __init__(self, plan: Plan, pet_prefixes: list[str]):
        self.plan = plan
        self.prefixes = tuple(p + "." for p in pet_prefixes)

    def call(self, module: nn.Module) -> PassResult:
        # a tied parameter that trains under one of its names trains under all of them (it is one tensor)
        train = {id(p) for n, p in module.named_parameters(remove_duplicate=False)
                 if n.startswith(self.prefixes) or n in self.plan.trainable}
        for param in module.parameters():
            param.requires_grad_(id(param) in train)
        return PassResult(module, True)

    def ensures(self, module: nn.Module) -> None:
        want = self.plan.trainable_params
        have = sum(p.numel() for p in module.parameters() if p.requires_grad)
        if have != want:  # e.g. a parameter the plan counted is shared with, or hidden behind, another name
            raise PlanError(f"after patching {have:,} parameters train but the plan counted {want:,}: the model changed "
                            "since it was planned, or shares weights between selected and unselected modules; "
                            "plan the model as it is patched")
