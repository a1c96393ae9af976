"""Widths relative to the site (issue 15, point 4): `dim: 1/8`, `{of_site: 0.125}`, `reduction: 8`,
`gate_dim: 1/6`, `rank: 1/3`, resolved per site by the planner and recorded as absolute widths.

Every expected width is computed here with exact integer arithmetic (``Fraction``), independently of the
library's float rounding: the nearest multiple m of features * p / q, halves up, at least m (m = N_h for
VL-PET's r, 1 otherwise).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from fractions import Fraction

import pytest
import torch

import vlpet_fx
from vlpet_fx.errors import RulesError
from vlpet_fx.export import load, read_manifest, save_patched
from vlpet_fx.modules.base import MAX_WIDTH, WIDTH_FACTOR, MethodConfigError, RelativeWidth, make_config, resolve_width
from vlpet_fx.modules.vlpet import VlPet
from vlpet_fx.rules import parse_rules
from vlpet_fx.zoo import base_reference, build_model


def nearest(features: int, frac: Fraction, m: int = 1) -> int:
    """The closed form, exactly: max(m, m * floor(features * frac / m + 1/2))."""
    q = features * frac / m
    return max(m, m * math.floor(q + Fraction(1, 2)))


# one method of each kind, each width relative, on sites whose features differ (d, and d_ff for the FFN's `out`)
RELATIVE = """name: rel
methods:
  pet: {type: vlpet, dim: 3/16, heads: 4, gate: large, gate_dim: 1/6}
  wide_in: {type: adapter, dim: {of_site: 0.3}}
  red: {type: adapter, reduction: 6}
  lo: {type: lora, rank: 1/3, alpha: 8}
  val: {type: vlpet, dim: {of_site: 0.125}, heads: 1, gate: none}
rules:
  - {name: pet, select: {stack: encoder, block: self_attn, role: output}, insert: pet}
  - {name: ffn-out, select: {stack: encoder, block: ffn, role: out}, insert: wide_in, placement: parallel}
  - {name: ffn-output, select: {stack: encoder, block: ffn, role: output}, insert: red}
  - {name: lora-ffn-in, select: {stack: decoder, block: ffn, role: in}, insert: lo, placement: parallel}
  - {name: value, select: {stack: decoder, block: cross_attn, role: v}, insert: val, placement: parallel}
"""


def expected(rule: str, site) -> dict:
    """Resolved widths and parameter count of one placement, from the site's shape alone."""
    i, o = site.in_features, site.out_features
    if rule == "pet":  # after: reads d = o; r a multiple of N_h = 4; r_g relative to the gate's d
        r, rg = nearest(o, Fraction(3, 16), 4), nearest(o, Fraction(1, 6))
        return {"dim": r, "gate_dim": rg, "params": (o * r + r) + (r * o + o) + (o * rg + rg) + (rg * o + o)}
    if rule == "ffn-out":  # parallel: reads the site's input (d_ff)
        r = nearest(i, Fraction(3, 10))
        return {"dim": r, "params": (i * r + r) + (r * o + o)}
    if rule == "ffn-output":  # reduction 6 = one sixth of what it reads
        r = nearest(o, Fraction(1, 6))
        return {"dim": r, "params": (o * r + r) + (r * o + o)}
    if rule == "lora-ffn-in":  # relative to min(in, out)
        r = nearest(min(i, o), Fraction(1, 3))
        return {"rank": r, "params": i * r + r * o}
    if rule == "value":
        r = nearest(i, Fraction(1, 8))
        return {"dim": r, "gate_dim": None, "params": (i * r + r) + (r * o + o)}
    raise AssertionError(rule)


@pytest.fixture(scope="module")
def t5_tables():
    """t5 small (d 512, d_ff 2048) and base (768, 3072) on the meta device: planning needs only shapes."""
    out = {}
    for size in ("small", "base"):
        model = build_model("t5", size, device="meta")
        out[size] = (model, vlpet_fx.discover(model))
    return out


@pytest.mark.parametrize("size", ["small", "base"])
def test_relative_widths_resolve_to_the_closed_form(t5_tables, size):
    model, table = t5_tables[size]
    plan = vlpet_fx.plan(model, parse_rules(RELATIVE), table=table)
    by_rule = plan.by_rule()
    assert set(by_rule) == {"pet", "ffn-out", "ffn-output", "lora-ffn-in", "value"}
    for rule, placements in by_rule.items():
        for p in placements:
            want = expected(rule, p.site)
            got = {k: getattr(p.config, k) for k in want if k != "params"}
            assert got == {k: v for k, v in want.items() if k != "params"}, (rule, p.site, got, want)
            assert all(isinstance(v, int) for v in got.values() if v is not None)  # recorded absolute
            assert p.params == want["params"], (rule, p.site)
    d = model.config.d_model
    ff = model.config.d_ff
    first = {rule: pls[0].config for rule, pls in by_rule.items()}
    # the figures themselves, for the record: t5 small 512/2048, t5 base 768/3072
    assert (first["pet"].dim, first["pet"].gate_dim, first["ffn-out"].dim, first["ffn-output"].dim,
            first["lora-ffn-in"].rank, first["value"].dim) == {
        (512, 2048): (96, 85, 614, 85, 171, 64), (768, 3072): (144, 128, 922, 128, 256, 96)}[(d, ff)]


def test_the_relative_paper_rule_sets_are_the_paper_on_base_shapes():
    """On the paper's d = 768 the relative rule sets plan exactly the published absolute widths."""
    for rel, absolute, family in (("vlpet_large_relative", "vlpet_large", "vl-bart"),
                                  ("vlpet_large_t5_relative", "vlpet_large_t5", "vl-t5")):
        model = build_model(family, "base", device="meta")
        table = vlpet_fx.discover(model)
        a, b = vlpet_fx.plan(model, rel, table=table), vlpet_fx.plan(model, absolute, table=table)
        assert [(p.site.key, p.params) for p in a.placements] == [(p.site.key, p.params) for p in b.placements]
        for p, q in zip(a.placements, b.placements):
            assert p.config == q.config  # the same resolved widths and every other setting
        assert a.trainable_params == b.trainable_params


def test_rounding_rule_at_its_edges():
    # halves go up; never below one; r of multi-head VL-PET the nearest multiple of N_h (at least N_h)
    assert resolve_width(RelativeWidth(0.5), 5, "w") == 3 == nearest(5, Fraction(1, 2))
    assert resolve_width(RelativeWidth(1 / 1024), 100, "w") == 1
    assert resolve_width(RelativeWidth(0.125), 100, "w", multiple=4) == 12 == nearest(100, Fraction(1, 8), 4)
    assert resolve_width(RelativeWidth(0.125), 112, "w", multiple=4) == 16 == nearest(112, Fraction(1, 8), 4)  # 14 -> 16
    assert resolve_width(RelativeWidth(0.01), 64, "w", multiple=4) == 4
    assert resolve_width(96, 768, "w") == 96  # an absolute width is kept
    for n in range(1, 200, 7):
        for p, q in ((1, 3), (3, 16), (5, 7), (1, 1)):
            for m in (1, 2, 4):
                assert resolve_width(RelativeWidth(p / q), n, "w", multiple=m) == nearest(n, Fraction(p, q), m)


def test_vlpet_config_resolves_relative_r_to_a_multiple_of_heads_and_builds_it():
    cfg = make_config("vlpet", {"dim": "1/8", "heads": 4, "gate": "large"})
    assert cfg.dim == RelativeWidth(0.125)
    mod = VlPet(100, 100, cfg)  # built directly (no plan): resolved the same way
    assert mod.config.dim == 12 and mod.down.weight.shape == (12, 100) and mod.gate.down.weight.shape == (12, 100)
    # an absolute r must still divide by N_h
    with pytest.raises(MethodConfigError, match="not divisible by heads=4"):
        VlPet.check_fits(64, 64, "after", make_config("vlpet", {"dim": 10, "heads": 4}))


# ---- bad values: refused while the rules are read, one line each ----------------------------------------

BAD = [
    ("dim: 0", "'dim': must be > 0"),
    ("dim: -8", "'dim': must be > 0"),
    ("dim: true", "'dim': Input should be a valid integer"),
    ("dim: 1.5", "'dim': Input should be a valid integer"),
    ("dim: '0/8'", "a fraction of the site in (0, 1]"),
    ("dim: '9/8'", "a fraction of the site in (0, 1], not 9/8"),
    ("dim: '1/0'", "a fraction of the site in (0, 1]"),
    ("dim: 'd/8'", "'d/8' is neither"),
    ("dim: '-1/8'", "is neither"),
    ("dim: {of_site: 0}", "a fraction of the site in (0, 1], not 0"),
    ("dim: {of_site: -0.5}", "a fraction of the site in (0, 1], not -0.5"),
    ("dim: {of_site: 1.5}", "not a bottleneck"),
    ("dim: {of_site: .nan}", "a fraction of the site in (0, 1], not nan"),
    ("dim: {of_site: .inf}", "a fraction of the site in (0, 1], not inf"),
    ("dim: {of_site: true}", "fraction is a number in (0, 1], not True"),
    ("dim: {of_site: '1/8'}", "fraction is a number in (0, 1], not '1/8'"),
    ("dim: {fraction: 0.1}", "the one key `of_site`, not 'fraction'"),
    ("dim: {}", "the one key `of_site`, which is missing"),
    ("dim: [8]", "'dim': Input should be a valid integer"),
    ("reduction: 0", "'reduction': must be > 0"),
    ("reduction: 0.5", "'reduction': must be >= 1"),
    ("reduction: .nan", "'reduction': Input should be a finite number"),
    ("gate_dim: '3/2'", "'gate_dim': a relative width is a fraction of the site in (0, 1]"),
    ("gate_dim: false", "'gate_dim': Input should be a valid integer"),
]


@pytest.mark.parametrize("param, phrase", BAD, ids=[b[0] for b in BAD])
def test_bad_relative_width_is_one_line(param, phrase):
    text = f"name: t\nmethods:\n  v: {{type: vlpet, heads: 4, gate: large, {param}}}\n"
    with pytest.raises(RulesError) as exc:
        parse_rules(text, "w.yaml")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("w.yaml:3: methods.v:"), msg
    assert phrase in msg, msg


@pytest.mark.parametrize("rank, phrase", [("0", "'rank': must be > 0"), ("'4/3'", "(0, 1]"), ("true", "valid integer"),
                                          ("{of_site: .nan}", "not nan"), ("-1", "'rank': must be > 0")])
def test_bad_relative_lora_rank_is_one_line(rank, phrase):
    with pytest.raises(RulesError) as exc:
        parse_rules(f"name: t\nmethods: {{lo: {{type: lora, rank: {rank}}}}}\n", "w.yaml")
    assert "\n" not in str(exc.value) and phrase in str(exc.value), str(exc.value)


def test_override_with_a_relative_width_and_a_bad_one(t5_tiny):
    model, table = t5_tiny
    base = "name: t\nmethods: {a: {type: adapter, dim: 4}}\nrules:\n  - {select: {stack: encoder, role: output}, insert: a"
    plan = vlpet_fx.plan(model, parse_rules(base + ", with: {dim: 1/4}}\n"), table=table)
    assert {p.config.dim for p in plan.placements} == {16}  # 64 / 4
    with pytest.raises(RulesError, match=r"rules\[0\]\.with: .*'dim': .*not 2.0"):
        vlpet_fx.plan(model, parse_rules(base + ", with: {dim: {of_site: 2.0}}}\n"), table=table)


# ---- the rule set's bounds still hold after resolution ------------------------------------------------------

def test_bounds_still_hold(t5_tiny):
    model, table = t5_tiny  # width 64: at most min(4 x 64, 65536) = 256
    head = "name: t\nmethods: {v: {type: vlpet, heads: 4, gate: large, "
    tail = "}}\nrules:\n  - {select: {stack: encoder, role: output}, insert: v}\n"
    with pytest.raises(RulesError, match="gate width \\(gate_dim\\) 257 is too wide for a site of 64 features: at "
                                         "most 256"):
        vlpet_fx.plan(model, parse_rules(head + "dim: 1/8, gate_dim: 257" + tail), table=table)
    with pytest.raises(RulesError, match="bottleneck width 257 is too wide .* at most 256"):
        vlpet_fx.plan(model, parse_rules(head.replace("heads: 4", "heads: 1") + "dim: 257, gate_dim: 1/8" + tail),
                      table=table)
    # the largest relative width, the whole site, is within the bound; heads may round it up past the site
    plan = vlpet_fx.plan(model, parse_rules(head + "dim: 1/1, gate_dim: {of_site: 1}" + tail), table=table)
    assert {(p.config.dim, p.config.gate_dim) for p in plan.placements} == {(64, 64)}
    # a huge site: the absolute cap (65,536) binds before 4 x features
    assert resolve_width(RelativeWidth(1.0), MAX_WIDTH, "w") == MAX_WIDTH
    with pytest.raises(MethodConfigError, match="at most 65536"):
        resolve_width(RelativeWidth(0.5), 2 * MAX_WIDTH + 2, "w")
    assert resolve_width(RelativeWidth(0.5), 2, "w", multiple=4) == 4  # rounded up to N_h: within 4 x 2
    with pytest.raises(MethodConfigError, match=f"at most {WIDTH_FACTOR * 2}"):
        resolve_width(RelativeWidth(0.5), 2, "w", multiple=12)  # 12 heads would need 12 > 4 x 2


@pytest.fixture(scope="module")
def t5_tiny():
    model = build_model("t5", "tiny")
    return model, vlpet_fx.discover(model)


# ---- recorded and reloaded as resolved widths -----------------------------------------------------------------

def test_manifest_records_resolved_widths_and_reloads_identically(t5_tiny, tmp_path):
    model, table = t5_tiny
    rules = parse_rules(RELATIVE, "rel.yaml")
    net = vlpet_fx.patch(build_model("t5", "tiny"), rules, seed=3).eval()
    with torch.no_grad():
        for n, p in net.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)  # trained-looking weights, so the reload is a real check
    out = save_patched(net, tmp_path / "run", base_reference("t5", "tiny", 0))
    man = read_manifest(out)
    detail = man["plan"]["placements_detail"]
    assert len(detail) == len(net.vlpet_patch.plan.placements) > 0
    sites = {s.key: s for s in table}
    for rec in detail:
        want = expected(rec["rule"], sites[rec["key"]])
        for k, v in want.items():
            if k == "params":
                assert rec["params"] == v
            else:
                assert rec["config"][k] == v and (v is None or type(v) is int), (rec["key"], k, rec["config"])
    # the rule set's own values stay as written (relative), the plan's are absolute
    assert man["methods"]["pet"]["dim"] == {"of_site": 3 / 16} and man["methods"]["lo"]["rank"] == {"of_site": 1 / 3}
    back = load(out).eval()  # re-planned from the stored rules text on the rebuilt base model
    again = [p.to_dict() for p in back.vlpet_patch.plan.placements]
    assert json.loads(json.dumps(again)) == detail
    ids = torch.randint(2, 200, (2, 7))
    with torch.no_grad():
        a = net(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
        b = back(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
    assert torch.equal(a, b)
    for name, p in back.named_parameters():
        if "pet_" in name:
            assert p.shape == dict(net.named_parameters())[name].shape


# ---- the demo's rule set: a paper-like trainable share on the demo's 64-wide VL-T5 -------------------------

def test_demo_rule_set_trains_a_paper_like_share():
    """`make demo` patches a VL-T5 of d = 64 (2 + 2 layers, tiny ViT tower, every patch token projected):
    the paper's absolute r = 96 trains far more than the paper's 4.16 %, r = d/8 stays under 10 %."""
    from vlpet_fx.vl import build_vl

    share = {}
    for rules in ("vlpet_large", "vlpet_large_relative"):
        model = build_vl("t5", "tiny")
        vlpet_fx.patch(model, rules)
        share[rules] = vlpet_fx.summary(model).percent
    assert share["vlpet_large_relative"] <= 10.0 < share["vlpet_large"], share


def test_cli_refuses_a_bad_relative_width_in_one_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("name: t\nmethods: {a: {type: adapter, dim: '3/2'}}\n"
                 "rules:\n  - {select: {stack: encoder, role: output}, insert: a}\n")
    r = subprocess.run([sys.executable, "-m", "vlpet_fx.cli.main", "patch", "t5", "--rules", str(f), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
    assert len(lines) == 1 and "(0, 1]" in lines[0] and "bad.yaml:2" in lines[0], lines
    assert not (tmp_path / "o").exists()
