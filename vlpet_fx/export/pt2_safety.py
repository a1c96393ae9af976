"""Scan a ``.pt2`` archive before ``torch.export.load`` sees it, and load it through a path that cannot unpickle.

What ``torch.export.load`` does with an archive's entries in torch 2.14 (torch/export/pt2_archive/_package.py and
torch/_export/serde/serialize.py), and what this module does about each:

==================================================  =================================================  ==========
entry (relative to the archive's root folder)       what torch does with it                             here
==================================================  =================================================  ==========
``data/weights|constants/*_config.json`` payloads   ``use_pickle: true`` → ``torch.load(weights_only=    refused
  marked ``use_pickle``                              False)``: arbitrary unpickling
``data/constants/custom_obj_*``                     ``torch._C._pickle_load_obj`` (TorchScript pickle)  refused
``data/constants/opaque_obj_*``                     ``pickle.loads``                                    refused
``data/weights/<model>.pt``, ``data/constants/      legacy whole-dict pickles: ``torch.load`` with a     refused
  <model>.pt``                                       fallback to ``weights_only=False``
``data/sample_inputs/<model>.pt``                   ``torch.load(weights_only=True)``, falling back to   checked
                                                    ``weights_only=False`` if that fails                 (below)
``data/aotinductor/…``                              compiled native code, loaded and run                 refused
``models/<model>.json`` ``expr_str`` strings        ``sympy.sympify`` (``eval`` of Python source)       grammar
``models/<model>.json`` ``guards_code``             ``exec`` when ``.module()`` is called               grammar
``models/<model>.json`` numbers                     spliced into generated guard code                   typed
``models/<model>.json`` names, targets, FQNs        written into generated code (``getattr(self, "…")``)  dotted
                                                    unescaped                                            names
``models/<model>.json`` node targets                resolved by getattr from ``torch`` (any callable:     operators
                                                    ``torch.os.system``), then checked by its verifier   only
``models/<model>.json`` ``vlpet_fx::opaque`` calls  run a module of this process named by a slot number  refused
any other entry (xl weights, mtia, executorch, …)   not needed by a vlpet-fx export                     refused
==================================================  =================================================  ==========

The sample-inputs entry (every archive has one) must load with torch's restricted unpickler
(``weights_only=True``); and the real load runs with ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``, which makes every
``torch.load`` inside ``torch.export.load`` restricted whatever its call site asks for. The bytes scanned are the
bytes loaded (one read into memory), so the file cannot change in between.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import enum
import functools
import io
import json
import os
import re
import threading
import types
import typing
import zipfile
from pathlib import Path
from typing import Any

from ..errors import ExportError

MAX_JSON_ENTRY = 256 << 20
MAX_EXPR = 10_000

_NAME = r"[A-Za-z0-9_]+"
_FIXED = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
_ALLOWED = [
    re.compile(rf"^models/{_NAME}\.json$"),
    re.compile(rf"^data/weights/{_NAME}_weights_config\.json$"),
    re.compile(rf"^data/constants/{_NAME}_constants_config\.json$"),
    re.compile(r"^data/weights/weight_[0-9]+$"),
    re.compile(r"^data/constants/tensor_[0-9]+$"),
    re.compile(rf"^data/sample_inputs/{_NAME}\.pt$"),
    re.compile(r"^extra/[^/]+$"),  # read by torch as text only
]
_WHY = [
    (re.compile(r"^data/aotinductor/"), "it is compiled native code that torch.export.load would load and run"),
    (re.compile(rf"^data/(weights|constants)/{_NAME}\.pt$"),
     "it is a legacy pickled state dict that torch.export.load unpickles with weights_only=False if the safe "
     "reader fails"),
    (re.compile(r"^data/constants/custom_obj_"), "torch.export.load would unpickle it (TorchScript pickle)"),
    (re.compile(r"^data/constants/opaque_obj_"), "torch.export.load would unpickle it with pickle.loads"),
]

# what a symbolic-shape expression may contain (torch parses it with sympy.sympify, i.e. Python's eval)
_TOKEN = re.compile(r"\s+|'[A-Za-z0-9_.+\-]{0,64}'|[0-9]+(?:\.[0-9]+)?(?:[eE][+\-]?[0-9]+)?|[A-Za-z][A-Za-z0-9_]*"
                    r"|\*\*|//|[()+\-*/%,=<>]")
_SYMBOL = re.compile(r"^[a-z]+[0-9]+$")
_EXPR_NAMES = frozenset("""
Symbol Integer Rational Float Add Mul Pow Max Min Mod Abs floor ceiling Eq Ne Lt Le Gt Ge StrictLessThan
StrictGreaterThan LessThan GreaterThan Equality Unequality And Or Not true false True False oo zoo nan Infinity
NegativeInfinity Half One Zero NegativeOne S sqrt IntInfinity NegativeIntInfinity
FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt FloorToInt CeilDiv LShift RShift PowByNatural FloatPow
FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt RoundToInt RoundDecimal ToFloat
Identity OpaqueUnaryFn_sqrt
positive integer nonnegative negative nonpositive real finite infinite zero nonzero even odd rational commutative
precision evaluate
""".split())

# what a guard may contain (torch builds a function from the guards with exec)
_GUARD_NODES = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.UAdd, ast.BinOp,
                ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.Compare, ast.Eq, ast.NotEq,
                ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Load)
_GUARD_METHODS = {"size", "stride", "storage_offset", "dim", "numel"}
_GUARD_FUNCS = {"Eq", "Ne", "Mod", "FloorDiv", "Max", "Min", "floor", "ceiling", "CeilToInt", "FloorToInt"}
_GUARD_TORCH_FUNCS = {"sym_max", "sym_min", "sym_float", "sym_int", "sym_not"}  # torch.<f>: pure, on numbers

# names torch turns into attribute paths of generated Python (fx writes `getattr(self, "<part>")` unescaped)
_PATH_KEYS = {"name", "parameter_name", "buffer_name", "tensor_constant_name", "custom_obj_name", "fqn", "as_name",
              "forward_arg_names", "arg_name", "target"}
_PATH = re.compile(r"^[A-Za-z0-9_.]*$")
_TARGET = re.compile(r"^#?[A-Za-z0-9_.:]+$")

_ENV_LOCK = threading.Lock()


class _Refused(Exception):
    pass


class _Damaged(Exception):
    pass


class _Unloadable(Exception):
    """A well-formed program this process cannot run (not an attack: no 'untrusted source' warning)."""


OPAQUE_NAMESPACE = "torch.ops.vlpet_fx."  # vlpet_fx/capture/opaque.py: a call into a module of another process


def _operators(doc: Any, depth: int = 0) -> typing.Iterator[str]:
    """Every operator a program names: node targets (also in nested graphs) and operator arguments."""
    if depth > 200:
        return
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k in ("target", "as_operator") and isinstance(v, str):
                yield v
            else:
                yield from _operators(v, depth + 1)
    elif isinstance(doc, list):
        for v in doc:
            yield from _operators(v, depth + 1)


_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
# what torch resolves a target to by getattr from the torch, operator or math module: only operator overloads
# (torch.ops.<namespace>.<op>.<overload>), higher-order operators, the operator/math functions of symbolic shapes
# and the torch functions torch's own verifier lets into a program (anything else could name torch.os.system)
_OPERATOR = re.compile(rf"^(torch\.ops\.(?!higher_order\.){_IDENT}\.{_IDENT}\.[A-Za-z][A-Za-z0-9_]*"
                       rf"|torch\.ops\.higher_order\.{_IDENT}|_operator\.[a-z_]+|math\.(ceil|floor|trunc))$")
_TORCH_FUNCTIONS = frozenset(
    [f"torch.sym_{f}" for f in ("int", "float", "ite", "max", "min", "not", "sqrt", "sum")]
    + ["torch._C._set_grad_enabled", "torch.autograd.grad_mode.set_grad_enabled",
       "torch.amp.autocast_mode._enter_autocast", "torch.amp.autocast_mode._exit_autocast",
       "torch.fx.experimental.symbolic_shapes.cast_symbool_to_symint_guardless"])


def check_operators(doc: Any, entry: str) -> None:
    """Refuse a program naming a callable that is not an operator (torch.export.load would resolve and place it in
    the graph; torch's verifier is the only other guard), and one that calls ``vlpet_fx::opaque``: that call names
    a module (by a slot number) of the process that captured the model, which no file holds (and must not reach a
    module of this process)."""
    ops = set(_operators(doc))
    bad = next((op for op in sorted(ops) if not (_OPERATOR.match(op) or op in _TORCH_FUNCTIONS)), None)
    if bad is not None:
        _refuse(entry, f"names {bad[:80]!r} as an operator, which is not one (torch.export.load would call it)")
    found = next((op for op in sorted(ops) if op.startswith(OPAQUE_NAMESPACE)), None)
    if found is not None:
        raise _Unloadable(
            f"its program ({entry}) calls {found[:80]}: a module that capture kept as one opaque call (its forward "
            "depends on tensor values), which runs only in the process that captured the model; export the patched "
            "model with `vlpet-fx export --format adapters` instead")


def _refuse(entry: str, why: str):
    raise _Refused(f"entry '{entry}' {why}")


def check_expr(text: Any, where: str) -> None:
    """Refuse a symbolic-shape expression that could do more than build a sympy expression."""
    if not isinstance(text, str) or len(text) > MAX_EXPR:
        _refuse(where, "has an expr_str that is not a short string")
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            _refuse(where, f"has an expr_str with {text[pos:pos + 12]!r}, which is not part of a shape expression "
                           "(torch.export.load would eval it)")
        tok = m.group(0)
        if tok[0].isalpha() and tok not in _EXPR_NAMES and not _SYMBOL.match(tok):
            _refuse(where, f"has an expr_str naming '{tok[:40]}', which is not part of a shape expression "
                           "(torch.export.load would eval it)")
        pos = m.end()


def check_names(doc: Any, entry: str, depth: int = 0) -> None:
    """Every name that torch turns into an attribute path or a graph target is a plain dotted path."""
    if depth > 200:
        _refuse(entry, "is nested too deeply")
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k in _PATH_KEYS:
                pattern = _TARGET if k == "target" else _PATH
                for item in (v if isinstance(v, list) else [v]):
                    if isinstance(item, str) and not pattern.match(item):
                        _refuse(entry, f"has a {k} {item[:60]!r} that is not a plain dotted name (torch would write "
                                       "it into generated Python code)")
            check_names(v, entry, depth + 1)
    elif isinstance(doc, list):
        for v in doc:
            check_names(v, entry, depth + 1)


def _guard_ok(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (int, float, bool))
    if isinstance(node, ast.Name):
        return node.id == "L"
    if isinstance(node, ast.Subscript):
        s = node.slice
        return (_guard_ok(node.value) and isinstance(s, ast.Constant) and isinstance(s.value, (int, str))
                and not isinstance(s.value, bool) and (not isinstance(s.value, str) or re.fullmatch(_NAME, s.value)))
    if isinstance(node, ast.Call):
        if node.keywords or not all(_guard_ok(a) for a in node.args):
            return False
        f = node.func
        if isinstance(f, ast.Attribute):
            if isinstance(f.value, ast.Name) and f.value.id == "torch":
                return f.attr in _GUARD_TORCH_FUNCS
            return f.attr in _GUARD_METHODS and _guard_ok(f.value)
        return isinstance(f, ast.Name) and f.id in _GUARD_FUNCS
    if not isinstance(node, _GUARD_NODES):
        return False
    return all(_guard_ok(c) for c in ast.iter_child_nodes(node))


def check_guard(text: Any, where: str) -> None:
    if not isinstance(text, str) or len(text) > MAX_EXPR:
        _refuse(where, "has a guard that is not a short string")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        _refuse(where, "has a guard that is not an expression")
    if not _guard_ok(tree):
        _refuse(where, f"has a guard {text[:60]!r} that is more than a shape comparison (torch.export.load would "
                       "exec it when the module is built)")


# ---- the program JSON against torch's own schema, with strict leaf types --------------------------------------

def _schema():
    from torch._export.serde import schema
    from torch._export.serde.union import _Union

    return schema, _Union


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    schema, _ = _schema()
    return typing.get_type_hints(cls, globalns=vars(schema), include_extras=False)


def _check_value(tp, value, path: str, entry: str) -> None:
    schema, _Union = _schema()
    if isinstance(tp, str):
        tp = getattr(schema, tp)
    if isinstance(tp, typing.ForwardRef):
        tp = getattr(schema, tp.__forward_arg__)
    if tp is Any:
        return
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _check_value(typing.get_args(tp)[0], value, path, entry)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return
        for a in args:
            try:
                return _check_value(a, value, path, entry)
            except _Refused:
                continue
        _refuse(entry, f"has a value of the wrong type at {path}")
    if isinstance(tp, type) and issubclass(tp, _Union):
        if not isinstance(value, dict) or len(value) != 1:
            _refuse(entry, f"has a malformed union at {path}")
        (tag, inner), = value.items()
        hints = _hints(tp)
        if tag not in hints:
            _refuse(entry, f"has an unknown union member '{str(tag)[:40]}' at {path}")
        return _check_value(hints[tag], inner, f"{path}.{tag}", entry)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            _refuse(entry, f"has a {type(value).__name__} where an object is expected at {path}")
        hints = _hints(tp)
        for k, v in value.items():
            if k not in hints:
                _refuse(entry, f"has an unknown field '{str(k)[:40]}' at {path}")
            _check_value(hints[k], v, f"{path}.{k}", entry)
        if "expr_str" in value:
            check_expr(value["expr_str"], entry)
        return
    if origin is list:
        if not isinstance(value, list):
            _refuse(entry, f"has a {type(value).__name__} where a list is expected at {path}")
        (arg,) = typing.get_args(tp) or (Any,)
        for i, v in enumerate(value):
            _check_value(arg, v, f"{path}[{i}]", entry)
        return
    if origin is dict:
        if not isinstance(value, dict):
            _refuse(entry, f"has a {type(value).__name__} where an object is expected at {path}")
        args = typing.get_args(tp)
        for k, v in value.items():
            _check_value(args[1] if args else Any, v, f"{path}[{str(k)[:40]!r}]", entry)
        return
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, bool) or value not in {m.value for m in tp}:
            _refuse(entry, f"has an invalid {tp.__name__} at {path}")
        return
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is str:
        ok = isinstance(value, str)
    else:
        _refuse(entry, f"has a value of an unexpected kind at {path}")
    if not ok:
        _refuse(entry, f"has a {type(value).__name__} where a {tp.__name__} is expected at {path}")


def _json(zf: zipfile.ZipFile, name: str, entry: str):
    info = zf.getinfo(name)
    if info.file_size > MAX_JSON_ENTRY:
        _refuse(entry, "is too large for a program description")
    try:
        return json.loads(zf.read(name).decode("utf-8"))
    except RecursionError:
        _refuse(entry, "is JSON nested too deeply")
    except (ValueError, UnicodeDecodeError):
        _refuse(entry, "is not valid JSON")


def _check_payload_config(doc, entry: str, names: set[str], folder: str, prefix: str) -> None:
    if not isinstance(doc, dict) or set(doc) != {"config"} or not isinstance(doc["config"], dict):
        _refuse(entry, "is not a payload table")
    for fqn, meta in doc["config"].items():
        if not _PATH.match(fqn):
            _refuse(entry, f"names the payload {fqn[:60]!r}, which is not a plain dotted name")
        if not isinstance(meta, dict):
            _refuse(entry, f"describes '{str(fqn)[:60]}' with a {type(meta).__name__}")
        if meta.get("use_pickle") is not False:
            _refuse(entry, f"marks '{str(fqn)[:60]}' use_pickle: torch.export.load would unpickle that payload "
                           "(torch.load with weights_only=False)")
        path = meta.get("path_name")
        if not isinstance(path, str) or not re.fullmatch(rf"{prefix}[0-9]+", path):
            _refuse(entry, f"gives '{str(fqn)[:60]}' the payload {str(path)[:60]!r}, which is not a raw tensor "
                           f"file ({prefix}N): torch.export.load would unpickle other kinds")
        if f"{folder}{path}" not in names:
            _refuse(entry, f"refers to the missing payload '{folder}{path}'")
        schema, _ = _schema()
        _check_value(schema.PayloadMeta, meta, str(fqn)[:60], entry)


def _check_sample_inputs(zf: zipfile.ZipFile, name: str, entry: str) -> None:
    import torch

    data = zf.read(name)
    if not data:
        return
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        _refuse(entry, "names Python objects besides tensors, which torch.export.load would unpickle with "
                       "weights_only=False")
    except Exception as exc:  # a damaged entry
        _refuse(entry, f"is damaged ({type(exc).__name__}); torch.export.load would retry it with "
                       "weights_only=False")


def scan_pt2(data: bytes, label: str) -> None:
    """Refuse (ExportError, one line) an archive any of whose entries torch.export.load would unpickle, run or
    eval, or that holds entries a vlpet-fx export never has."""
    try:
        _scan(data)
    except _Damaged as exc:
        raise ExportError(f"cannot load '{label}' as a torch.export program: {exc}") from None
    except _Refused as exc:
        raise ExportError(f"refusing '{label}': {exc}; a .pt2 from an untrusted source can run code, and "
                          "vlpet-fx only loads plain programs (see docs/SECURITY.md)") from None
    except _Unloadable as exc:
        raise ExportError(f"refusing '{label}': {exc}") from None


def _scan(data: bytes) -> None:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        raise _Damaged("the file is not a zip archive (damaged, or not a .pt2 export)") from None
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        _refuse(dup, "appears twice in the archive (readers would disagree on which one is used)")
    packed = next((i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED), None)
    if packed is not None:
        _refuse(packed, "is compressed: torch.export writes every entry stored, so the archive was not written by it")
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names):
        raise _Refused("the archive does not have the single root folder of a torch.export .pt2")
    root = roots.pop()
    rel = {n: n.split("/", 1)[1] for n in names}
    present = set(rel.values())
    for full, r in rel.items():
        if ".." in r.split("/") or "\\" in r:
            _refuse(r, "has a path that leaves the archive")
        for pattern, why in _WHY:
            if pattern.search(r):
                _refuse(r, why)
        if r not in _FIXED and not any(p.match(r) for p in _ALLOWED):
            _refuse(r, "is not part of a torch.export program archive as vlpet-fx writes it (a loader may run or "
                       "unpickle unknown entries)")
    if "archive_format" not in present or zf.read(f"{root}/archive_format") != b"pt2":
        raise _Refused("the archive has no 'archive_format' entry saying pt2: it is not a torch.export .pt2 file")
    models = sorted(r[len("models/"):-len(".json")] for r in present if r.startswith("models/"))
    if not models:
        raise _Refused("the archive holds no program (models/*.json)")
    schema, _ = _schema()
    for m in models:
        entry = f"models/{m}.json"
        doc = _json(zf, f"{root}/{entry}", entry)
        if not isinstance(doc, dict):
            _refuse(entry, "is not a program description")
        check_names(doc, entry)
        _check_value(schema.ExportedProgram, doc, "program", entry)
        check_operators(doc, entry)
        for g in doc.get("guards_code") or []:
            check_guard(g, entry)
        for folder, kind, prefix in (("data/weights/", "weights", "weight_"),
                                     ("data/constants/", "constants", "tensor_")):
            cfg = f"{folder}{m}_{kind}_config.json"
            if cfg not in present:
                _refuse(cfg, "is missing: the archive is incomplete")
            _check_payload_config(_json(zf, f"{root}/{cfg}", cfg), cfg, present, folder, prefix)
        sample = f"data/sample_inputs/{m}.pt"
        if sample not in present:
            _refuse(sample, "is missing: the archive is incomplete")
        _check_sample_inputs(zf, f"{root}/{sample}", sample)


@contextlib.contextmanager
def restricted_unpickling():
    """Every torch.load inside the block uses torch's restricted unpickler, whatever its call site asks for."""
    with _ENV_LOCK:
        old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        old_no = os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
            else:
                os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old
            if old_no is not None:
                os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = old_no
