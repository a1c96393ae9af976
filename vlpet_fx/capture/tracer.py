"""Capture a module with ``torch.export`` and attribute failures to the module that caused them."""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import CaptureError
from .captured import Captured
from .inputs import build_example_inputs, normalise


@contextlib.contextmanager
def _module_tracker(model: nn.Module) -> Iterator[list[str]]:
    """Keep the stack of modules currently inside ``forward``, so a failure can be blamed on one."""
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[str] = []
    deepest: list[str] = []

    def pre(mod, _inp):
        if id(mod) in names:
            stack.append(names[id(mod)])
            deepest[:] = list(stack)

    def post(mod, _inp, _out):
        if id(mod) in names and stack and stack[-1] == names[id(mod)]:
            stack.pop()

    h1 = nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = nn.modules.module.register_module_forward_hook(post)
    try:
        yield stack
    finally:
        h1.remove()
        h2.remove()


_NOISY_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._dynamo", "torch.export", "torch._export",
                  "torch._subclasses.fake_tensor")


@contextlib.contextmanager
def _capture_mode(model: nn.Module, train: bool) -> Iterator[None]:
    """Eval mode (no dropout) unless asked otherwise, and no fused MHA fast path (it hides q/k/v)."""
    was_training = model.training
    mha = getattr(torch.backends, "mha", None)
    fast = mha.get_fastpath_enabled() if mha is not None else None
    model.train(train)
    if mha is not None:
        mha.set_fastpath_enabled(False)
    # torch.export logs its own failure reports; we turn failures into one CaptureError line instead
    quiet = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
        model.train(was_training)
        if mha is not None:
            mha.set_fastpath_enabled(fast)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = next((t.strip() for t in text if t.strip()), type(exc).__name__)
    return line if len(line) <= 160 else line[:157] + "..."


def capture(model: nn.Module, example_inputs: Any = None, *, train: bool = False) -> Captured:
    """Capture ``model``'s forward as a torch.fx graph (via ``torch.export``).

    ``example_inputs`` may be omitted for Hugging Face models, open_clip visual towers and
    ``torch.nn.Transformer``; other modules need them (a tensor, a tuple of args, a dict of kwargs or
    ``(args, kwargs)``). Raises :class:`CaptureError` naming the module that failed.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture expects a torch.nn.Module, got {type(model).__name__}")
    if example_inputs is None:
        built = build_example_inputs(model)
        if built is None:
            raise CaptureError(
                f"no example inputs known for {type(model).__name__}: pass example_inputs=(args...) or "
                "a dict of keyword arguments, or register a builder with vlpet_fx.register_example_inputs"
            )
        _, args, kwargs = built
    else:
        args, kwargs = normalise(example_inputs)

    with _capture_mode(model, train):
        tracker_stack: list[str] = []
        try:
            with _module_tracker(model) as tracker_stack:
                # on failure torch.export prints the partial graph to stderr; the CaptureError says it in one line
                with contextlib.redirect_stderr(io.StringIO()):
                    exported = torch.export.export(model, args, kwargs, strict=False)
        except Exception as exc:  # torch.export raises many types; all mean "cannot capture"
            where = tracker_stack[-1] if tracker_stack else ""
            where_txt = f"module '{where}' ({type(model.get_submodule(where)).__name__})" if where else (
                f"the top-level forward of {type(model).__name__}"
            )
            raise CaptureError(
                f"cannot capture {type(model).__name__}: torch.export failed in {where_txt}: "
                f"{type(exc).__name__}: {_first_line(exc)} -- fix: remove data-dependent Python control "
                "flow from that forward (use torch.where / torch.cond), or pass example_inputs that match it"
            ) from exc

    sig = exported.graph_signature
    return Captured(
        graph_module=exported.graph_module,
        method="export",
        param_names=dict(sig.inputs_to_parameters),
        buffer_names=dict(sig.inputs_to_buffers),
        user_inputs=list(sig.user_inputs),
        exported=exported,
        example_inputs=(args, kwargs),
    )
