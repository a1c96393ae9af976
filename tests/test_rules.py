"""Rule sets: validation errors name file, line and key; selectors; precedence; shipped sets load by name and path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vlpet_fx
from vlpet_fx.rules import parse_rules, resolve_layers
from vlpet_fx.zoo import build_model

GOOD = """name: t
methods:
  a: {type: adapter, reduction: 4}
rules:
  - name: r
    select: {stack: encoder, role: output}
    insert: a
"""


@pytest.mark.parametrize("text, line, needle", [
    (GOOD.replace("    insert: a", "    insert: a\n    colour: red"), 8, "unknown key 'colour'"),
    (GOOD.replace("stack: encoder", "stack: encodr"), 6, "rules[0].select.stack"),
    (GOOD.replace("reduction: 4", "reduction: lots"), 3, "reduction"),
    (GOOD.replace("reduction: 4", "reduce: 4"), 3, "has no parameter 'reduce'"),
    (GOOD.replace("type: adapter", "type: magic"), 3, "unknown PET method 'magic'"),
    (GOOD.replace("    insert: a", "    insert: b"), 7, "unknown method 'b'"),
    (GOOD.replace("role: output}", "role: output, layers: ['1-x']}"), 6, "bad layer range"),
    (GOOD.replace("  - name: r", "  - name: r\n    placement: sideways"), 6, "placement"),
    ("name: [unclosed", 1, "not valid YAML"),
    (GOOD.replace("name: t\n", "name: t\nextra: 1\n"), 2, "unknown key 'extra'"),
])
def test_rules_errors_name_file_line_and_key(tmp_path, text, line, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(vlpet_fx.RulesError) as info:
        vlpet_fx.load_rules(f)
    msg = str(info.value)
    assert msg.startswith(f"{f}:{line}:"), msg
    assert needle in msg, msg
    assert "\n" not in msg


def test_missing_rules_file_and_unknown_name():
    with pytest.raises(vlpet_fx.RulesError, match="does not exist"):
        vlpet_fx.load_rules("nowhere/rules.yaml")
    with pytest.raises(vlpet_fx.RulesError, match="unknown rule set 'nope'"):
        vlpet_fx.load_rules("nope")


def test_rule_matching_nothing_is_an_error_unless_optional():
    m = build_model("t5", "tiny")
    text = GOOD.replace("stack: encoder, role: output", "stack: visual, role: output")
    with pytest.raises(vlpet_fx.RulesError, match=r"<rules>:5: rule 'r' matches no site"):
        vlpet_fx.plan(m, parse_rules(text))
    optional = text.replace("    insert: a", "    insert: a\n    optional: true")
    # an optional rule that matches nothing is skipped and recorded; the other rules still place their modules
    p = vlpet_fx.plan(m, parse_rules(optional + GOOD.split("rules:\n", 1)[1].replace("name: r", "name: r2")))
    assert p.unmatched == ["r"] and {x.rule for x in p.placements} == {"r2"}
    assert len(p.placements) == sum(1 for s in p.table if s.stack == "encoder" and s.role == "output")
    # a plan in which nothing would train is refused in one line naming the rules that matched nothing
    with pytest.raises(vlpet_fx.RulesError) as info:
        vlpet_fx.plan(m, parse_rules(optional))
    msg = str(info.value)
    assert "rule set 't' trains nothing" in msg and "(r) are optional and matched no site" in msg, msg
    assert "\n" not in msg


def test_method_that_does_not_fit_the_site():
    m = build_model("t5", "tiny")
    with pytest.raises(vlpet_fx.RulesError, match="does not fit site"):
        vlpet_fx.plan(m, parse_rules(GOOD.replace("reduction: 4", "dim: 96, reduction: 4").replace(
            "type: adapter", "type: vlpet, heads: 5")))


def test_layers_selectors():
    assert resolve_layers([0, -1], 6) == {0, 5}
    assert resolve_layers(["-2:"], 6) == {4, 5}
    assert resolve_layers(["1:3"], 6) == {1, 2}
    assert resolve_layers(["1..3"], 6) == {1, 2, 3}
    assert resolve_layers(["all"], 3) == {0, 1, 2}
    m = build_model("t5", "small", device="meta")
    p = vlpet_fx.plan(m, parse_rules(GOOD.replace("role: output}", "role: output, layers: {encoder: [-2, -1]}}")))
    assert sorted({x.site.layer for x in p.placements}) == [4, 5]


def test_later_rules_win_and_skip_removes():
    m = build_model("bart", "tiny")
    text = """name: prec
methods:
  small: {type: adapter, dim: 4}
  big: {type: adapter, dim: 16}
rules:
  - {name: all, select: {stack: encoder, role: output}, insert: small}
  - {name: last, select: {stack: encoder, role: output, layers: [-1]}, insert: big}
  - {name: no-ffn0, select: {stack: encoder, block: ffn, layers: [0], role: output}, skip: true}
"""
    p = vlpet_fx.plan(m, parse_rules(text))
    got = {(x.site.layer, x.site.block): x.rule for x in p.placements}
    assert got == {(0, "self_attn"): "all", (1, "self_attn"): "last", (1, "ffn"): "last"}


def test_trainable_selectors():
    m = build_model("bart", "tiny")
    text = GOOD + """trainable:
  - {name: dec-ln, select: {stack: decoder, module_type: LayerNorm}}
  - {name: biases, select: {stack: encoder, block: ffn}, params: bias}
"""
    p = vlpet_fx.plan(m, parse_rules(text))
    names = set(p.trainable)
    assert "model.decoder.layers.0.encoder_attn_layer_norm.weight" in names
    assert not any(n.startswith("model.encoder.") and "norm" in n for n in names)
    assert "model.encoder.layers.1.fc1.bias" in names and "model.encoder.layers.1.fc1.weight" not in names
    with pytest.raises(vlpet_fx.RulesError, match="selects no parameters"):
        vlpet_fx.plan(m, parse_rules(GOOD + "trainable: [{select: {path_regex: nothing_here}}]"))


SHIPPED = ["vlpet_small", "vlpet_middlex", "vlpet_middley", "vlpet_large", "vl_adapter", "lora", "full_finetune"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_rule_sets_load_by_name_and_path(name):
    rs = vlpet_fx.load_rules(name)
    assert rs.name == name
    path = Path(__file__).resolve().parents[1] / "rules" / f"{name}.yaml"
    assert vlpet_fx.load_rules(str(path)).name == name


def test_user_registered_method_usable_in_rules():
    from dataclasses import dataclass

    import torch
    from torch import nn

    @dataclass
    class ScaleConfig(vlpet_fx.modules.MethodConfig):
        init: float = 1.0

    @vlpet_fx.register_pet("test-scale")
    class Scale(vlpet_fx.PetModule):
        config_class = ScaleConfig

        def __init__(self, in_features, out_features, config, placement="after"):
            super().__init__(in_features, out_features, config, placement)
            self.s = nn.Parameter(torch.full((out_features,), config.init))

        def after(self, y):
            return y * self.s

    m = build_model("t5", "tiny").requires_grad_(False)  # frozen weights take the same kernels as after patching
    ids = torch.randint(3, 256, (2, 8))
    before = m(input_ids=ids, decoder_input_ids=ids[:, :3]).logits
    vlpet_fx.patch(m, parse_rules("name: u\nrules: [{select: {block: ffn, role: out}, insert: test-scale}]"))
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 4 * 64
    assert torch.equal(before, m(input_ids=ids, decoder_input_ids=ids[:, :3]).logits)


def test_projector_only_trains_the_projector_alone():
    from vlpet_fx.vl import build_vl

    model = build_vl("t5", "tiny", visual="clip-vit-b-32", visual_size="tiny", vocab_size=300)
    pixels = torch.rand(2, 1, 3, 32, 32)  # [batch, images, C, H, W]
    ids = torch.randint(3, 300, (2, 5))
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, labels=ids).logits
    vlpet_fx.patch(model, "projector_only")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("visual_projection.") for n in trainable)
    assert trainable == {n for n, _ in model.visual_projection.named_parameters(prefix="visual_projection")}
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, labels=ids).logits, before)
    with pytest.raises(vlpet_fx.RulesError, match="visual-projector"):  # a text-only model has no projector
        vlpet_fx.patch(build_model("t5", "tiny"), "projector_only")
