"""Rich rendering of site tables for the terminal."""

from __future__ import annotations

import re

from rich.text import Text
from rich.tree import Tree
from torch import nn

from vlpet_fx.analysis import SiteTable
from vlpet_fx.analysis.sites import Site, slice_text

_INDEX = re.compile(r"\.\d+(?=\.|$)")


def _site_params(model: nn.Module, site: Site) -> int | None:
    if site.role == "output":
        return None
    bias = site.out_features
    return site.in_features * site.out_features + bias if site.path is None else sum(
        p.numel() for p in model.get_submodule(site.path).parameters(recurse=False)
    )


def _layer_signature(sites: list[Site], hits: set[tuple]) -> tuple:
    """What a layer looks like with indices in paths blanked out (equal signatures print once)."""
    return tuple(
        (s.block, s.role, s.in_features, s.out_features, _INDEX.sub(".#", s.path or ""), s.key in hits) for s in sites
    )


def site_tree(model: nn.Module, table: SiteTable, title: str, hits: set[tuple] | None = None, expand: bool = False) -> Tree:
    hits = hits or set()
    root = Tree(Text(f"{title}  ·  {table.total_params:,} parameters", style="bold"))
    for stack in table.stacks():
        nl = table.num_layers()[stack]
        st = root.add(Text(f"{stack}  ({nl} layers)", style="bold cyan"))
        layers = [list(table.where(stack=stack, layer=i)) for i in range(nl)]
        i = 0
        while i < nl:
            j = i + 1
            if not expand:
                while j < nl and _layer_signature(layers[j], hits) == _layer_signature(layers[i], hits):
                    j += 1
            label = f"layer {i}" if j == i + 1 else f"layers {i}–{j - 1}  (same structure; showing layer {i})"
            node = st.add(Text(label, style="bold"))
            for block in dict.fromkeys(s.block for s in layers[i]):
                bsites = [s for s in layers[i] if s.block == block]
                bnode = node.add(Text(block, style="magenta"))
                for s in bsites:
                    count = _site_params(model, s)
                    mark = "● " if s.key in hits else "  "
                    where = s.path if s.path is not None else f"(slice of {s.param})" if s.param else "(no module)"
                    where += slice_text(s.out_slice)
                    line = Text(f"{mark}{s.role:<6} {where}  {s.in_features}→{s.out_features}")
                    if count is not None:
                        line.append(f"  {count:,} params", style="dim")
                    bnode.add(line)
            i = j
    return root


def plan_table(plan):
    """Per rule: the sites it resolved to and the parameters it adds; then unmatched rules and the budget."""
    from rich.table import Table

    from rich.markup import escape  # rule and rule-set names come from the user's file

    t = Table(title=f"plan: {escape(plan.rules.name)} on {plan.model}", show_lines=False)
    for col in ("rule", "method", "placement", "sites", "where", "params"):
        t.add_column(col, justify="right" if col in ("sites", "params") else "left")
    for rule, ps in plan.by_rule().items():
        stacks = sorted({(p.site.stack, p.site.block, p.site.role) for p in ps})
        layers = sorted({p.site.layer for p in ps})
        where = "; ".join(f"{s}.{b}.{r}" for s, b, r in stacks) + f" (layers {_ranges(layers)})"
        t.add_row(escape(rule), ps[0].method, ps[0].placement, str(len(ps)), where, f"{sum(p.params for p in ps):,}")
    for name in plan.unmatched:
        t.add_row(escape(name), "-", "-", "0", "[yellow]matched no site (optional)[/]", "0")
    existing = sum(plan.trainable.values())
    t.caption = (f"PET parameters {plan.pet_params:,} + existing trainable {existing:,} = trainable "
                 f"{plan.trainable_params:,} of {plan.patched_total:,} "
                 f"({100 * plan.trainable_params / max(plan.patched_total, 1):.2f}%)")
    return t


def _ranges(xs: list[int]) -> str:
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)
