"""Capture a module with ``torch.export`` and attribute failures to the module that caused them."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import threading
import warnings
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


_CONVERSIONS_LOCK = threading.Lock()
_CONVERTING: dict[int, set[int]] = {}  # capturing thread -> ids of the modules it captures
_ORIGINAL_TO = nn.Module.to


def _to_during_capture(self, *args, **kwargs):
    owned = _CONVERTING.get(threading.get_ident())
    if owned is None or id(self) not in owned:  # another thread, or a module outside the captured model
        return _ORIGINAL_TO(self, *args, **kwargs)
    try:
        device, dtype, _non_blocking, fmt = torch._C._nn._parse_to(*args, **kwargs)
    except Exception:  # noqa: BLE001 -- arguments torch will refuse itself
        return _ORIGINAL_TO(self, *args, **kwargs)
    if fmt is None and all(
            (dtype is None or not (t.is_floating_point() or t.is_complex()) or t.dtype == dtype)
            and (device is None or t.device == torch.device(device))
            for t in (*self.parameters(), *self.buffers())):
        return self
    return _ORIGINAL_TO(self, *args, **kwargs)


@contextlib.contextmanager
def _no_op_conversions(model: nn.Module) -> Iterator[None]:
    """``module.to(dtype/device)`` inside a forward (a router keeping its classifier in float32 ...) is a no-op when
    every tensor of the module already has that dtype and device; torch.export cannot trace the parameter swap a
    real conversion makes, so during capture such a call returns the module unchanged. Real conversions still
    go to torch (and fail with torch's message). Only the capturing thread's calls on ``model``'s own modules are
    affected: ``nn.Module.to`` is swapped while at least one capture runs and restored when the last one ends
    (captures in several threads at once nest correctly)."""
    me = threading.get_ident()
    with _CONVERSIONS_LOCK:
        if me in _CONVERTING:  # a capture inside a capture on this thread: keep the outer one's set
            outer = _CONVERTING[me]
            _CONVERTING[me] = outer | {id(m) for m in model.modules()}
        else:
            outer = None
            _CONVERTING[me] = {id(m) for m in model.modules()}
        nn.Module.to = _to_during_capture
    try:
        yield
    finally:
        with _CONVERSIONS_LOCK:
            if outer is None:
                del _CONVERTING[me]
            else:
                _CONVERTING[me] = outer
            if not _CONVERTING:
                nn.Module.to = _ORIGINAL_TO


_NOISY_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._dynamo", "torch.export", "torch._export",
                  "torch._subclasses.fake_tensor")


@contextlib.contextmanager
def _capture_mode(model: nn.Module, train: bool) -> Iterator[None]:
    """Eval mode (no dropout) unless asked otherwise, and no fused MHA fast path (it hides q/k/v)."""
    was_training = model.training
    mha = getattr(torch.backends, "mha", None)
    fast = mha.get_fastpath_enabled() if mha is not None else None
    model.train(train)
    # a key/value cache is state, not a graph output: switch it off in the config (and its sub-configs)
    caching = []
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        from .inputs import _configs

        for c in _configs(cfg):
            if getattr(c, "use_cache", None):
                caching.append(c)
                c.use_cache = False
    if mha is not None:
        mha.set_fastpath_enabled(False)
    # torch.distributions checks its arguments' values (`if not constraint.check(v).all(): raise`), a branch on
    # data that only ever raises: off while capturing, as the forward's arithmetic does not depend on it
    validating = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
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
        for c in caching:
            c.use_cache = True
        if mha is not None:
            mha.set_fastpath_enabled(fast)
        torch.distributions.Distribution.set_default_validate_args(validating)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = next((t.strip() for t in text if t.strip()), type(exc).__name__)
    return line if len(line) <= 160 else line[:157] + "..."


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and len(out) < 8:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _eager_failure(model: nn.Module, args: tuple, kwargs: dict) -> BaseException | None:
    """Run the forward once without torch.export: an exception here is the real cause of a capture failure.

    Not on the meta device, where data-dependent Python (``.item()``) fails for reasons of its own."""
    tensors = [*model.parameters(), *model.buffers()]
    if any(t.is_meta for t in tensors):
        return None
    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            model(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 -- reported as the cause
        return exc
    return None


_DATA_DEPENDENT = {"GuardOnDataDependentSymNode", "DataDependentOutputException", "PendingUnbackedSymbolNotFound"}


def data_dependent(exc: BaseException) -> bool:
    """Whether torch.export failed because the forward depends on tensor *values* (a branch, a loop, a size)."""
    chain = _chain(exc)
    text = " ".join(str(e) for e in chain).lower()
    return bool({type(e).__name__ for e in chain} & _DATA_DEPENDENT) or "data-dependent" in text


_USER_FRAME = re.compile(r'File "?([^",\n]+?)"?, line(?:no)? (\d+), in (\S+)\n\s+(?!File )(\S[^\n]*)')


def _code(line: str) -> str:
    """A source line without its trailing comment."""
    return re.sub(r"\s+#.*$", "", line.strip())


def user_line(exc: BaseException) -> str:
    """The model's own source line that torch.export names for a failure (``file.py:123 `code```), or ''."""
    for e in _chain(exc):
        frames = [m for m in _USER_FRAME.finditer(str(e)) if "/torch/" not in m.group(1)]
        if frames:
            path, line, _fn, code = frames[-1].groups()
            code = _code(code)
            code = code if len(code) <= 80 else code[:77] + "..."
            return f"{path.rsplit('/', 1)[-1]}:{line} `{code}`"
    import traceback  # torch did not name it: the innermost frame of the traceback outside torch and this package

    for e in _chain(exc):
        frames = [f for f in traceback.extract_tb(e.__traceback__)
                  if "/torch/" not in f.filename and "/vlpet_fx/" not in f.filename and f.line]
        if frames:
            f = frames[-1]
            code = _code(f.line)
            code = code if len(code) <= 80 else code[:77] + "..."
            return f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} `{code}`"
    return ""


def _draft(model: nn.Module, args: tuple, kwargs: dict):
    """Capture again with ``torch.export.draft_export``: real values decide the data-dependent branches and loops,
    and the graph asserts them at run time (another branch raises instead of computing something else).

    Returns ``(exported, assumptions)`` or None (also on the meta device, where there are no values)."""
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return None
    draft = getattr(torch.export, "draft_export", None)
    if draft is None:
        return None
    try:
        with _no_op_conversions(model), contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            exported = draft(model, args, kwargs, strict=False)
    except Exception:  # noqa: BLE001 -- the first failure is the one reported
        return None
    report = getattr(exported, "_report", None)
    found = [f"{p.rsplit('/', 1)[-1]}:{ln} `{_code(code)[:60]}`" for p, ln, _fn, code in
             (m.groups() for m in _USER_FRAME.finditer(str(report or ""))) if "/torch/" not in p]
    return exported, tuple(dict.fromkeys(found))


MAX_OPAQUE_ROUNDS = 6  # captures tried, each keeping more modules opaque, before giving up


def _opaque_choice(model: nn.Module, where: str, chosen: set[str]) -> set[str]:
    """The modules to keep opaque after a data-dependent failure in ``where``: every module of its class (they run
    the same code), or its parent's class when ``where`` is already opaque or inside one that is."""
    path = where
    while path and (path in chosen or any(path.startswith(c + ".") for c in chosen)):
        path = path.rpartition(".")[0]
    if not path:
        return set()
    kind = type(model.get_submodule(path))
    return {p for p, m in model.named_modules() if p and type(m) is kind}


def _computed_indices(model: nn.Module, where: str, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    """Integer tensors (positions, indices) that module ``where`` computes from tensor values and hands to a
    sub-module under the name of one of the model's own keyword arguments, which the example inputs leave out
    (Qwen2-VL computes its 3-D rope position ids from the token types that way): their values from one eager run,
    each kept only if passing it to the model leaves the outputs bit for bit the same.

    Passed as inputs, they make that computation (not traceable: a ``groupby`` on values) unnecessary; integer
    tensors only, so no activation, and no site, leaves the graph."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    names = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
             and kwargs.get(n) is None and n not in list(params)[:len(args)]}
    outer = model.get_submodule(where)
    seen: dict[str, torch.Tensor] = {}
    here: dict[str, Any] = {}

    def pre(mod, _a, kw):
        if mod is outer:
            here.update(kw)
            return
        for n in names:
            t = kw.get(n)
            if isinstance(t, torch.Tensor) and not (t.is_floating_point() or t.is_complex()) and n not in seen:
                seen[n] = t.detach().clone()

    handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in outer.modules()]
    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            reference = model(*args, **kwargs)
    except Exception:  # noqa: BLE001 -- then there is nothing to take from the run
        return {}
    finally:
        for h in handles:
            h.remove()
    found = {}
    for n, t in seen.items():
        if here.get(n) is not None:  # the module was given it: computed by a caller, not from values here
            continue
        try:
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
                again = model(*args, **{**kwargs, n: t})
        except Exception:  # noqa: BLE001 -- the model does not take it that way
            continue
        if _same_outputs(reference, again):
            found[n] = t
    return found


def _same_outputs(a, b) -> bool:
    la, sa = torch.utils._pytree.tree_flatten(a)
    lb, sb = torch.utils._pytree.tree_flatten(b)
    if sa != sb:
        return False
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else
               not isinstance(x, torch.Tensor) and not isinstance(y, torch.Tensor) for x, y in zip(la, lb))


def _with_opaque(model: nn.Module, args: tuple, kwargs: dict, exc: BaseException, where: str):
    """Capture again with the module that failed on a data-dependent value (and every module of its class) kept
    as one opaque call each (:mod:`vlpet_fx.capture.opaque`); if the forward outside them still fails on a
    data-dependent value, try ``draft_export`` around the same opaque calls, then (integer tensors that module
    computes from values and the model takes as inputs: :func:`_computed_indices`) pass those in, else keep the
    next module opaque.

    Returns ``(exported, paths, specialised, kwargs)`` or None when that does not give a graph (the first failure
    is then reported); ``kwargs`` are the example's keyword inputs with any index tensors passed in."""
    from .opaque import opaque_modules

    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return None
    chosen: set[str] = set()
    for _ in range(MAX_OPAQUE_ROUNDS):
        given = _computed_indices(model, where, args, kwargs)
        if given:
            kwargs = {**kwargs, **given}
        else:
            more = _opaque_choice(model, where, chosen)
            if not more or more <= chosen:
                return None
            chosen |= more
            inside = tuple(c + "." for c in chosen)
            if all(n.startswith(inside) for n, _ in model.named_parameters()):
                return None  # nothing would be left to analyse: report the failure instead
        # an opaque module inside another one is never called under export: keep the outermost only
        paths = tuple(sorted(p for p in chosen if not any(p.startswith(c + ".") for c in chosen)))
        try:
            with _module_tracker(model) as stack, _no_op_conversions(model), \
                    contextlib.redirect_stderr(io.StringIO()), opaque_modules(model, list(paths), args, kwargs):
                return torch.export.export(model, args, kwargs, strict=False), paths, (), kwargs
        except Exception as again:  # noqa: BLE001 -- the first failure is the one reported
            if not data_dependent(again) or not stack:
                return None
            where = stack[-1]
        try:
            with opaque_modules(model, list(paths), args, kwargs):
                drafted = _draft(model, args, kwargs)
        except Exception:  # noqa: BLE001 -- as above
            drafted = None
        if drafted is not None:
            first = user_line(again)
            return drafted[0], paths, tuple(dict.fromkeys(x for x in (first, *drafted[1]) if x)), kwargs
    return None


def fix_for(exc: BaseException) -> str:
    """The fix that fits a capture failure, decided from the exception (and its causes), not guessed."""
    chain = _chain(exc)
    names = {type(e).__name__ for e in chain}
    text = " ".join(str(e) for e in chain).lower()
    if "cache" in text and ("pytree" in text or "not a known type" in text or "in output" in text):
        return ("the forward returns a cache object: capture with use_cache=False (pass it in example_inputs, "
                "or set model.config.use_cache = False)")
    if "not a known type" in text or "pytree" in text:
        return ("the forward returns or takes an object torch.export cannot flatten: register it with "
                "torch.utils._pytree.register_pytree_node, or wrap the model so it returns tensors")
    if "couldn't swap" in text:
        return ("that forward converts its own module (module.to(...)) to another dtype or device, which "
                "torch.export cannot trace: convert the model to that dtype/device before capture")
    if data_dependent(exc) or names & {"UserError"} or "data dependent" in text:
        code = user_line(exc)
        if re.search(r"`\s*for\b|\bwhile\b", code):
            return ("that forward loops over values read from tensors (e.g. the experts a router picked), which "
                    "torch.export cannot unroll: use a vectorised form of the module (transformers: "
                    "experts_implementation='batched_mm' where the model offers it), or capture without it")
        if re.search(r"tolist\(|\.item\(|split\(|nonzero|repeat_interleave|\[[^]]*mask", code):
            return ("that forward sizes tensors by values read from tensors, which torch.export cannot trace: "
                    "pass example_inputs whose sizes fix them, or capture a sub-module that does not do it")
        return ("that forward branches on tensor values (a Python `if` on data), and capturing with the example "
                "inputs' branch failed too: rewrite the branch with torch.where / torch.cond")
    if "TypeError" in names and ("argument" in text or "keyword" in text or "positional" in text):
        return ("the example inputs do not fit the forward's signature: pass example_inputs with the arguments "
                "it takes (or register a builder with vlpet_fx.register_example_inputs)")
    if "out of memory" in text or "OutOfMemoryError" in names:
        return "build the model on the meta device (weights are not needed to capture) or use a smaller config"
    if names & {"ValueError", "IndexError", "RuntimeError"} and any(
            w in text for w in ("shape", "size", "dimension", "match", "expected", "index", "mat1", "token")):
        return ("the example inputs' shapes or values do not fit the model: pass example_inputs the forward "
                "accepts when called eagerly (or register a builder with vlpet_fx.register_example_inputs)")
    if names & {"NotImplementedError", "Unsupported"} or "not supported" in text or "unsupported" in text:
        return ("an operation in that forward cannot be traced by torch.export: replace it with a traceable "
                "torch equivalent, or capture a sub-module that avoids it")
    return ("check that the model runs eagerly with the same example inputs; if it does, the failure is in "
            "torch.export: capture a sub-module or pass example_inputs that avoid that path")


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
        specialised: tuple[str, ...] = ()
        opaque: tuple[str, ...] = ()
        try:
            with _module_tracker(model) as tracker_stack, _no_op_conversions(model):
                # on failure torch.export prints the partial graph to stderr; the CaptureError says it in one line
                with contextlib.redirect_stderr(io.StringIO()):
                    exported = torch.export.export(model, args, kwargs, strict=False)
        except Exception as exc:  # torch.export raises many types; all mean "cannot capture"
            where = tracker_stack[-1] if tracker_stack else ""
            where_txt = f"module '{where}' ({type(model.get_submodule(where)).__name__})" if where else (
                f"the top-level forward of {type(model).__name__}"
            )
            eager = _eager_failure(model, args, kwargs)
            if eager is not None:
                raise CaptureError(
                    f"cannot capture {type(model).__name__}: it fails on the example inputs even without "
                    f"torch.export: {type(eager).__name__}: {_first_line(eager)} -- fix: pass example_inputs "
                    "that its forward accepts (or register a builder with vlpet_fx.register_example_inputs)"
                ) from exc
            drafted = _draft(model, args, kwargs) if data_dependent(exc) else None
            kept = _with_opaque(model, args, kwargs, exc, where) if drafted is None and data_dependent(exc) else None
            if drafted is None and kept is None:
                at = user_line(exc)
                raise CaptureError(
                    f"cannot capture {type(model).__name__}: torch.export failed in {where_txt}: "
                    f"{type(exc).__name__}: {_first_line(exc)}{f' at {at}' if at else ''} -- fix: {fix_for(exc)}"
                ) from exc
            if kept is not None:
                exported, opaque, specialised, given = kept
                added = sorted(set(given) - {k for k, v in kwargs.items() if v is not None})
                kwargs = given
                at = user_line(exc)
                kinds = ", ".join(sorted({type(model.get_submodule(p)).__name__ for p in opaque}))
                done = ([f"{len(opaque)} module(s) of a data-dependent forward kept as one opaque call each "
                         f"({kinds}): no sites inside them"] if opaque else []) + (
                    [f"the {', '.join(added)} it computes from tensor values given as inputs of the graph"]
                    if added else []) + (
                    [f"other data-dependent branches fixed by the example inputs ({'; '.join(specialised[:2])}), "
                     "checked when the graph runs"] if specialised else [])
                warnings.warn(f"captured {type(model).__name__} with {'; '.join(done)}{f' (at {at})' if at else ''}",
                              stacklevel=2)
            else:
                exported, specialised = drafted
                first = user_line(exc)  # the point the first capture stopped at, then any others the draft found
                specialised = tuple(dict.fromkeys(x for x in (first, *specialised) if x)) or ("a data-dependent value",)
                warnings.warn(
                    f"captured {type(model).__name__} with its data-dependent branches fixed by the example inputs "
                    f"({'; '.join(specialised[:2])}); the graph checks them when it runs", stacklevel=2)

    canonical = _canonical_module_paths(exported.graph_module, model)
    sig = exported.graph_signature
    return Captured(
        graph_module=exported.graph_module,
        method="export",
        param_names={k: canonical(v) for k, v in sig.inputs_to_parameters.items()},
        buffer_names={k: canonical(v) for k, v in sig.inputs_to_buffers.items()},
        user_inputs=list(sig.user_inputs),
        exported=exported,
        example_inputs=(args, kwargs),
        specialised=specialised,
        opaque=opaque,
    )


def _canonical_module_paths(gm: torch.fx.GraphModule, model: nn.Module):
    """A module reachable under several names (one block shared by several layers) is named by its first name,
    as ``named_modules()`` gives it, in every node's ``nn_module_stack``: its calls are calls of one module (one
    site, one PET module), and every path analysis hands on is one the model's ``named_modules()`` has.
    Returns the map of a parameter's or buffer's qualified name to its name under those module names."""
    first: dict[int, str] = {}
    alias: dict[str, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        alias_of = first.setdefault(id(m), name)
        if alias_of != name:
            alias[name] = alias_of

    def canonical(qualified: str) -> str:
        owner, dot, leaf = qualified.rpartition(".")
        return f"{alias[owner]}{dot}{leaf}" if owner in alias else qualified

    if alias:
        for n in gm.graph.nodes:
            stack = n.meta.get("nn_module_stack")
            if stack:
                n.meta["nn_module_stack"] = {k: (alias.get(path, path), t) for k, (path, t) in stack.items()}
    return canonical
