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

from .._text import shown
from ..analysis import SiteTable, discover
from ..analysis.sites import Site, slice_text
from ..errors import PlanError, RulesError
from ..modules.base import MethodConfig, MethodConfigError, get_method
from ..rules import RuleSet, load_rules
from ..rules.schema import LayerRangeError
from .select import match_modules, match_sites


def model_signature(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter and buffer: what a plan assumes of the model it was made for."""
    sig = {f"p:{n}": tuple(p.shape) for n, p in model.named_parameters()}
    sig.update({f"b:{n}": tuple(b.shape) for n, b in model.named_buffers()})
    return sig


def signature_mismatch(want: dict[str, tuple[int, ...]], have: dict[str, tuple[int, ...]]) -> str | None:
    """None if equal, else the first difference in words."""
    if want == have:
        return None
    for key in sorted(want.keys() | have.keys()):
        kind = "parameter" if key.startswith("p:") else "buffer"
        name = shown(key[2:], 100)
        if key not in have:
            return f"it has no {kind} '{name}'"
        if key not in want:
            return f"it has a {kind} '{name}' the plan's model did not have"
        if want[key] != have[key]:
            return f"its {kind} '{name}' has shape {list(have[key])}, the plan's model had {list(want[key])}"
    return "its parameters differ"  # pragma: no cover - unequal dicts differ in some key


@dataclass(frozen=True)
class Placement:
    rule: str
    rule_index: int
    alias: str
    method: str
    config: MethodConfig  # resolved for this site: every width an absolute integer
    placement: str
    site: Site
    params: int

    @property
    def key(self) -> tuple[str, str]:
        """``(site key, placement)``: at most one placement per key in a plan."""
        return (self.site.key, self.placement)

    @property
    def attach_name(self) -> str:
        """Name of the PET child module on the site's module: ``pet_<role>[_<slice>]_<placement>`` (a packed
        module holds one per slice; the planner refuses two placements with one name on one module)."""
        return f"pet_{self.site.role}{_slice_tag(self.site.out_slice)}_{self.placement}"

    def public(self) -> dict:
        s = self.site
        return {"rule": self.rule, "method": self.method, "key": s.key, "stack": s.stack, "layer": s.layer,
                "block": s.block, "role": s.role, "path": s.path,
                "out_slice": list(s.out_slice) if s.out_slice else None, "params": self.params}

    def to_dict(self) -> dict:
        return {**self.public(), "alias": self.alias, "placement": self.placement, "rule_index": self.rule_index,
                "in_features": self.site.in_features, "out_features": self.site.out_features,
                "config": dataclasses.asdict(self.config)}


def _slice_tag(out_slice: tuple[int, ...] | None) -> str:
    return "_" + "_".join(str(int(v)) for v in out_slice) if out_slice else ""


def check_placement(cls, site: Site, placement: str) -> str | None:
    """Why ``cls`` cannot be placed ``placement`` on ``site`` (one line), or ``None``. Shape checks are the
    method's own (``check_fits``); these are the ones every method shares."""
    if placement == "parallel" and site.role == "output":
        return ("a block's `output` is not one projection, so it has no input to run a parallel module on: "
                "use `placement: after`, or select a projection role (q, k, v, o, in, gate, up, out)")
    if site.out_slice and not cls.inserts_module:
        return (f"method '{cls.name}' trains the module's own weight, but this site is a slice "
                f"({slice_text(site.out_slice)}) of a packed projection, whose weight also makes the other slices: "
                "insert a module instead (lora, adapter, vlpet), or train the packed module with `trainable:`")
    return None


def check_widths(cls, site: Site, placement: str, cfg: MethodConfig) -> str | None:
    """Why the module ``cls`` builds for ``site`` would not fit the values it is given in the forward (one
    line), or ``None``: a method that reads the block input X (VL-PET's gates) is built for X of the site's
    output width, so X must have that width. (The site's own widths are the module's by construction: discovery
    keeps a module path only where the module returns the site's value.)"""
    if not cls.inserts_module or site.input_features is None:
        return None
    if _reads_block_input(cls, site.in_features, site.out_features, placement, cfg) and \
            site.input_features != site.out_features:
        return (f"{cls.name} reads the block input X ({site.input_features} wide) to gate a value "
                f"{site.out_features} wide; use a gate that does not read X (gate: middleY or none) here")
    return None


def _reads_block_input(cls, in_features: int, out_features: int, placement: str, cfg: MethodConfig) -> bool:
    """Whether the method's module reads X (built on the meta device, as for the parameter count)."""
    import torch

    with torch.device("meta"):
        mod = cls(in_features, out_features, cfg, placement=placement)
    return bool(getattr(mod, "needs_block_input", False))


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
    signature: dict[str, tuple[int, ...]] | None = None  # model_signature of the model it was made for

    def check_model(self, model: nn.Module) -> None:
        """PlanError (one line) unless ``model`` has the parameters and buffers, by name and shape, of the model
        this plan was made for, and every module the placements name."""
        if self.signature is not None:
            problem = signature_mismatch(self.signature, model_signature(model))
            if problem is not None:
                raise PlanError(f"this plan was made for another model ({self.model}): {problem}; make the plan "
                                "for this model (vlpet_fx.plan(model, rules))")
        modules = dict(model.named_modules())
        for p in self.placements:
            anchors = [a for a in (p.site.anchor, p.site.input_anchor) if a is not None]
            for path in (p.site.path, p.site.input_path, *(q for a in anchors for q in (a.path, a.parent))):
                if path is not None and path not in modules:
                    raise PlanError(f"this plan was made for another model ({self.model}): it has no module "
                                    f"'{shown(path, 100)}' (site {p.site}); make the plan for this model")

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

    def unmatched_warning(self) -> str | None:
        """One line naming the optional rules that matched no site (they placed nothing: a rule set meant for
        another kind of model would otherwise patch only part of what it promises without a word), or None."""
        if not self.unmatched:
            return None
        names = ", ".join(f"'{shown(n, 40)}'" for n in self.unmatched[:6])
        n = len(self.unmatched)
        more = f" and {n - 6} more" if n > 6 else ""
        return (f"{n} optional rule{'s' if n > 1 else ''} of {shown(self.rules.name, 60)} matched no site of "
                f"{shown(self.model, 80)} and placed nothing: {names}{more}; check the selectors against "
                "`vlpet-fx inspect` if that model should have them")

    def to_dict(self) -> dict:
        """The public JSON contract of ``patch --format json`` (field names: docs/CLI.md)."""
        return {"placements": [p.public() for p in self.placements], "trainable_params": self.trainable_params,
                "pet_params": self.pet_params, "base_params": self.total_params, "patched_params": self.patched_total,
                "unmatched": list(self.unmatched)}

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
    stray = next((s for s in table if s.path is not None and s.path not in modules), None)
    if stray is not None:
        raise PlanError(f"the site table of {table.model} does not belong to this model: it has no module "
                        f"'{shown(stray.path, 100)}'; discover the sites of this model (or pass no table)")
    chosen: dict[tuple, Placement] = {}
    unmatched: list[str] = []
    for i, rule in enumerate(rs.rules):
        try:
            sites = match_sites(rule.select, table, modules)
        except LayerRangeError as exc:
            raise RulesError(f"{rs.where('rules', i, 'select', 'layers')}: rules[{i}].select.layers: {exc}") from None
        if not sites:
            if rule.optional:
                unmatched.append(rs.rule_name(i))
                continue
            raise RulesError(f"{rs.where('rules', i)}: rule '{shown(rs.rule_name(i))}' matches no site of "
                             f"{table.model}: check its selector against `vlpet-fx inspect`, or add `optional: true`")
        if rule.skip:
            for s in sites:
                for pl in ("after", "parallel"):
                    chosen.pop((s.key, pl), None)
            continue
        alias, mtype, cfg = rs.method_for(i)
        cls = get_method(mtype).module
        for s in sites:
            why = check_placement(cls, s, rule.placement)
            if why:
                raise RulesError(f"{rs.where('rules', i)}: rule '{rs.rule_name(i)}' cannot place {mtype} "
                                 f"'{rule.placement}' on {s.key}: {why}")
            try:
                site_cfg = resolve_widths(cls, s, rule.placement, cfg)
                cls.check_fits(s.in_features, s.out_features, rule.placement, site_cfg)
            except MethodConfigError as exc:
                raise RulesError(f"{rs.where('rules', i)}: rule '{shown(rs.rule_name(i))}' does not fit site {s}: "
                                 f"{exc}") from None
            why = check_widths(cls, s, rule.placement, site_cfg)
            if why:
                raise RulesError(f"{rs.where('rules', i)}: rule '{shown(rs.rule_name(i))}' does not fit site {s}: "
                                 f"{why}")
            n = _count(cls, s, rule.placement, site_cfg)
            p = Placement(rs.rule_name(i), i, alias, mtype, site_cfg, rule.placement, s, n)
            chosen[p.key] = p

    trainable: dict[str, int] = {}
    sources: dict[str, str] = {}
    named = dict(model.named_parameters())
    if rs.train_all:
        for n_, p_ in named.items():
            trainable[n_] = p_.numel()
            sources[n_] = "train_all"
    for j, tr in enumerate(rs.trainable):
        try:
            paths = match_modules(tr.select, table, model)
        except LayerRangeError as exc:
            raise RulesError(f"{rs.where('trainable', j, 'select', 'layers')}: trainable[{j}].select.layers: "
                             f"{exc}") from None
        params = _params_of(model, named, paths, tr.params)
        if not params and not tr.optional:
            raise RulesError(f"{rs.where('trainable', j)}: trainable rule '{shown(tr.name or f'trainable-{j}')}' selects no "
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
    if not chosen and not trainable:
        what = (f"its rules ({', '.join(shown(u, 40) for u in unmatched[:6])}) are optional and matched no site"
                if unmatched else "it has no rule that places a method or makes a parameter trainable")
        raise RulesError(f"{rs.where('rules')}: rule set '{shown(rs.name)}' trains nothing on {table.model}: {what}; "
                         "check the selectors against `vlpet-fx inspect`, or use a rule set that fits this model")
    _check_attach_names(chosen.values(), rs)
    order = {id(s): i for i, s in enumerate(table)}
    placements = sorted(chosen.values(), key=lambda p: (p.rule_index, order[id(p.site)], p.placement))
    total = sum(p.numel() for p in model.parameters())
    return Plan(table.model, rs, table, placements, trainable, sources, total, unmatched, model_signature(model))


def _check_attach_names(placements, rs: RuleSet) -> None:
    """Two PET modules may not share a name on one module (e.g. the same role twice on one packed module)."""
    seen: dict[tuple, Placement] = {}
    for p in placements:
        path = p.site.path if p.site.path is not None else (p.site.anchor.path if p.site.anchor else None)
        if path is None or not get_method(p.method).module.inserts_module:
            continue
        k = (path, p.attach_name)
        if k in seen:
            q = seen[k]
            raise RulesError(f"{rs.where('rules', p.rule_index)}: rule '{p.rule}' places a module on {p.site.key}, "
                             f"which would share the name {path}.{p.attach_name} with {q.site.key} (rule "
                             f"'{q.rule}'): select one of the two sites")
        seen[k] = p


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


def resolve_widths(cls, site: Site, placement: str, cfg: MethodConfig) -> MethodConfig:
    """The method config for one site, every layer width absolute: a width given relative to the site
    (``dim: 1/8``, ``{of_site: 0.125}``, ``reduction: 8``, ``rank: 1/4``) becomes the nearest integer (halves
    up), at least 1, and for VL-PET's r the nearest multiple of N_h (docs/RULES.md, "Widths relative to the
    site"). The placement keeps this config, so the plan and a saved manifest record the widths that were
    built, and re-planning the same rules on the same model gives the same widths."""
    return cls.resolve(site.in_features, site.out_features, placement, cfg)


def _count(cls, site: Site, placement: str, cfg: MethodConfig) -> int:
    return cls.count(site.in_features, site.out_features, placement, cfg)
