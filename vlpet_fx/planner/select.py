"""Selectors → sites and modules. Matching is by the site table's fields, never by architecture names.

Patterns (``path_regex``, ``module_type``) are RE2 (linear-time matching, see :mod:`vlpet_fx.rules.schema`).
A layer index outside a stack the selector reaches raises :class:`~vlpet_fx.rules.schema.LayerRangeError`.
"""

from __future__ import annotations

from torch import nn

from ..analysis.sites import Site, SiteTable
from ..rules.schema import Selector, compile_pattern, resolve_layers


def _layers_for(sel: Selector, stack: str, n: int) -> set[int] | None:
    if sel.layers is None:
        return None
    if isinstance(sel.layers, dict):
        items = sel.layers.get(stack)
        return set() if items is None else resolve_layers(items, n, f"the {stack}")
    return resolve_layers(sel.layers, n, f"the {stack}")


# a selector role that also selects finer roles: `in` is every input projection of a feed-forward block
# (the plain `in`, or a gated MLP's `gate` and `up`)
ROLE_GROUPS = {"in": ("in", "gate", "up")}


def _roles(sel: Selector) -> set[str] | None:
    if sel.role is None:
        return None
    return {r for role in sel.role for r in ROLE_GROUPS.get(role, (role,))}


def match_sites(sel: Selector, table: SiteTable, modules: dict[str, nn.Module]) -> list[Site]:
    roles = _roles(sel)
    counts = table.num_layers()
    layer_sets: dict[str, set[int] | None] = {}  # resolved for the stacks the other fields reach
    path_re = compile_pattern(sel.path_regex) if sel.path_regex else None
    type_re = compile_pattern(sel.module_type) if sel.module_type else None
    out = []
    if sel.norms:  # normalisation layers are modules, not insertion sites
        return out
    for s in table:
        if sel.stack is not None and s.stack not in sel.stack:
            continue
        if sel.block is not None and s.block not in sel.block:
            continue
        if roles is not None and s.role not in roles:
            continue
        if s.stack not in layer_sets:
            layer_sets[s.stack] = _layers_for(sel, s.stack, counts.get(s.stack, 0))
        layers = layer_sets[s.stack]
        if layers is not None and s.layer not in layers:
            continue
        if path_re is not None and (s.path is None or not path_re.search(s.path)):
            continue
        if type_re is not None:
            mod = modules.get(s.path) if s.path is not None else None
            if mod is None or not type_re.fullmatch(type(mod).__name__):
                continue
        out.append(s)
    return out


def _under(path: str, prefix: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def stack_roots(table: SiteTable) -> dict[str, str]:
    """For each stack, the highest module path that holds its layers and no other stack's layers."""
    layer_paths: dict[str, set[str]] = {}
    for s in table:
        if s.layer_path is not None:
            layer_paths.setdefault(s.stack, set()).add(s.layer_path)
    roots = {}
    for stack, paths in layer_paths.items():
        others = {p for k, ps in layer_paths.items() if k != stack for p in ps}
        parts = next(iter(paths)).split(".")
        # longest common prefix of this stack's layer paths
        common = parts
        for p in paths:
            q = p.split(".")
            i = 0
            while i < min(len(common), len(q)) and common[i] == q[i]:
                i += 1
            common = common[:i]
        root = ".".join(common)
        while True:
            parent = ".".join(root.split(".")[:-1]) if root else None
            if parent is None or any(_under(o, parent) for o in others):
                break
            root = parent
        if root and root.split(".")[-1].isdigit():
            root = ".".join(root.split(".")[:-1])
        roots[stack] = root
    return roots


def match_modules(sel: Selector, table: SiteTable, model: nn.Module) -> list[str]:
    """Module paths selected by a `trainable` selector (stack/layers/block/role scope, then type/path filters)."""
    modules = dict(model.named_modules())
    scopes: list[str] | None = None
    if sel.role is not None or sel.block is not None or sel.layers is not None:
        # the site-level part of the selector scopes the search; type/path filters apply to modules below
        found = match_sites(sel.model_copy(update={"path_regex": None, "module_type": None, "norms": None}),
                            table, modules)
        if sel.role is not None:
            scopes = [s.path for s in found if s.path is not None]
        elif sel.block is not None:
            # a block's own module when it has one (not the whole layer, as for BART's FFN), else its projections
            scopes = sorted({s.block_path for s in found if s.block_path and s.block_path != s.layer_path}
                            | {s.path for s in found if s.path and s.role != "output"})
        else:
            scopes = sorted({s.layer_path for s in found if s.layer_path})
    elif sel.stack is not None:
        roots = stack_roots(table)
        scopes = [roots[k] for k in sel.stack if k in roots]
    path_re = compile_pattern(sel.path_regex) if sel.path_regex else None
    type_re = compile_pattern(sel.module_type) if sel.module_type else None
    norms = set(table.meta.get("norms") or ()) if sel.norms else None
    out = []
    for path, mod in modules.items():
        if scopes is not None and not any(_under(path, sc) for sc in scopes):
            continue
        if norms is not None and path not in norms:
            continue
        if path_re is not None and not path_re.search(path):
            continue
        if type_re is not None and not type_re.fullmatch(type(mod).__name__):
            continue
        if scopes is None and path_re is None and type_re is None and norms is None and path != "":
            continue  # an empty selector means the whole model (path "")
        out.append(path)
    return out
