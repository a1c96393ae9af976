"""Load a rule set from YAML (a shipped name or a path), validate it, and keep line numbers for errors.

Nothing in a rules file is trusted. Before anything is parsed the file must be a regular file of at most
``MAX_RULES_BYTES``; the YAML is read with ``yaml.SafeLoader`` (tags that would build Python objects are
refused) and bounded while it is read: nesting depth ``MAX_DEPTH``, at most ``MAX_NODES`` values *after*
alias expansion (so a "billion laughs" document is refused after a few thousand events, not expanded),
no alias inside its own anchor, no duplicate keys, integers of at most ``MAX_INT_DIGITS`` digits. YAML 1.1's
base-60 numbers are not recognised (``2:6`` is the layer range it looks like, not the integer 126).
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import pydantic
import yaml

from .._text import shown
from ..errors import RulesError
from ..io import FileProblem, read_user_file
from ..modules.base import MethodConfig, MethodConfigError, get_method, make_config
from .schema import Rule, RuleSetSchema, TrainableRule

MAX_RULES_BYTES = 1 << 20  # 1 MiB: a rules file (or a manifest's rules text) larger than this is refused
MAX_DEPTH = 32  # nesting of mappings and sequences
MAX_NODES = 20_000  # values in the document, aliases expanded
MAX_INT_DIGITS = 30

_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_MERGE = "tag:yaml.org,2002:merge"


class _Refused(Exception):
    """A bound of the rules YAML was crossed (line, message)."""

    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line = line
        self.message = message


class _LineLoader(yaml.SafeLoader):
    """SafeLoader with bounds checked while the events stream in (depth, values after alias expansion,
    aliases inside their own anchor), duplicate keys refused and no base-60 numbers."""

    def __init__(self, text: str):
        super().__init__(text)
        self._frames: list[list] = []  # per open collection: [expanded size so far, anchor]
        self._sizes: dict[str, int] = {}  # anchor -> expanded size of its (complete) node
        self._open: set[str] = set()  # anchors of collections still being read
        self._total = 0

    def _add(self, size: int, line: int) -> None:
        if self._frames:
            frame = self._frames[-1]
            frame[0] += size
            grown = frame[0]
        else:
            self._total += size
            grown = self._total
        if grown > MAX_NODES:
            raise _Refused(line, f"the document holds more than {MAX_NODES:,} values once its aliases are expanded: "
                                 "a rule set is far smaller; write the values out")

    def get_event(self):
        event = super().get_event()
        line = event.start_mark.line + 1 if event.start_mark is not None else 1
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            if len(self._frames) >= MAX_DEPTH:
                raise _Refused(line, f"nested more than {MAX_DEPTH} levels deep: a rule set needs a few")
            if event.anchor is not None:
                self._open.add(event.anchor)
            self._frames.append([1, event.anchor])
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            size, anchor = self._frames.pop()
            if anchor is not None:
                self._open.discard(anchor)
                self._sizes[anchor] = size
            self._add(size, line)
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor is not None:
                self._sizes[event.anchor] = 1
            self._add(1, line)
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open:
                raise _Refused(line, f"alias *{shown(event.anchor)} is used inside its own anchor (a recursive "
                                     "structure): write the values out")
            # an undefined alias is left to the composer, which says so
            self._add(self._sizes.get(event.anchor, 1), line)
        return event

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    marker = (type(key), key)
                    hash(marker)
                except TypeError:
                    continue  # SafeConstructor says "found unhashable key"
                line = key_node.start_mark.line + 1
                if marker in seen:
                    raise _Refused(line, f"duplicate key {shown(key)!r} (first on line {seen[marker]}): keep one")
                seen[marker] = line
        return super().construct_mapping(node, deep)

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (_Refused, yaml.YAMLError, RecursionError):
            raise
        except Exception as exc:  # an explicit tag on a value it cannot read (`!!int ''`, `!!float x`, ...)
            raise _Refused(node.start_mark.line + 1, f"cannot read {shown(node.tag, 40)} value: "
                                                     f"{shown(type(exc).__name__ + ': ' + str(exc), 80)}") from None

    def construct_yaml_int(self, node):
        digits = sum(c.isalnum() for c in str(node.value))
        if digits > MAX_INT_DIGITS:
            raise _Refused(node.start_mark.line + 1, f"an integer of {digits} digits: numbers in a rule set have "
                                                     f"at most {MAX_INT_DIGITS}")
        return super().construct_yaml_int(node)


# YAML 1.1's implicit int/float forms without the base-60 ones (`2:6` stays a string)
_LineLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_LineLoader.add_implicit_resolver(_INT, re.compile(r"""^(?:[-+]?0b[0-1_]+
    |[-+]?0[0-7_]+
    |[-+]?(?:0|[1-9][0-9_]*)
    |[-+]?0x[0-9a-fA-F_]+)$""", re.X), list("-+0123456789"))
_LineLoader.add_implicit_resolver(_FLOAT, re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))
_LineLoader.add_constructor(_INT, _LineLoader.construct_yaml_int)


def _compose_lines(text: str) -> tuple[Any, dict[tuple, int]]:
    """The document's data and the line of every mapping key and sequence item (by key path). Aliased nodes
    are walked once (their lines are those of the anchor), so the walk is linear in the text."""
    loader = _LineLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    lines: dict[tuple, int] = {}
    seen: set[int] = set()
    stack = [(node, ())] if node is not None else []
    while stack:
        n, path = stack.pop()
        lines.setdefault(path, n.start_mark.line + 1)
        if id(n) in seen:
            continue
        seen.add(id(n))
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                if isinstance(k, yaml.ScalarNode):
                    lines.setdefault(path + (k.value,), k.start_mark.line + 1)
                    stack.append((v, path + (k.value,)))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines.setdefault(path + (i,), v.start_mark.line + 1)
                stack.append((v, path + (i,)))
    return data, lines


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


_KINDS = [(stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a named pipe (fifo)"), (stat.S_ISSOCK, "a socket")]


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def read_rules_file(p: Path) -> str:
    """The text of a rules file: a regular file of at most MAX_RULES_BYTES of UTF-8, checked before reading."""
    try:
        data = read_user_file(p, MAX_RULES_BYTES)
    except FileProblem as why:
        raise RulesError({
            "missing": f"rules file '{p}' does not exist: give a path to a YAML rule set or a shipped name "
                       f"({', '.join(shipped_rule_names())})",
            "unreadable": f"cannot read rules file '{p}': {why.detail}",
            "directory": f"rules path '{p}' is a directory: give a YAML file",
            "special": f"rules path '{p}' is {_kind(why.mode) + ', not' if why.mode else 'not'} a regular file: give "
                       "a YAML file",
            "too_large": f"rules file '{p}' is {why.size:,} bytes; a rule set is at most {MAX_RULES_BYTES:,} bytes "
                         "(1 MiB): is it the right file?",
            "grew": f"rules file '{p}' is larger than {MAX_RULES_BYTES:,} bytes (1 MiB): is it the right file?",
        }[why.kind]) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RulesError(f"rules file '{p}' is not UTF-8 text (byte {exc.start}): save it as UTF-8 YAML") from None


_SHIPPED_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")


def _locate(name_or_path: str | Path) -> tuple[str, str]:
    """Return (source label, YAML text) for a shipped name or a file path."""
    if not isinstance(name_or_path, (str, Path)):
        raise RulesError(f"rules must be a shipped name, a path or a RuleSet, not {type(name_or_path).__name__}")
    text_name = str(name_or_path)
    if "\x00" in text_name or len(text_name) > 4096:
        raise RulesError(f"rules path '{shown(text_name)}' is not a usable file name")
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or os.path.lexists(p) or "/" in text_name or "\\" in text_name:
        return str(p), read_rules_file(p)
    res = resources.files("vlpet_fx.shipped_rules").joinpath(f"{text_name}.yaml")
    if not _SHIPPED_NAME.fullmatch(text_name) or not res.is_file():
        raise RulesError(f"unknown rule set '{shown(text_name)}': shipped ones are {', '.join(shipped_rule_names())}; "
                         "or give a path to a YAML file")
    return f"{text_name}.yaml", res.read_text(encoding="utf-8")


def load_rules(rules: "str | Path | RuleSet") -> RuleSet:
    """Load and validate a rule set: a shipped name (``vlpet_large``), a YAML path, or a RuleSet (returned)."""
    if isinstance(rules, RuleSet):
        return rules
    source, text = _locate(rules)
    return parse_rules(text, source)


def _key_of(loc) -> str:
    return ".".join(f"[{p}]" if isinstance(p, int) else shown(p, 40) for p in loc).replace(".[", "[")


def parse_rules(text: str, source: str = "<rules>") -> RuleSet:
    """Validate a rule set's YAML text (from a file, or stored in a manifest); ``source`` names it in errors."""
    source = shown(source, 200) if isinstance(source, str) else "<rules>"
    if not isinstance(text, str):
        raise RulesError(f"{source}: the rules text is {type(text).__name__}, not YAML text")
    if len(text) > MAX_RULES_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_RULES_BYTES:
        raise RulesError(f"{source}: the rules text is larger than {MAX_RULES_BYTES:,} bytes (1 MiB)")
    try:
        data, lines = _compose_lines(text)
    except _Refused as exc:
        raise RulesError(f"{source}:{exc.line}: {exc.message}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        if isinstance(exc, yaml.reader.ReaderError) and isinstance(exc.position, int):
            line = f":{text.count(chr(10), 0, exc.position) + 1}"
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["unreadable"])[0]
        raise RulesError(f"{source}{line}: not valid YAML: {shown(problem, 160)}") from None
    if not isinstance(data, dict):
        raise RulesError(f"{source}:1: a rule set is a YAML mapping with keys name, methods, rules, trainable")

    def at(loc) -> str:
        return _where(source, lines, tuple(loc))

    try:
        schema = RuleSetSchema.model_validate(data)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        loc = [p for p in err["loc"]
               if not (isinstance(p, str) and p.startswith(("list[", "dict[", "literal[", "int", "str", "function-")))]
        key = _key_of(loc)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = f"unknown key '{shown(loc[-1], 40)}'"
        elif err["type"].startswith("value_error"):
            msg = msg.removeprefix("Value error, ")
        raise RulesError(f"{at(loc)}: {key}: {shown(msg, 240)}") from None

    methods: dict[str, ResolvedMethod] = {}
    for alias, spec in schema.methods.items():
        try:
            get_method(spec.type)
            cfg = make_config(spec.type, spec.params())
        except MethodConfigError as exc:
            raise RulesError(f"{at(('methods', alias))}: methods.{shown(alias, 40)}: {exc}") from None
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
                    f"{at(('rules', i, 'insert'))}: rules[{i}].insert: unknown method '{shown(rule.insert, 40)}': "
                    f"define it under `methods:` ({shown(', '.join(methods), 120) or 'none defined'}) or use a "
                    "registered method"
                ) from None
        _, mtype, _ = rs.method_for(i)
        placements = get_method(mtype).module.placements
        if rule.placement not in placements:
            raise RulesError(f"{at(('rules', i, 'placement'))}: rules[{i}].placement: method '{mtype}' cannot be "
                             f"placed '{rule.placement}' (it supports {', '.join(placements)})")
    return rs
