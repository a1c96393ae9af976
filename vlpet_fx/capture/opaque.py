"""Opaque module calls: capture a model around sub-modules that torch.export cannot trace.

A module whose forward depends on tensor *values* for its control flow or sizes (a mixture of experts looping
over the experts its router picked, a split by lengths read from a tensor) stops torch.export, and
``draft_export`` cannot always specialise it either. :func:`opaque_modules` keeps every call of such a module as
ONE graph node, ``torch.ops.vlpet_fx.opaque(slot, tensors, state)``:

* ``tensors`` are the call's tensor arguments, ``state`` the module's parameters and buffers, so the graph still
  shows which values and weights the call reads (and gradients reach both);
* the node's output shapes are the ones the module returned for that call when the model ran eagerly on the
  same example inputs (recorded first, call by call); the capture is specialised to those shapes anyway;
* running the node runs the module's real forward (``torch.func.functional_call`` with the graph's weights), so
  the graph computes exactly what the model computes for any values of the inputs; a call that returns another
  structure or shape than the recorded one raises :class:`~vlpet_fx.errors.CaptureError`;
* the analysis treats the node as heavy (a walk stops there) and finds no site inside it: those sites are given
  up, the sites around it (the router, the residual branch holding it) are kept.

The slot numbers refer to this process's modules: a graph holding opaque calls cannot be saved as a program
(``vlpet_fx.export.load_pt2`` refuses a ``.pt2`` that calls the op, and ``export --format pt2`` of a model with
such a module stops in one line: :mod:`vlpet_fx.export.pt2`).
"""

from __future__ import annotations

import contextlib
import itertools
import random
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import CaptureError

MAX_CALLS = 10_000  # recorded calls per capture (a bound on the record, not on the model)


@dataclass(frozen=True)
class _Meta:
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


def _meta(t: torch.Tensor) -> _Meta:
    return _Meta(tuple(int(s) for s in t.shape), t.dtype, t.device)


def _same_inputs(tensors: list[torch.Tensor], metas: tuple[_Meta, ...]) -> bool:
    """The tensors seen under torch.export match the recorded call (a size computed from data, which has no
    integer value while tracing, is not compared)."""
    return len(tensors) == len(metas) and all(
        t.dtype == m.dtype and t.dim() == len(m.shape)
        and all(not isinstance(s, int) or s == w for s, w in zip(t.shape, m.shape))
        for t, m in zip(tensors, metas))


@dataclass
class _Layout:
    """A pytree whose tensor leaves are taken out: the spec, where the tensors were and the other leaves."""

    spec: Any
    tensor_at: tuple[int, ...]
    constants: tuple

    @staticmethod
    def split(tree) -> tuple["_Layout", list[torch.Tensor]]:
        leaves, spec = pytree.tree_flatten(tree)
        at = tuple(i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor))
        constants = tuple(None if i in at else x for i, x in enumerate(leaves))
        return _Layout(spec, at, constants), [leaves[i] for i in at]

    def join(self, tensors) -> Any:
        leaves = list(self.constants)
        for i, t in zip(self.tensor_at, tensors):
            leaves[i] = t
        return pytree.tree_unflatten(leaves, self.spec)


@dataclass
class _Slot:
    """One opaque call site of a captured graph."""

    module: "weakref.ReferenceType[nn.Module]"
    path: str
    inputs: _Layout
    state_names: tuple[str, ...]
    outputs: _Layout
    out_meta: tuple[_Meta, ...]


_SLOTS: dict[int, _Slot] = {}
_REAL = threading.local()  # inside _run: a module kept opaque runs its own forward
# slots start at a random number: a graph saved and loaded in another process names no module of that process
_NEXT = itertools.count(random.SystemRandom().randrange(1 << 40) << 16)


def _forget(slots: list[int]) -> None:
    for s in slots:
        _SLOTS.pop(s, None)


def _state(module: nn.Module) -> tuple[tuple[str, ...], list[torch.Tensor]]:
    named = [*module.named_parameters(), *module.named_buffers()]
    return tuple(n for n, _ in named), [t for _, t in named]


_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)


def _same_constants(got: tuple, want: tuple) -> bool:
    """The non-tensor leaves of a call's output equal the recorded ones (plain values compared; others, such as
    objects without a value equality, only by type)."""
    return len(got) == len(want) and all(
        (g == w) if isinstance(w, _PLAIN) else type(g) is type(w) for g, w in zip(got, want))


def _run(slot: int, tensors: list[torch.Tensor], state: list[torch.Tensor]) -> list[torch.Tensor]:
    entry = _SLOTS.get(slot)
    module = entry.module() if entry is not None else None
    if module is None:
        raise CaptureError("an opaque call of a captured graph refers to a module that no longer exists: "
                           "capture the model again in this process")
    args, kwargs = entry.inputs.join(tensors)
    was, _REAL.active = getattr(_REAL, "active", False), True
    try:  # the module's own forward, also while opaque_modules is active (draft_export runs the op for real)
        out = torch.func.functional_call(module, dict(zip(entry.state_names, state)), tuple(args), kwargs)
    finally:
        _REAL.active = was
    layout, outs = _Layout.split(out)
    if layout.spec != entry.outputs.spec or not _same_constants(layout.constants, entry.outputs.constants) or \
            tuple(_meta(t) for t in outs) != entry.out_meta:
        raise CaptureError(
            f"module '{entry.path}' (kept as one opaque call in the captured graph) returned "
            f"{[tuple(t.shape) for t in outs]} where the capture recorded {[m.shape for m in entry.out_meta]}: "
            "its output shapes depend on the values of its inputs; use the eager back end for this model")
    return outs


@torch.library.custom_op("vlpet_fx::opaque", mutates_args=())
def opaque(slot: int, tensors: list[torch.Tensor], state: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run the module of ``slot`` on ``tensors`` with ``state`` as its parameters and buffers."""
    # a custom op returns new tensors, never its inputs, views of them or one tensor twice
    return [t.clone() for t in _run(slot, tensors, state)]


@opaque.register_fake
def _opaque_fake(slot: int, tensors: list[torch.Tensor], state: list[torch.Tensor]) -> list[torch.Tensor]:
    entry = _SLOTS.get(slot)
    if entry is None:
        raise CaptureError(f"unknown opaque call {slot}: capture the model again in this process")
    return [torch.empty(m.shape, dtype=m.dtype, device=m.device) for m in entry.out_meta]


def _setup(ctx, inputs, output) -> None:
    slot, tensors, state = inputs
    ctx.slot, ctx.n = slot, len(tensors)
    ctx.save_for_backward(*tensors, *state)


def _backward(ctx, grads):
    saved = ctx.saved_tensors
    leaves = [t.detach().requires_grad_(t.is_floating_point() or t.is_complex()) for t in saved]
    with torch.enable_grad():
        outs = _run(ctx.slot, leaves[:ctx.n], leaves[ctx.n:])
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
    wanted = [t for t in leaves if t.requires_grad]
    got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
               if pairs and wanted else [None] * len(wanted))
    result = [next(got) if t.requires_grad else None for t in leaves]
    return None, result[:ctx.n], result[ctx.n:]


opaque.register_autograd(_backward, setup_context=_setup)
OPAQUE_OP = torch.ops.vlpet_fx.opaque.default


def _record(model: nn.Module, modules: dict[str, nn.Module], args: tuple, kwargs: dict) -> dict[int, list]:
    """Run ``model`` eagerly once and record, call by call, what each of ``modules`` took and returned."""
    calls: dict[int, list] = {id(m): [] for m in modules.values()}
    count = [0]

    def hook(mod, a, kw, out):
        count[0] += 1
        if count[0] > MAX_CALLS:
            raise CaptureError(f"more than {MAX_CALLS} calls of modules kept opaque: capture a smaller model")
        _, ins = _Layout.split((a, kw))
        layout, outs = _Layout.split(out)
        calls[id(mod)].append((tuple(_meta(t) for t in ins), layout, tuple(_meta(t) for t in outs)))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules.values()]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return calls


@contextlib.contextmanager
def opaque_modules(model: nn.Module, paths: list[str], args: tuple, kwargs: dict) -> Iterator[list[int]]:
    """While active, every call of the modules at ``paths`` is one ``vlpet_fx::opaque`` op (see the module doc).

    Runs ``model`` once eagerly first (it needs real weights: not on the meta device). Yields the slots made, which
    live as long as their module (a graph keeps working while the model does)."""
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise CaptureError("cannot keep modules opaque on the meta device (their output shapes come from a real "
                           "run): build the model with weights")
    modules = {p: model.get_submodule(p) for p in paths}
    calls = _record(model, modules, args, kwargs)
    slots: list[int] = []
    seen: dict[int, int] = {id(m): 0 for m in modules.values()}
    saved: dict[str, Any] = {}

    def make(path: str, mod: nn.Module, original):
        def forward(*a, **kw):
            if getattr(_REAL, "active", False):
                return original(*a, **kw)
            if not calls[id(mod)]:
                raise CaptureError(f"module '{path}' is called under torch.export but not eagerly")
            # the k-th call of a trace is the k-th call of the eager run (a tracer may run the forward again:
            # draft_export does, so the count goes round)
            k = seen[id(mod)] % len(calls[id(mod)])
            seen[id(mod)] += 1
            in_meta, out_layout, out_meta = calls[id(mod)][k]
            layout, tensors = _Layout.split((a, kw))
            if not _same_inputs(tensors, in_meta):
                raise CaptureError(f"module '{path}' is called with other shapes under torch.export than eagerly")
            names, state = _state(mod)
            slot = next(_NEXT)
            _SLOTS[slot] = _Slot(weakref.ref(mod), path, layout, names, out_layout, out_meta)
            weakref.finalize(mod, _forget, [slot])
            slots.append(slot)
            return out_layout.join(torch.ops.vlpet_fx.opaque(slot, tensors, state))
        return forward

    for path, mod in modules.items():
        if "forward" in mod.__dict__:
            saved[path] = mod.__dict__["forward"]
        mod.forward = make(path, mod, mod.forward)
    try:
        yield slots
    finally:
        for path, mod in modules.items():
            del mod.forward
            if path in saved:
                mod.forward = saved[path]
