"""Eager back end: apply a plan to the live model by module surgery.

Each PET module becomes a child of its site's module (``<site module>.pet_<role>_<placement>``), so the base
model's own parameter names and ``state_dict`` keys do not change, and is called from a forward hook on that
module: ``after`` replaces the module's output ``y`` by ``pet.after(y)`` (``pet.gated(X, y)`` for a method that reads the
block input X); ``parallel`` by ``pet.parallel(x, y)``.
On a slice site (q, k or v of a packed projection, ``Site.out_slice``) the method sees and changes only its
slice of ``y`` (``pet_<role>_<slice>_<placement>``); the other channels pass unchanged.
A method that reads the block input X (VL-PET's gates) gets it from a forward pre-hook on the module that
receives X (``Site.input_path``, found from the dataflow), or from the module call that hands X out
(``Site.input_anchor``). Hooks survive ``generate()`` with the KV cache,
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


class CallCount:
    """Which call of an anchor's module is the site's (:class:`vlpet_fx.analysis.sites.Anchor`): counted from
    each call of the enclosing module ``parent``; a parent call that runs the captured sequence of calls several
    times (XLNet's two attention streams) has the site in each repetition. Without a parent every call is."""

    def __init__(self, anchor, where: str):
        self.anchor = anchor
        self.where = where
        self.count = 0
        self.active = anchor.parent is None

    def start(self, module, args, kwargs):
        self.count, self.active = 0, True

    def stop(self, module, args, kwargs, output):
        self.active = False
        a = self.anchor
        if self.count % a.period:
            raise PlanError(f"{shown(a.parent or '<model>', 100)} called {shown(a.path, 100)} {self.count} times, the "
                            f"captured graph {a.period} times, so the call of site {self.where} is unknown: patch "
                            "with backend='graph', or select another site")

    def take(self) -> bool:
        """Whether this call of the anchor's module is the site's (counts it)."""
        if self.anchor.parent is None:
            return True
        if not self.active:
            return False
        self.count += 1
        return (self.count - 1) % self.anchor.period == self.anchor.index


def _only_tensor(values, width: int, where: str) -> int:
    """Position of the one floating-point tensor among ``values`` (what an anchor's call hands out or reads)."""
    found = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if len(found) != 1 or values[found[0]].shape[-1:] != (width,):
        raise PlanError(f"site {where}: its module's call does not hand out or read one tensor {width} wide, as in the "
                        "captured graph; patch with backend='graph', or select another site")
    return found[0]


class AnchorHook:
    """Hooks for a site value that no module returns at every call (``Site.anchor``): a forward hook changing
    the one tensor the anchor's call returns (``at="output"``), or a forward pre-hook changing the one tensor it
    reads (``at="input"``), at the site's calls only (:class:`CallCount`); ``after``, or ``gated`` on X. A
    ``parallel`` placement (only where the anchor's call is the site's projection, ``Anchor.reads_x``) gets the one
    tensor the call reads as the projection input x: y -> pet.parallel(x, y)."""

    def __init__(self, pet: nn.Module, site, count: CallCount, placement: str = "after"):
        self.pet = pet
        self.count = count
        self.width = site.out_features
        self.in_width = site.in_features
        self.where = site.key
        if placement == "parallel":
            self.apply_x = SiteApply(pet, "parallel", None).apply
            return
        gated = getattr(pet, "needs_block_input", False)
        apply = SiteApply(pet, "gated" if gated else "after", None).apply
        self.change = (lambda y: gated_on_block_input(apply, self.pet.block_input, y)) if gated else apply

    def _changed(self, values: list):
        i = _only_tensor(values, self.width, self.where)
        values[i] = self.change(values[i])
        return values

    def _handed_out(self, output, change):
        if isinstance(output, torch.Tensor):
            return change([output])[0]
        if isinstance(output, (tuple, list)):
            return type(output)(change(list(output)))
        raise PlanError(f"site {self.where}: its module returned a {type(output).__name__}, not a tensor; patch with "
                        "backend='graph', or select another site")

    def output(self, module, args, output):
        if not self.count.take():
            return None
        return self._handed_out(output, self._changed)

    def output_parallel(self, module, args, kwargs, output):
        if not self.count.take():
            return None
        reads = list(args) + list(kwargs.values())
        x = reads[_only_tensor(reads, self.in_width, self.where)]

        def change(values: list):
            i = _only_tensor(values, self.width, self.where)
            values[i] = self.apply_x(x, values[i])
            return values

        return self._handed_out(output, change)

    def input(self, module, args, kwargs):
        if not self.count.take():
            return None
        names = list(kwargs)
        values = self._changed(list(args) + [kwargs[k] for k in names])
        return tuple(values[:len(args)]), dict(zip(names, values[len(args):]))


def _anchored(model: nn.Module, anchor, count: CallCount, on_output, on_input, *, output_kwargs: bool = False) -> list:
    """Register hooks at an anchor (the counting of its module's calls on ``anchor.parent``, and ``on_output``
    -- called with the call's kwargs too if ``output_kwargs`` -- or ``on_input`` on its module); returns their
    handles."""
    handles = []
    if anchor.parent is not None:
        parent = model.get_submodule(anchor.parent)
        handles.append(parent.register_forward_pre_hook(count.start, with_kwargs=True))
        handles.append(parent.register_forward_hook(count.stop, with_kwargs=True, always_call=False))
    target = model.get_submodule(anchor.path)
    if anchor.at == "output":
        handles.append(target.register_forward_hook(on_output, with_kwargs=output_kwargs))
    else:
        handles.append(target.register_forward_pre_hook(on_input, with_kwargs=True))
    return handles


def _hook_anchor(model: nn.Module, anchor, pet: nn.Module, p: Placement) -> list:
    """Register the hooks of an anchored placement; returns their handles."""
    hook = AnchorHook(pet, p.site, CallCount(anchor, p.site.key), p.placement)
    parallel = anchor.at == "output" and p.placement == "parallel"
    return _anchored(model, anchor, hook.count, hook.output_parallel if parallel else hook.output, hook.input,
                     output_kwargs=parallel)


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
    """forward pre-hook on the module that receives the block input X (``Site.input_path``): hands X to the PET
    module. X is the module's first input of X's rank and width (discovery checks that no other input it reads
    has them); its first input when X's shape is unknown."""

    def __init__(self, pet: nn.Module, rank: int | None = None, width: int | None = None):
        self.pet = pet
        self.rank = rank
        self.width = width

    def __call__(self, module, args, kwargs):
        self.pet.block_input = self.pick(args, kwargs)
        return None

    def pick(self, args, kwargs):
        if self.rank is not None and self.width is not None:
            for v in list(args) + list(kwargs.values()):
                if isinstance(v, torch.Tensor) and v.dim() == self.rank and v.shape[-1] == self.width:
                    return v
        return _input_of(args, kwargs)


class StashAnchored:
    """Hooks on the module call that hands out or reads the block input X when no module receives it as its
    input (``Site.input_anchor``): the one tensor that call returns (``at="output"``) or reads (``"input"``)."""

    def __init__(self, pet: nn.Module, site, count: CallCount):
        self.pet = pet
        self.count = count
        self.width = site.input_features
        self.where = site.key

    def _stash(self, values) -> None:
        self.pet.block_input = values[_only_tensor(values, self.width, self.where)]

    def output(self, module, args, output):
        if self.count.take():
            self._stash(list(output) if isinstance(output, (tuple, list)) else [output])

    def input(self, module, args, kwargs):
        if self.count.take():
            self._stash(list(args) + list(kwargs.values()))


class ReleaseStash:
    """forward hook (always called, on return or error) on the innermost called module that holds both the module
    X is taken at and the site's module: without autograd (evaluation, generation) it drops the block input X
    stashed on those PET modules once every read of it is over, so that an inference forward frees each X after
    its sub-layer, as the unpatched model does, instead of holding every site's X to the end and after.

    With autograd the stash stays until the next forward replaces it: the autograd graph holds X anyway, and
    activation checkpointing re-runs a layer's ``forward`` in backward without the hooks of the module it
    wraps (transformers checkpoints ``forward``), which may be the module X is taken at. A region re-run in
    backward that contains this hook's module contains the module X is taken at too, so it stashes X again."""

    def __init__(self, pets: list[nn.Module]):
        self.pets = pets

    def __call__(self, module, args, output):
        if torch.is_grad_enabled():
            return
        for pet in self.pets:
            pet.block_input = None


def _scope(model: nn.Module, a: str, b: str) -> str:
    """Path of the innermost module containing module paths ``a`` and ``b`` that is called (not a ModuleList or
    ModuleDict, whose hooks never run); ``""`` is the model."""
    common = []
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        common.append(x)
    while common and isinstance(model.get_submodule(".".join(common)), (nn.ModuleList, nn.ModuleDict)):
        common.pop()
    return ".".join(common)


def _hook_releases(model: nn.Module, stashed: list) -> list:
    """One :class:`ReleaseStash` per scope (see :func:`_scope`) of the PET modules that read X; returns the
    handles."""
    scopes: dict[str, list[nn.Module]] = {}
    for pet, taken_at, site_module in stashed:
        scopes.setdefault(_scope(model, taken_at, site_module), []).append(pet)
    return [(model.get_submodule(path) if path else model).register_forward_hook(ReleaseStash(pets), always_call=True)
            for path, pets in scopes.items()]


def _hook_input_anchor(model: nn.Module, pet: nn.Module, p: Placement) -> list:
    """Register the hooks that hand the PET module X from ``Site.input_anchor``; returns their handles."""
    stash = StashAnchored(pet, p.site, CallCount(p.site.input_anchor, p.site.key))
    return _anchored(model, p.site.input_anchor, stash.count, stash.output, stash.input)


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
            if not get_method(p.method).module.inserts_module or p.site.path is not None:
                continue
            if p.site.anchor is None:
                raise PlanError(
                    f"rule '{shown(p.rule)}' places {p.method} on {p.site}, which is not the output of a module (e.g. "
                    "a slice of a packed in_proj_weight): use the graph back end (backend='graph') or select another site"
                )
            if p.placement == "parallel" and not (p.site.anchor.at == "output" and p.site.anchor.reads_x):
                raise PlanError(
                    f"rule '{shown(p.rule)}' places {p.method} 'parallel' on {p.site}, a value no module returns at "
                    "every call, so the eager back end cannot see its projection's input: use `placement: after`, "
                    "or the graph back end (backend='graph')"
                )

    def call(self, module: nn.Module) -> PassResult:
        attached: dict[str, Placement] = {}
        handles: list = []
        added: list[tuple[nn.Module, str]] = []
        anchored: list = []  # hooked after every other placement (see below)
        stashed: list = []  # (PET module reading X, module X is taken at, the site's module)
        try:
            for p in self.plan.placements:
                if not get_method(p.method).module.inserts_module:
                    continue
                anchor = p.site.anchor if p.site.path is None else None
                where = p.site.path if anchor is None else anchor.path
                target = module.get_submodule(where)
                owner, name, full = _owner(module, where, p.attach_name)
                if name in owner._modules or hasattr(owner, name):
                    raise PlanError(f"two placements share {shown(full, 120)}, or the model already has it; make the "
                                    "rules select one of them")
                device, dtype = site_device_dtype(target)
                pet = build_pet(p, seed=self.seed, device=device, dtype=dtype)
                reads_x = getattr(pet, "needs_block_input", False)
                if reads_x and p.site.input_path is None and p.site.input_anchor is None:
                    raise PlanError(f"{p.method} on {p.site} reads the block input, which discovery could not tie to "
                                    "a module; use a gate that does not read it (gate: middleY or none)")
                owner.add_module(name, pet)
                added.append((owner, name))
                attached[full] = p
                if reads_x and p.site.input_path is not None:  # first: X is stashed before any hook reads it
                    stash = StashInput(pet, p.site.input_rank, p.site.input_features)
                    handles.append(module.get_submodule(p.site.input_path).register_forward_pre_hook(
                        stash, with_kwargs=True))
                elif reads_x:
                    handles.extend(_hook_input_anchor(module, pet, p))
                if reads_x:
                    stashed.append((pet, p.site.input_path or p.site.input_anchor.path, where))
                if anchor is not None:
                    anchored.append((anchor, pet, p))
                elif p.placement == "after" and getattr(pet, "needs_block_input", False):
                    handles.append(target.register_forward_hook(BlockInputHook(pet, p.site.out_slice)))
                elif p.placement == "after":
                    handles.append(target.register_forward_hook(AfterHook(pet, p.site.out_slice)))
                else:
                    handles.append(target.register_forward_hook(ParallelHook(pet, p.site.out_slice), with_kwargs=True))
            # an anchored value is the value a module's call hands out or one after it (a copy of it through a
            # dropout): its hooks run after those of a site the module returns (an attention's o and output on one
            # projection call), as the graph back end changes the later value after the earlier one
            for anchor, pet, p in anchored:
                handles.extend(_hook_anchor(module, anchor, pet, p))
            handles.extend(_hook_releases(module, stashed))
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
