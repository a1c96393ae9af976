"""Stacks without attention (SSM, recurrence): causality read from behaviour, LoRA on the mixers' projections.

Toys: token ids -> embedding -> two residual layers ``x + out(mix(in(norm(x))))`` whose token mixing is a
cumulative sum over the tokens, forwards (causal: a decoder) or backwards (each position sees the later ones: an
encoder). Families (slow): Mamba and RWKV from their tiny configs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vlpet_fx
from vlpet_fx.rules import parse_rules

D, T, V = 32, 6, 50


class Mixer(nn.Module):
    def __init__(self, reverse: bool):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.in_proj = nn.Linear(D, 2 * D)
        self.out_proj = nn.Linear(D, D)
        self.reverse = reverse

    def forward(self, x):
        h, g = self.in_proj(self.norm(x)).chunk(2, dim=-1)
        if self.reverse:
            h = h.flip(1).cumsum(1).flip(1)
        else:
            h = h.cumsum(1)
        return self.out_proj(h * torch.sigmoid(g))


class Layer(nn.Module):
    def __init__(self, reverse: bool):
        super().__init__()
        self.mixer = Mixer(reverse)

    def forward(self, x):
        return x + self.mixer(x)


class ToyRecurrentLM(nn.Module):
    def __init__(self, reverse: bool = False):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.layers = nn.ModuleList([Layer(reverse) for _ in range(2)])
        self.head = nn.Linear(D, V)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)

    def example_inputs(self):
        return (torch.arange(2 * T).reshape(2, T) % V,)


def _stacks(model) -> dict:
    return vlpet_fx.discover(model, model.example_inputs()).num_layers()


def test_forward_scan_is_a_decoder_backward_scan_an_encoder():
    torch.manual_seed(0)
    assert _stacks(ToyRecurrentLM(reverse=False)) == {"decoder": 2}
    assert _stacks(ToyRecurrentLM(reverse=True)) == {"encoder": 2}


def test_the_behaviour_agrees_with_the_model():
    """The toy's own outputs: positions before the changed token are unchanged only in the forward scan."""
    torch.manual_seed(0)
    for reverse in (False, True):
        m = ToyRecurrentLM(reverse).eval()
        ids = m.example_inputs()[0]
        other = ids.clone()
        other[:, T // 2] = (other[:, T // 2] + 1) % V
        with torch.no_grad():
            same = torch.equal(m(ids)[:, : T // 2], m(other)[:, : T // 2])
        assert same is (not reverse)


def test_meta_device_gives_the_same_stacks():
    """The verdict does not read the weights (seeded random parameters): a model without data agrees."""
    with torch.device("meta"):
        m = ToyRecurrentLM(reverse=False)
    ids = torch.arange(2 * T, device="meta").reshape(2, T)
    assert vlpet_fx.discover(m, (ids,)).num_layers() == {"decoder": 2}


def test_shipped_lora_on_a_model_made_of_mixers():
    """`lora` places rank-r updates parallel to every mixer's in and out projections; at init (B = 0) the
    outputs are the unpatched model's; the count is r * (in + out) per projection."""
    torch.manual_seed(0)
    model = ToyRecurrentLM().eval()
    rules = parse_rules(
        "name: lora-small\nmethods: {lora: {type: lora, rank: 4, alpha: 8, dropout: 0.0}}\n"
        "rules:\n"
        "  - {name: attention-qv, select: {stack: [encoder, decoder], block: [self_attn, cross_attn], role: [q, v]},"
        " insert: lora, placement: parallel, optional: true}\n"
        "  - {name: mixer-in-out, select: {stack: [encoder, decoder], block: mixer, role: [in, out]},"
        " insert: lora, placement: parallel, optional: true}\n", source="t")
    plan = vlpet_fx.plan(model, rules, example_inputs=model.example_inputs())
    paths = sorted(p.site.path for p in plan.placements)
    assert paths == sorted(f"layers.{i}.mixer.{n}" for i in range(2) for n in ("in_proj", "out_proj"))
    assert plan.pet_params == 2 * (4 * (D + 2 * D) + 4 * (D + D))
    assert plan.unmatched == ["attention-qv"]
    ids = model.example_inputs()[0]
    with torch.no_grad():
        before = model(ids)
    vlpet_fx.patch(model, plan)
    with torch.no_grad():
        assert torch.allclose(model(ids), before, atol=1e-6)


def test_shipped_lora_text_has_both_rules_optional():
    from vlpet_fx.rules import load_rules

    rs = load_rules("lora")
    assert [(r.name, r.optional) for r in rs.rules] == [("attention-qv", True), ("mixer-in-out", True)]


def test_causal_lm_rules_on_a_model_made_of_mixers():
    """vlpet_causal_lm: a module after every mixer; the FFN and value rules have nothing to place."""
    torch.manual_seed(0)
    model = ToyRecurrentLM().eval()
    plan = vlpet_fx.plan(model, "vlpet_causal_lm", example_inputs=model.example_inputs())
    assert [p.site.key for p in plan.placements] == ["decoder.0.mixer.output", "decoder.1.mixer.output"]
    assert plan.unmatched == ["decoder-ffn", "decoder-self-attn-value"]
    vlpet_fx.patch(model, plan)
    out = model(*model.example_inputs())
    out.sum().backward()


transformers = pytest.importorskip("transformers")


def _family(model_type: str):
    from vlpet_fx.zoo.tiny import tiny_config

    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()


@pytest.mark.slow
def test_mamba_is_a_decoder_and_lora_is_identity_at_init():
    model = _family("mamba")
    table = vlpet_fx.discover(model, name="mamba")
    assert table.num_layers() == {"decoder": model.config.num_hidden_layers}
    from vlpet_fx.rules import load_rules

    plan = vlpet_fx.plan(model, load_rules("lora"), table=table)  # the mixer rule's rank is relative: it fits
    assert {p.site.role for p in plan.placements} == {"in", "out"}
    assert len(plan.placements) == 2 * model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    patched = copy.deepcopy(model)
    vlpet_fx.patch(patched, plan)
    with torch.no_grad():
        assert torch.allclose(patched(input_ids=ids).logits, before, atol=1e-5)


@pytest.mark.slow
def test_rwkv_time_mixing_is_a_mixer_with_its_output_projection():
    """RWKV's recurrence writes each step into a buffer in place and its output weight is rescaled in a no-grad
    block: the mixer holds key/value/receptance as inputs and `output` as its out projection."""
    model = _family("rwkv")
    table = vlpet_fx.discover(model, name="rwkv")
    assert table.num_layers() == {"decoder": model.config.num_hidden_layers}
    mixer = {s.role: s.path for s in table.where(stack="decoder", layer=0, block="mixer")}
    assert mixer["out"] == "rwkv.blocks.0.attention.output"
    ins = sorted(s.path for s in table.where(stack="decoder", layer=0, block="mixer", role="in"))
    assert ins == [f"rwkv.blocks.0.attention.{n}" for n in ("key", "receptance", "value")]
