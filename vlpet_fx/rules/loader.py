"""Load a rule set from YAML (a shipped name or a path), validate it, and keep line numbers for errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import pydantic
import yaml

from ..errors import RulesError
from ..modules.base import MethodConfig, MethodConfigError, get_method, make_config
from .schema import Rule, RuleSetSchema, TrainableRule


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that also records the line of every mapping key and sequence item (by path)."""


def _compose_lines(text: str) -> tuple[Any, dict[tuple, int]]:
    loader = _LineLoader(text)
    try:
        node = loader.get_single_node()
    finally:
        loader.dispose()
    lines: dict[tuple, int] = {}

    def walk(n, path):
        lines.setdefault(path, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = k.value
                lines[path + (key,)] = k.start_mark.line + 1
                walk(v, path + (key,))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[path + (i,)] = v.start_mark.line + 1
                walk(v, path + (i,))

    if node is not None:
        walk(node, ())
    return yaml.safe_load(text), lines


def _where(source: str, lines: dict[tuple, int], path: tuple) -> str:
    """'file:line' of the deepest known prefix of a key path."""
    for cut in range(len(path), -1, -1):
        if path[:cut] in lines:
            return f"{source}:{lines[path[:cut]]}"
    return source


@dataclass
class ResolvedMethod:
    alias: str
    type: str
    config: MethodConfig


@dataclass
class RuleSet:
    """A validated rule set. ``where(path)`` gives 'file:line' for error messages."""

    name: str
    description: str
    methods: dict[str, ResolvedMethod]
    rules: list[Rule]
    trainable: list[TrainableRule]
    train_all: bool
    source: str
    text: str
    lines: dict[tuple, int] = field(default_factory=dict)

    def where(self, *path) -> str:
        return _where(self.source, self.lines, path)

    def method_for(self, rule_index: int) -> tuple[str, str, MethodConfig]:
        """(alias, method type, config) for a rule, with the rule's overrides applied."""
        rule = self.rules[rule_index]
        base = self.methods.get(rule.insert)
        if base is None:  # a registered method used directly by name
            alias, mtype, params = rule.insert, rule.insert, {}
        else:
            alias, mtype, params = base.alias, base.type, dataclasses.asdict(base.config)
        params.update(rule.overrides)
        try:
            return alias, mtype, make_config(mtype, params)
        except MethodConfigError as exc:
            raise RulesError(f"{self.where('rules', rule_index, 'with')}: rules[{rule_index}].with: {exc}") from None

    def rule_name(self, i: int) -> str:
        return self.rules[i].name or f"rule-{i}"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "methods": {k: {"type": m.type, **dataclasses.asdict(m.config)} for k, m in self.methods.items()},
            "text": self.text,
        }


def shipped_rule_names() -> list[str]:
    root = resources.files("vlpet_fx.shipped_rules")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _locate(name_or_path: str | Path) -> tuple[str, str]:
    """Return (source label, YAML text) for a shipped name or a file path."""
    p = Path(name_or_path)
    text_name = str(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists() or "/" in text_name or "\\" in text_name:
        if not p.exists():
            raise RulesError(f"rules file '{p}' does not exist: give a path to a YAML rule set or a shipped name "
                             f"({', '.join(shipped_rule_names())})")
        if p.is_dir():
            raise RulesError(f"rules path '{p}' is a directory: give a YAML file")
        try:
            return str(p), p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RulesError(f"cannot read rules file '{p}': {getattr(exc, 'strerror', None) or exc}") from None
    res = resources.files("vlpet_fx.shipped_rules").joinpath(f"{text_name}.yaml")
    if not res.is_file():
        raise RulesError(f"unknown rule set '{text_name}': shipped ones are {', '.join(shipped_rule_names())}; "
                         "or give a path to a YAML file")
    return f"{text_name}.yaml", res.read_text(encoding="utf-8")


def load_rules(rules: "str | Path | RuleSet") -> RuleSet:
    """Load and validate a rule set: a shipped name (``vlpet_large``), a YAML path, or a RuleSet (returned)."""
    if isinstance(rules, RuleSet):
        return rules
    source, text = _locate(rules)
    return parse_rules(text, source)


def parse_rules(text: str, source: str = "<rules>") -> RuleSet:
    try:
        data, lines = _compose_lines(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RulesError(f"{source}{line}: not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise RulesError(f"{source}:1: a rule set is a YAML mapping with keys name, methods, rules, trainable")

    def at(loc) -> str:
        return _where(source, lines, tuple(loc))

    try:
        schema = RuleSetSchema.model_validate(data)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("list[", "dict[", "literal[", "int", "str")))]
        key = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc).replace(".[", "[")
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = f"unknown key '{loc[-1]}'"
        raise RulesError(f"{at(loc)}: {key}: {msg}") from None

    methods: dict[str, ResolvedMethod] = {}
    for alias, spec in schema.methods.items():
        try:
            get_method(spec.type)
            cfg = make_config(spec.type, spec.params())
        except MethodConfigError as exc:
            raise RulesError(f"{at(('methods', alias))}: methods.{alias}: {exc}") from None
        methods[alias] = ResolvedMethod(alias, spec.type, cfg)

    rs = RuleSet(schema.name, schema.description, methods, schema.rules, schema.trainable, schema.train_all,
                 source, text, lines)
    for i, rule in enumerate(schema.rules):
        if rule.skip:
            continue
        if rule.insert is None:
            raise RulesError(f"{at(('rules', i))}: rules[{i}]: say what to insert (`insert: <method>`) or `skip: true`")
        if rule.insert not in methods:
            try:
                get_method(rule.insert)
            except MethodConfigError:
                raise RulesError(
                    f"{at(('rules', i, 'insert'))}: rules[{i}].insert: unknown method '{rule.insert}': define it "
                    f"under `methods:` ({', '.join(methods) or 'none defined'}) or use a registered method"
                ) from None
        _, mtype, _ = rs.method_for(i)
        placements = get_method(mtype).module.placements
        if rule.placement not in placements:
            raise RulesError(f"{at(('rules', i, 'placement'))}: rules[{i}].placement: method '{mtype}' cannot be "
                             f"placed '{rule.placement}' (it supports {', '.join(placements)})")
    return rs
