"""Declarative placement rules: YAML rule sets → validated :class:`RuleSet`."""

from .loader import RuleSet, load_rules, parse_rules, shipped_rule_names
from .schema import Rule, Selector, TrainableRule, resolve_layers

__all__ = ["RuleSet", "load_rules", "parse_rules", "shipped_rule_names", "Rule", "Selector", "TrainableRule",
           "resolve_layers"]
