"""Sites: the places where a PET module can be inserted, as a table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator

STACKS = ("visual", "encoder", "decoder")
BLOCKS = ("self_attn", "cross_attn", "ffn")
ROLES = ("q", "k", "v", "o", "in", "out", "output")
PUBLIC_FIELDS = ("stack", "layer", "block", "role", "path", "in_features", "out_features")


@dataclass(frozen=True)
class Site:
    """One insertion site. The first seven fields are the public (JSON) contract."""

    stack: str
    layer: int
    block: str
    role: str
    path: str | None
    in_features: int
    out_features: int
    # where the site lives in the captured graph and the model (not part of the JSON contract)
    node: str | None = field(default=None, compare=False)
    param: str | None = field(default=None, compare=False)
    block_path: str | None = field(default=None, compare=False)
    layer_path: str | None = field(default=None, compare=False)
    input_path: str | None = field(default=None, compare=False)  # module whose first input is the block input X
    input_node: str | None = field(default=None, compare=False)  # graph node of the block input X

    @property
    def key(self) -> tuple:
        return (self.stack, self.layer, self.block, self.role, self.path)

    def public(self) -> dict:
        d = asdict(self)
        return {k: d[k] for k in PUBLIC_FIELDS}

    def __str__(self) -> str:
        where = self.path if self.path is not None else f"<{self.param or 'slice'}>"
        return f"{self.stack}.{self.layer}.{self.block}.{self.role} ({where}: {self.in_features}->{self.out_features})"


def _sort_key(s: Site) -> tuple:
    return (
        STACKS.index(s.stack) if s.stack in STACKS else 99,
        s.layer,
        BLOCKS.index(s.block) if s.block in BLOCKS else 99,
        ROLES.index(s.role) if s.role in ROLES else 99,
        s.path or "",
    )


class SiteTable:
    """An ordered, immutable collection of :class:`Site` with simple queries."""

    def __init__(self, sites: Iterable[Site], *, model: str = "", total_params: int = 0, meta: dict | None = None):
        self.sites: tuple[Site, ...] = tuple(sorted(sites, key=_sort_key))
        self.model = model
        self.total_params = total_params
        self.meta = dict(meta or {})

    def __iter__(self) -> Iterator[Site]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def __getitem__(self, i: int) -> Site:
        return self.sites[i]

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
        found = [s for s in self.sites if (s.stack, s.layer, s.block, s.role) == (stack, layer, block, role)]
        if not found:
            raise KeyError(f"no site {stack}.{layer}.{block}.{role}")
        return found[0]

    def to_dict(self) -> dict:
        # base_params: the model's parameters before any patch (docs/CLI.md, "Field names")
        return {"model": self.model, "base_params": self.total_params, "sites": [s.public() for s in self.sites]}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)
