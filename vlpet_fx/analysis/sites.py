"""Sites: the places where a PET module can be inserted, as a table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable, Iterator

STACKS = ("visual", "encoder", "decoder")
BLOCKS = ("self_attn", "cross_attn", "mixer", "ffn")
ROLES = ("q", "k", "v", "o", "in", "gate", "up", "out", "output")
PUBLIC_FIELDS = ("key", "stack", "layer", "block", "role", "path", "in_features", "out_features", "out_slice")


def slice_text(out_slice: tuple[int, ...] | None) -> str:
    """``[a:b]`` for one range of output channels, ``[a:b/p×n]`` for a range in each of n blocks of p channels."""
    if not out_slice:
        return ""
    a, b = out_slice[0], out_slice[1]
    return f"[{a}:{b}]" if len(out_slice) == 2 else f"[{a}:{b}/{out_slice[2]}x{out_slice[3]}]"


def slice_channels(out_slice: tuple[int, ...]) -> list[int]:
    """The output channels an ``out_slice`` names, in order."""
    a, b = out_slice[0], out_slice[1]
    if len(out_slice) == 2:
        return list(range(a, b))
    period, count = out_slice[2], out_slice[3]
    return [j * period + c for j in range(count) for c in range(a, b)]


@dataclass(frozen=True)
class Site:
    """One insertion site. ``key`` and the fields up to ``out_slice`` are the public (JSON) contract.

    ``key`` is the site's one identity (unique in its table, stable between the fast and the full capture):
    ``stack.layer.block.role``, qualified with ``@path`` (or ``@<param>``) and the slice only when two sites
    would otherwise share it. ``out_slice`` is ``None`` when the site is the whole output of ``path``; for one
    of q, k, v made by a fused (packed) projection it names the output channels: ``(start, stop)``, or
    ``(start, stop, period, count)`` for ``start:stop`` in each of ``count`` blocks of ``period`` channels
    (per-head packing). ``out_features`` is then the slice's width.
    """

    stack: str
    layer: int
    block: str
    role: str
    path: str | None
    in_features: int
    out_features: int
    out_slice: tuple[int, ...] | None = None
    key: str = field(default="", compare=False)
    # where the site lives in the captured graph and the model (not part of the JSON contract)
    node: str | None = field(default=None, compare=False)
    param: str | None = field(default=None, compare=False)
    block_path: str | None = field(default=None, compare=False)
    layer_path: str | None = field(default=None, compare=False)
    input_path: str | None = field(default=None, compare=False)  # module whose first input is the block input X
    input_node: str | None = field(default=None, compare=False)  # graph node of the block input X
    x_node: str | None = field(default=None, compare=False)  # graph node of the projection's input x

    @property
    def base_key(self) -> str:
        return f"{self.stack}.{self.layer}.{self.block}.{self.role}"

    def public(self) -> dict:
        d = asdict(self)
        out = {k: d[k] for k in PUBLIC_FIELDS}
        out["out_slice"] = list(self.out_slice) if self.out_slice else None
        return out

    def __str__(self) -> str:
        where = self.path if self.path is not None else f"<{self.param or 'slice'}>"
        shape = f"{self.in_features}->{self.out_features}"
        return f"{self.key or self.base_key} ({where}{slice_text(self.out_slice)}: {shape})"


def assign_keys(sites: Iterable[Site]) -> list[Site]:
    """Give every site its unique ``key`` (see :class:`Site`); deterministic for a given set of sites."""
    sites = sorted(sites, key=_sort_key)
    base: dict[str, int] = {}
    for s in sites:
        base[s.base_key] = base.get(s.base_key, 0) + 1
    keys = []
    for s in sites:
        k = s.base_key
        if base[k] > 1:
            where = s.path if s.path is not None else f"<{s.param}>" if s.param else ""
            k = f"{k}@{where}{slice_text(s.out_slice)}"
        keys.append(k)
    seen: dict[str, int] = {}
    for k in keys:
        seen[k] = seen.get(k, 0) + 1
    counter: dict[str, int] = {}
    out = []
    for s, k in zip(sites, keys):
        if seen[k] > 1:  # still shared (two path-less sites in one block): number them in table order
            counter[k] = counter.get(k, 0) + 1
            k = f"{k}#{counter[k]}"
        out.append(replace(s, key=k))
    return out


def _sort_key(s: Site) -> tuple:
    return (
        STACKS.index(s.stack) if s.stack in STACKS else 99,
        s.layer,
        BLOCKS.index(s.block) if s.block in BLOCKS else 99,
        ROLES.index(s.role) if s.role in ROLES else 99,
        s.path or "",
        s.out_slice or (),
    )


class SiteTable:
    """An ordered, immutable collection of :class:`Site` with simple queries."""

    def __init__(self, sites: Iterable[Site], *, model: str = "", total_params: int = 0, meta: dict | None = None):
        sites = list(sites)
        if any(not s.key for s in sites):
            if not all(not s.key for s in sites):
                raise ValueError("SiteTable: either every site has a key or none (then the table assigns them)")
            sites = assign_keys(sites)
        self.sites: tuple[Site, ...] = tuple(sorted(sites, key=_sort_key))
        self._by_key = {s.key: s for s in self.sites}
        if len(self._by_key) != len(self.sites):
            dup = next(s.key for s in self.sites if sum(t.key == s.key for t in self.sites) > 1)
            raise ValueError(f"SiteTable: two sites share the key '{dup}'")
        self.model = model
        self.total_params = total_params
        self.meta = dict(meta or {})

    def __iter__(self) -> Iterator[Site]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def __getitem__(self, i: "int | str") -> Site:
        """``table[i]`` by position, ``table["encoder.0.ffn.gate"]`` by key."""
        if isinstance(i, str):
            if i not in self._by_key:
                raise KeyError(f"no site with key '{i}' in {self.model or 'this table'}")
            return self._by_key[i]
        return self.sites[i]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._by_key

    def keys(self) -> list[str]:
        return [s.key for s in self.sites]

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.num_layers().items())
        return f"SiteTable({len(self)} sites; layers: {counts})"

    def where(self, **conditions) -> "SiteTable":
        """Sites whose fields equal the given values (a value may also be a set/tuple/list of values)."""

        def ok(s: Site) -> bool:
            for k, v in conditions.items():
                have = getattr(s, k)
                if isinstance(v, (set, frozenset, tuple, list)):
                    if have not in v:
                        return False
                elif have != v:
                    return False
            return True

        return SiteTable([s for s in self.sites if ok(s)], model=self.model, total_params=self.total_params, meta=self.meta)

    def stacks(self) -> list[str]:
        return sorted({s.stack for s in self.sites}, key=lambda k: STACKS.index(k) if k in STACKS else 99)

    def num_layers(self) -> dict[str, int]:
        return {k: len({s.layer for s in self.sites if s.stack == k}) for k in self.stacks()}

    def blocks(self) -> list[tuple[str, int, str]]:
        seen: dict[tuple[str, int, str], None] = {}
        for s in self.sites:
            seen.setdefault((s.stack, s.layer, s.block), None)
        return list(seen)

    def get(self, stack: str, layer: int, block: str, role: str) -> Site:
        """The one site at ``stack.layer.block.role``; a ``KeyError`` if there is none or several (then look
        one up by its key, ``table[key]``)."""
        found = [s for s in self.sites if (s.stack, s.layer, s.block, s.role) == (stack, layer, block, role)]
        if not found:
            raise KeyError(f"no site {stack}.{layer}.{block}.{role}")
        if len(found) > 1:
            raise KeyError(f"{len(found)} sites are {stack}.{layer}.{block}.{role} "
                           f"({', '.join(s.key for s in found)}): look one up by its key, table[key]")
        return found[0]

    def to_dict(self) -> dict:
        # base_params: the model's parameters before any patch (docs/CLI.md, "Field names")
        return {"model": self.model, "base_params": self.total_params, "sites": [s.public() for s in self.sites]}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)
