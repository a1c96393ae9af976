"""A picture of a site table: one column per stack, one row per layer, one box per block, one dot per
site (filled when a rule set hits it). Plain SVG, no dependencies; ``html`` wraps the same picture."""

from __future__ import annotations

from html import escape

from ..analysis.sites import BLOCKS, ROLES, SiteTable

COLORS = {"self_attn": "#4C78A8", "cross_attn": "#F58518", "mixer": "#B279A2", "ffn": "#54A24B"}
BOX_W, BOX_H, GAP, ROW_H, COL_GAP, DOT = 150, 22, 6, 34, 40, 8


def render_svg(table: SiteTable, hits: set[tuple] | None = None, title: str | None = None) -> str:
    """Return an SVG document; ``hits`` holds ``Site.key`` tuples to mark as selected."""
    hits = hits or set()
    stacks = table.stacks()
    layers = table.num_layers()
    block_kinds = {k: [b for b in BLOCKS if any(s.block == b for s in table.where(stack=k))] for k in stacks}
    col_w = {k: max(1, len(block_kinds[k])) * (BOX_W + GAP) for k in stacks}
    width = 20 + sum(col_w.values()) + COL_GAP * max(0, len(stacks) - 1) + 20
    height = 70 + max(layers.values(), default=1) * ROW_H + 40
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="20" y="22" font-size="15" font-weight="bold">{escape(title or table.model)}</text>',
    ]
    x0 = 20
    for k in stacks:
        out.append(f'<text x="{x0}" y="48" font-size="13" font-weight="bold">{k} ({layers[k]} layers)</text>')
        for layer in range(layers[k]):
            y = 60 + layer * ROW_H
            for bi, block in enumerate(block_kinds[k]):
                sites = [s for s in table.where(stack=k, layer=layer, block=block)]
                if not sites:
                    continue
                x = x0 + bi * (BOX_W + GAP)
                out.append(
                    f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="4" fill="{COLORS[block]}" '
                    f'fill-opacity="0.18" stroke="{COLORS[block]}"><title>{escape(k)} layer {layer} {block}</title></rect>'
                )
                out.append(f'<text x="{x + 4}" y="{y + 15}">{layer}·{block}</text>')
                for si, site in enumerate(sorted(sites, key=lambda s: ROLES.index(s.role))):
                    cx = x + 78 + si * (DOT + 3)
                    fill = COLORS[block] if site.key in hits else "white"
                    tip = escape(f"{site.role}: {site.path or site.param} {site.in_features}->{site.out_features}")
                    out.append(
                        f'<circle cx="{cx + DOT / 2}" cy="{y + BOX_H / 2}" r="{DOT / 2}" fill="{fill}" '
                        f'stroke="{COLORS[block]}"><title>{tip}</title></circle>'
                    )
        x0 += col_w[k] + COL_GAP
    ly = height - 18
    legend = "boxes: blocks (blue self-attention, orange cross-attention, green feed-forward); dots: sites q k v o / in out / output"
    if hits:
        legend += f"; filled dots: {len(hits)} sites selected by the rules"
    out.append(f'<text x="20" y="{ly}" fill="#444">{escape(legend)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def render_html(table: SiteTable, hits: set[tuple] | None = None, title: str | None = None) -> str:
    svg = render_svg(table, hits, title)
    name = escape(title or table.model)
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{name}</title></head><body>{svg}</body></html>\n"
