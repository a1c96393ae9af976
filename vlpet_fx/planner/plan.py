"""Rules + site table → Plan: every placement (rule → site → method config) and the parameter budget.

Precedence: rules apply in file order. A later rule that selects a site already given a module *at the same
placement* replaces it (later wins); ``skip: true`` removes earlier placements from the sites it selects.
Planning never changes the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..analysis import SiteTable, discover
from ..analysis.sites import Site
from ..errors import RulesError
from ..modules.base import MethodConfig, MethodConfigError, get_method
from ..rules import RuleSet, load_rules
from .select import match_modules, match_sites


@dataclass(frozen=True)
class Placement:
    rule: str
    rule_index: int
    alias: str
    method: str
    config: MethodConfig
    placement: str
    site: Site
    params: int

    @property
    def key(self) -> tuple:
        return (self.site.stack, self.site.layer, self.site.block, self.site.role, self.placement)

    @property
    def attach_name(self) -> str:
        """Name of the PET child module on the site's module (unique per role and placement)."""
        return f"pet_{self.site.role}_{self.placement}"

    def public(self) -> dict:
        s = self.site
        return {"rule": self.rule, "method": self.method, "stack": s.stack, "layer": s.layer, "block": s.block,
                "role": s.role, "path": s.path, "params": self.params}

    def to_dict(self) -> dict:
        return {**self.public(), "alias": self.alias, "placement": self.placement, "rule_index": self.rule_index,
                "in_features": self.site.in_features, "out_features": self.site.out_features,
                "config": dataclasses.asdict(self.config)}


@dataclass
class Plan:
    model: str
    rules: RuleSet
    table: SiteTable
    placements: list[Placement]
    trainable: dict[str, int]  # existing parameters that train (name -> numel), besides the PET modules
    trainable_sources: dict[str, str]  # existing parameter -> the rule that made it trainable
    total_params: int  # of the unpatched model
    unmatched: list[str] = field(default_factory=list)  # optional rules that matched nothing

    @property
    def pet_params(self) -> int:
        return sum(p.params for p in self.placements)

    @property
    def trainable_params(self) -> int:
        return self.pet_params + sum(self.trainable.values())

    @property
    def patched_total(self) -> int:
        return self.total_params + self.pet_params

    def by_rule(self) -> dict[str, list[Placement]]:
        out: dict[str, list[Placement]] = {}
        for p in self.placements:
            out.setdefault(p.rule, []).append(p)
        return out

    def to_dict(self) -> dict:
        """The public JSON contract of ``patch --format json`` (field names: docs/CLI.md)."""
        return {"placements": [p.public() for p in self.placements], "trainable_params": self.trainable_params,
                "pet_params": self.pet_params, "base_params": self.total_params, "patched_params": self.patched_total}

    def to_full_dict(self) -> dict:
        """The manifest's record (vlpet.json; its keys are kept as they were written)."""
        return {"placements": [p.public() for p in self.placements], "trainable_params": self.trainable_params,
                "total_params": self.patched_total, "model": self.model, "rules": self.rules.name, "unmatched": self.unmatched,
                "placements_detail": [p.to_dict() for p in self.placements],
                "trainable_existing": self.trainable, "base_total_params": self.total_params}


def plan(model: nn.Module, rules: "RuleSet | str", *, table: SiteTable | None = None, name: str | None = None,
         example_inputs: Any = None) -> Plan:
    """Resolve ``rules`` against ``model``'s sites; compute the budget. The model is not changed."""
    rs = load_rules(rules)
    if table is None:
        table = discover(model, example_inputs, name=name)
    modules = dict(model.named_modules())
    chosen: dict[tuple, Placement] = {}
    unmatched: list[str] = []
    for i, rule in enumerate(rs.rules):
        sites = match_sites(rule.select, table, modules)
        if not sites:
            if rule.optional:
                unmatched.append(rs.rule_name(i))
                continue
            raise RulesError(f"{rs.where('rules', i)}: rule '{rs.rule_name(i)}' matches no site of "
                             f"{table.model}: check its selector against `vlpet-fx inspect`, or add `optional: true`")
        if rule.skip:
            for s in sites:
                for pl in ("after", "parallel"):
                    chosen.pop((s.stack, s.layer, s.block, s.role, pl), None)
            continue
        alias, mtype, cfg = rs.method_for(i)
        cls = get_method(mtype).module
        for s in sites:
            try:
                cls.check_fits(s.in_features, s.out_features, rule.placement, cfg)
            except MethodConfigError as exc:
                raise RulesError(f"{rs.where('rules', i)}: rule '{rs.rule_name(i)}' does not fit site {s}: {exc}") from None
            n = _count(cls, s, rule.placement, cfg)
            p = Placement(rs.rule_name(i), i, alias, mtype, cfg, rule.placement, s, n)
            chosen[p.key] = p

    trainable: dict[str, int] = {}
    sources: dict[str, str] = {}
    named = dict(model.named_parameters())
    if rs.train_all:
        for n_, p_ in named.items():
            trainable[n_] = p_.numel()
            sources[n_] = "train_all"
    for j, tr in enumerate(rs.trainable):
        paths = match_modules(tr.select, table, model)
        params = _params_of(model, named, paths, tr.params)
        if not params and not tr.optional:
            raise RulesError(f"{rs.where('trainable', j)}: trainable rule '{tr.name or f'trainable-{j}'}' selects no "
                             f"parameters of {table.model}: fix its selector or add `optional: true`")
        for n_ in params:
            trainable.setdefault(n_, named[n_].numel())
            sources.setdefault(n_, tr.name or f"trainable-{j}")
    # `none` (full fine-tuning of a site's module): its own parameters train
    for p in chosen.values():
        if not get_method(p.method).module.inserts_module and p.site.path is not None:
            for n_ in _params_of(model, named, [p.site.path], "all"):
                trainable.setdefault(n_, named[n_].numel())
                sources.setdefault(n_, p.rule)
    order = {id(s): i for i, s in enumerate(table)}
    placements = sorted(chosen.values(), key=lambda p: (p.rule_index, order[id(p.site)], p.placement))
    total = sum(p.numel() for p in model.parameters())
    return Plan(table.model, rs, table, placements, trainable, sources, total, unmatched)


def _params_of(model: nn.Module, named: dict, paths: list[str], which: str) -> list[str]:
    """Parameter names (as ``named``, the model's de-duplicated parameters, spells them) under ``paths``."""
    out: dict[str, None] = {}
    for path in paths:
        mod = model.get_submodule(path) if path else model
        for n_, _ in mod.named_parameters():
            full = f"{path}.{n_}" if path else n_
            if full not in named:  # a tied parameter registered under another name
                continue
            leaf = n_.rsplit(".", 1)[-1]
            if which == "all" or leaf == which:
                out[full] = None
    return list(out)


def _count(cls, site: Site, placement: str, cfg: MethodConfig) -> int:
    return cls.count(site.in_features, site.out_features, placement, cfg)
