"""The rule-set schema (pydantic, strict): what a YAML rule set may say, and nothing else (unknown keys are
errors, no value is coerced to another type: ``layers: [true]`` or ``optional: "yes"`` are refused).

``path_regex`` and ``module_type`` are RE2 patterns (google-re2): matching takes time linear in the module
path, whatever the pattern, so no pattern can make planning hang. RE2 has no backreferences or look-around.
"""

from __future__ import annotations

import functools
import re
from typing import Annotated, Any, Literal, Union

import re2
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from .._text import shown
from ..analysis.sites import STACKS
from ..modules.base import RelativeWidth, Width, parse_width  # noqa: F401  (the width type of method parameters)

MAX_PATTERN = 1000  # characters of a path_regex / module_type pattern
MAX_NAME = 200  # characters of a name (rule set, rule, method alias)
MAX_LAYER = 1_000_000  # |layer index| in a selector (a stack's own count bounds it again at plan time)
RE2_MAX_MEM = 8 << 20  # bytes RE2 may use to compile one pattern

LayerItem = Union[int, str]
Name = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME)]
_STRICT = ConfigDict(extra="forbid", strict=True)


def _as_list(v: Any) -> Any:
    return [v] if isinstance(v, (str, int)) and not isinstance(v, bool) else v


class PatternError(ValueError):
    pass


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str):
    """An RE2 pattern (``search``/``fullmatch`` like ``re``'s), compiled with bounded memory; PatternError if bad."""
    options = re2.Options()
    options.log_errors = False
    options.max_mem = RE2_MAX_MEM
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        why = exc.args[0] if exc.args else exc
        why = why.decode("utf-8", "replace") if isinstance(why, bytes) else str(why)
        raise PatternError(f"not a valid RE2 regular expression ({shown(why, 100)}); RE2 has no backreferences "
                           "or look-around") from None


def _nonempty(v, what: str):
    if isinstance(v, (list, dict, str)) and len(v) == 0:
        raise ValueError(f"an empty {what} selects nothing: remove the key or name at least one")
    return v


class Selector(BaseModel):
    """Which sites (or modules) a rule applies to. Every given field must match; a list means any of."""

    model_config = _STRICT

    stack: list[Literal["encoder", "decoder", "visual"]] | None = None
    layers: list[LayerItem] | dict[str, list[LayerItem]] | None = None
    block: list[Literal["self_attn", "cross_attn", "mixer", "ffn"]] | None = None
    role: list[Literal["q", "k", "v", "o", "in", "gate", "up", "out", "output"]] | None = None
    path_regex: str | None = None
    module_type: str | None = None
    norms: bool | None = None  # `trainable:` only: the normalisation modules (found by computation) in scope

    @field_validator("stack", "block", "role", mode="before")
    @classmethod
    def _to_list(cls, v, info):
        return _nonempty(_as_list(v), f"`{info.field_name}` list")

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v):
        if isinstance(v, dict):
            _nonempty(v, "`layers` mapping")
            return {k: _nonempty(_as_list(x), f"`layers` list of {shown(k, 20)}") for k, x in v.items()}
        v = _nonempty(_as_list(v), "`layers` list")
        if isinstance(v, list):
            for item in v:
                if isinstance(item, (bool, float)) or item is None:
                    raise ValueError(f"a layer is an integer, 'all' or a range like '0:6' or '-2:', not {item!r}")
        return v

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, v):
        items = [x for xs in v.values() for x in xs] if isinstance(v, dict) else (v or [])
        if isinstance(v, dict):
            bad = sorted(set(v) - set(STACKS))
            if bad:
                raise ValueError(f"unknown stack '{shown(bad[0], 40)}' in layers (expected {', '.join(STACKS)})")
        for item in items:
            if isinstance(item, (bool, float)) or item is None:
                raise ValueError(f"a layer is an integer, 'all' or a range like '0:6' or '-2:', not {item!r}")
            parse_layer_item(item)
        return v

    @field_validator("path_regex", "module_type")
    @classmethod
    def _regex(cls, v):
        if v is not None:
            if not v:
                raise ValueError("an empty pattern matches everything: remove the key instead")
            if len(v) > MAX_PATTERN:
                raise ValueError(f"a pattern of {len(v):,} characters; at most {MAX_PATTERN} are allowed")
            compile_pattern(v)
        return v


_RANGE = re.compile(r"^\s*(-?\d{1,7})?\s*(:|\.\.)\s*(-?\d{1,7})?\s*$")


def parse_layer_item(item: LayerItem) -> tuple[int | None, int | None] | int | str:
    """An int (negative counts from the end), 'all', or a range 'a:b' (end exclusive) / 'a..b' (inclusive)."""
    if isinstance(item, bool):
        raise ValueError("a layer must be an integer, 'all' or a range like '0:6' or '-2:'")
    if isinstance(item, int):
        if abs(item) > MAX_LAYER:
            raise ValueError(f"layer {item} is out of any stack's range")
        return item
    if not isinstance(item, str):
        raise ValueError(f"a layer is an integer, 'all' or a range like '0:6' or '-2:', not {shown(item, 40)}")
    if item.strip() == "all":
        return "all"
    m = _RANGE.match(item)
    if not m:
        raise ValueError(f"bad layer range '{shown(item, 40)}': write an integer, 'all', 'a:b' (end exclusive) or 'a..b'")
    lo = int(m.group(1)) if m.group(1) is not None else None
    hi = int(m.group(3)) if m.group(3) is not None else None
    if m.group(2) == "..":
        if hi is None:
            raise ValueError(f"bad layer range '{shown(item, 40)}': 'a..b' needs an end")
        hi = hi + 1 if hi != -1 else None
    return (lo, hi)


class LayerRangeError(ValueError):
    """A layer index or range bound outside the stack it is applied to."""


def resolve_layers(items: list[LayerItem], n: int, stack: str = "the stack") -> set[int]:
    """Turn layer items into concrete 0-based layer indices for a stack of ``n`` layers. An index or a range
    bound outside the stack is a LayerRangeError naming the stack's layer count (never silently dropped)."""
    out: set[int] = set()
    span = f"{stack} has {n} layers (0..{n - 1}, or -{n}..-1)" if n else f"{stack} has no layers"
    for item in items:
        p = parse_layer_item(item)
        if p == "all":
            out.update(range(n))
        elif isinstance(p, int):
            if not -n <= p < n:
                raise LayerRangeError(f"layer {p} is out of range: {span}")
            out.add(p % n)
        else:
            lo, hi = p
            if (lo is not None and not -n <= lo <= n) or (hi is not None and not -n <= hi <= n):
                raise LayerRangeError(f"layer range '{shown(item, 40)}' reaches outside the stack: {span}")
            out.update(range(n)[slice(lo, hi)])
    return out


class MethodSpec(BaseModel):
    """A named method configuration: ``type`` is a registered PET method; the rest are its parameters, checked
    strictly by the method's config (``make_config``). A layer width (``dim``, ``gate_dim``, ``rank``) is a
    :data:`Width`: an integer, or relative to the site as ``'p/q'`` or ``{of_site: fraction}`` (0 < fraction
    <= 1, :class:`RelativeWidth`); the planner resolves it per site (docs/RULES.md)."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: Name

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)

    name: Name | None = None
    select: Selector
    insert: Name | None = None  # a method name from `methods:` or a registered method type
    overrides: dict[Name, Any] = Field(default_factory=dict, alias="with")
    placement: Literal["after", "parallel"] = "after"
    optional: bool = False
    skip: bool = False  # remove what earlier rules placed on the matched sites


class TrainableRule(BaseModel):
    """Besides PET modules, which existing parameters train (e.g. layer norms, the visual projector, biases)."""

    model_config = _STRICT

    name: Name | None = None
    select: Selector = Field(default_factory=Selector)
    params: Literal["all", "weight", "bias"] = "all"
    optional: bool = False


class RuleSetSchema(BaseModel):
    model_config = _STRICT

    name: Name
    description: Annotated[str, StringConstraints(max_length=10_000)] = ""
    methods: dict[Name, MethodSpec] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)
    trainable: list[TrainableRule] = Field(default_factory=list)
    train_all: bool = False  # full fine-tuning: every parameter trains
