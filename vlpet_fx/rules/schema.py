"""The rule-set schema (pydantic): what a YAML rule set may say, and nothing else (unknown keys are errors)."""

from __future__ import annotations

import re
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..analysis.sites import STACKS

LayerItem = Union[int, str]


def _as_list(v: Any) -> Any:
    return [v] if isinstance(v, (str, int)) and not isinstance(v, bool) else v


class Selector(BaseModel):
    """Which sites (or modules) a rule applies to. Every given field must match; a list means any of."""

    model_config = ConfigDict(extra="forbid")

    stack: list[Literal["encoder", "decoder", "visual"]] | None = None
    layers: list[LayerItem] | dict[str, list[LayerItem]] | None = None
    block: list[Literal["self_attn", "cross_attn", "ffn"]] | None = None
    role: list[Literal["q", "k", "v", "o", "in", "out", "output"]] | None = None
    path_regex: str | None = None
    module_type: str | None = None
    norms: bool | None = None  # `trainable:` only: the normalisation modules (found by computation) in scope

    _to_list = field_validator("stack", "block", "role", mode="before")(_as_list)

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v):
        if isinstance(v, dict):
            return {k: _as_list(x) for k, x in v.items()}
        return _as_list(v)

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, v):
        items = [x for xs in v.values() for x in xs] if isinstance(v, dict) else (v or [])
        if isinstance(v, dict):
            bad = sorted(set(v) - set(STACKS))
            if bad:
                raise ValueError(f"unknown stack '{bad[0]}' in layers (expected {', '.join(STACKS)})")
        for item in items:
            parse_layer_item(item)
        return v

    @field_validator("path_regex", "module_type")
    @classmethod
    def _regex(cls, v):
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return v


_RANGE = re.compile(r"^\s*(-?\d+)?\s*(:|\.\.)\s*(-?\d+)?\s*$")


def parse_layer_item(item: LayerItem) -> tuple[int | None, int | None] | int | str:
    """An int (negative counts from the end), 'all', or a range 'a:b' (end exclusive) / 'a..b' (inclusive)."""
    if isinstance(item, bool):
        raise ValueError("a layer must be an integer, 'all' or a range like '0:6' or '-2:'")
    if isinstance(item, int):
        return item
    if item.strip() == "all":
        return "all"
    m = _RANGE.match(item)
    if not m:
        raise ValueError(f"bad layer range '{item}': write an integer, 'all', 'a:b' (end exclusive) or 'a..b'")
    lo = int(m.group(1)) if m.group(1) is not None else None
    hi = int(m.group(3)) if m.group(3) is not None else None
    if m.group(2) == "..":
        if hi is None:
            raise ValueError(f"bad layer range '{item}': 'a..b' needs an end")
        hi = hi + 1 if hi != -1 else None
    return (lo, hi)


def resolve_layers(items: list[LayerItem], n: int) -> set[int]:
    """Turn layer items into concrete 0-based layer indices for a stack of ``n`` layers."""
    out: set[int] = set()
    for item in items:
        p = parse_layer_item(item)
        if p == "all":
            out.update(range(n))
        elif isinstance(p, int):
            if -n <= p < n:
                out.add(p % n)
        else:
            out.update(range(n)[slice(p[0], p[1])])
    return out


class MethodSpec(BaseModel):
    """A named method configuration: ``type`` is a registered PET method; the rest are its parameters."""

    model_config = ConfigDict(extra="allow")

    type: str

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str | None = None
    select: Selector
    insert: str | None = None  # a method name from `methods:` or a registered method type
    overrides: dict[str, Any] = Field(default_factory=dict, alias="with")
    placement: Literal["after", "parallel"] = "after"
    optional: bool = False
    skip: bool = False  # remove what earlier rules placed on the matched sites


class TrainableRule(BaseModel):
    """Besides PET modules, which existing parameters train (e.g. layer norms, the visual projector, biases)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    select: Selector = Field(default_factory=Selector)
    params: Literal["all", "weight", "bias"] = "all"
    optional: bool = False


class RuleSetSchema(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    methods: dict[str, MethodSpec] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)
    trainable: list[TrainableRule] = Field(default_factory=list)
    train_all: bool = False  # full fine-tuning: every parameter trains
