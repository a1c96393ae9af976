"""Eager back end: apply a plan to the live model by module surgery.

Each PET module becomes a child of its site's module (``<site module>.pet_<role>_<placement>``), so the base
model's own parameter names and ``state_dict`` keys do not change, and is called from a forward hook on that
module: ``after`` replaces the module's output ``y`` by ``pet.after(y)`` (``pet.gated(X, y)`` for a method that reads the
block input X); ``parallel`` by ``pet.parallel(x, y)``.
On a slice site (q, k or v of a packed projection, ``Site.out_slice``) the method sees and changes only its
slice of ``y`` (``pet_<role>_<slice>_<placement>``); the other channels pass unchanged.
A method that reads the block input X (VL-PET's gates) gets it from a forward pre-hook on the module that
receives X (``Site.input_path``, found from the dataflow). Hooks survive ``generate()`` with the KV cache,
``.to()``, autocast and gradient checkpointing, and ``torch.compile`` traces them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult

from .._text import shown
from ..errors import PlanError
from ..modules.base import get_method
from ..planner.plan import Placement, Plan
from .base import ModulePass, SiteApply, build_pet, gated_on_block_input, site_device_dtype


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_first(output, value):
    if isinstance(output, tuple):
        return (value,) + tuple(output[1:])
    if isinstance(output, list):
        return [value] + list(output[1:])
    return value


def _input_of(args, kwargs):
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


class AfterHook:
    """forward hook: y -> pet.after(y) (on the site's slice of y, for a slice site)."""

    def __init__(self, pet: nn.Module, out_slice=None):
        self.pet = pet
        self.apply = SiteApply(pet, "after", out_slice).apply

    def __call__(self, module, args, output):
        return _replace_first(output, self.apply(_first(output)))


class BlockInputHook:
    """forward hook for a method that reads the block input X (stashed on the PET module by :class:`StashInput`):
    y -> pet.gated(X, y), with y viewed with X's token axes where the module returns them flattened."""

    def __init__(self, pet: nn.Module, out_slice=None):
        self.pet = pet
        self.apply = SiteApply(pet, "gated", out_slice).apply

    def __call__(self, module, args, output):
        return _replace_first(output, gated_on_block_input(self.apply, self.pet.block_input, _first(output)))


class ParallelHook:
    """forward hook (with kwargs): y -> pet.parallel(x, y) (on the site's slice of y, for a slice site)."""

    def __init__(self, pet: nn.Module, out_slice=None):
        self.pet = pet
        self.apply = SiteApply(pet, "parallel", out_slice).apply

    def __call__(self, module, args, kwargs, output):
        return _replace_first(output, self.apply(_input_of(args, kwargs), _first(output)))


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _owner(model: nn.Module, path: str, name: str) -> tuple[nn.Module, str, str]:
    """Where a PET module lives: on the site's module, or beside it when that module is a container (a child
    of an nn.Sequential would be run by it). Returns (owner, attribute name, full path)."""
    target = model.get_submodule(path)
    if not isinstance(target, _CONTAINERS):
        return target, name, f"{path}.{name}" if path else name
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    attr = f"{child}_{name}"
    return parent, attr, f"{parent_path}.{attr}" if parent_path else attr


class StashInput:
    """forward pre-hook on the module that receives the block input X: hands X to the PET module."""

    def __init__(self, pet: nn.Module):
        self.pet = pet

    def __call__(self, module, args, kwargs):
        self.pet.block_input = _input_of(args, kwargs)
        return None


class EagerPatch(ModulePass):
    """Attach the plan's PET modules and hooks. All or nothing: if anything fails midway, every module and hook
    added so far is removed again before the error propagates (the model is as it was)."""

    def __init__(self, plan: Plan, *, seed: int = 0):
        self.plan = plan
        self.seed = seed

    def requires(self, module: nn.Module) -> None:
        if getattr(module, "vlpet_patch", None) is not None:
            raise PlanError("this model is already patched: patch the unpatched base model (vlpet_fx.load re-applies a plan)")
        self.plan.check_model(module)
        for p in self.plan.placements:
            if get_method(p.method).module.inserts_module and p.site.path is None:
                raise PlanError(
                    f"rule '{shown(p.rule)}' places {p.method} on {p.site}, which is not the output of a module (e.g. "
                    "a slice of a packed in_proj_weight): use the graph back end (backend='graph') or select another site"
                )

    def call(self, module: nn.Module) -> PassResult:
        attached: dict[str, Placement] = {}
        handles: list = []
        added: list[tuple[nn.Module, str]] = []
        try:
            for p in self.plan.placements:
                if not get_method(p.method).module.inserts_module:
                    continue
                target = module.get_submodule(p.site.path)
                owner, name, full = _owner(module, p.site.path, p.attach_name)
                if name in owner._modules or hasattr(owner, name):
                    raise PlanError(f"two placements share {shown(full, 120)}, or the model already has it; make the "
                                    "rules select one of them")
                device, dtype = site_device_dtype(target)
                pet = build_pet(p, seed=self.seed, device=device, dtype=dtype)
                if getattr(pet, "needs_block_input", False) and p.site.input_path is None:
                    raise PlanError(f"{p.method} on {p.site} reads the block input, which discovery could not tie to "
                                    "a module; use a gate that does not read it (gate: middleY or none)")
                owner.add_module(name, pet)
                added.append((owner, name))
                attached[full] = p
                if p.placement == "after" and getattr(pet, "needs_block_input", False):
                    handles.append(target.register_forward_hook(BlockInputHook(pet, p.site.out_slice)))
                elif p.placement == "after":
                    handles.append(target.register_forward_hook(AfterHook(pet, p.site.out_slice)))
                else:
                    handles.append(target.register_forward_hook(ParallelHook(pet, p.site.out_slice), with_kwargs=True))
                if getattr(pet, "needs_block_input", False):
                    src = module.get_submodule(p.site.input_path) if p.site.input_path else module
                    handles.append(src.register_forward_pre_hook(StashInput(pet), with_kwargs=True))
            module.vlpet_patch = PatchState(self.plan, attached, handles, added)
        except BaseException:
            _undo(handles, added)
            raise
        return PassResult(module, bool(attached))


def _undo(handles: list, added: list[tuple[nn.Module, str]]) -> None:
    for h in reversed(handles):
        h.remove()
    for owner, name in reversed(added):
        del owner._modules[name]


def unpatch(module: nn.Module) -> None:
    """Remove what :class:`EagerPatch` added (PET modules, hooks, ``vlpet_patch``). Parameters' requires_grad
    flags are not touched (:func:`vlpet_fx.patch` restores them itself when it rolls back)."""
    state = getattr(module, "vlpet_patch", None)
    if state is None:
        return
    _undo(state.handles, state.added)
    del module.vlpet_patch


class PatchState:
    """What `patch` did to a model (kept on the model as ``model.vlpet_patch``)."""

    def __init__(self, plan: Plan, attached: dict[str, Placement], handles: list,
                 added: list[tuple[nn.Module, str]] | None = None):
        self.plan = plan
        self.attached = attached  # module path of each PET module -> its placement
        self.handles = handles
        self.added = added or []  # (owner module, attribute) of each PET module, for unpatch

    def placement_of_param(self, name: str) -> Placement | None:
        for prefix, p in self.attached.items():
            if name.startswith(prefix + "."):
                return p
        return None
