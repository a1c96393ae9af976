"""An attention whose output projection works per group of heads (a block-diagonal weight in a batched matrix
product, as DeepSeek-V4's grouped output projection), the groups then flattened and mixed by a second projection,
in a layer with a weighted residual (no plain ``x + f(x)`` add after the attention): the attention's ``output``
site is the mixing projection's value, which the attention module returns, at its width; both projections are
``o`` sites. Before, the output site was the flattened groups (wider than the per-group projection's width it
was given: a site no back end could patch)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import vlpet_fx
from vlpet_fx.rules import parse_rules

from patched_checks import graph_agrees, perturb, pets

D, H, G = 16, 4, 2  # model width, heads, groups of heads
R = 6  # output width of each group's projection


class GroupedLinear(nn.Linear):
    """One (R, D/G) block of the weight per group: (B, S, G, D/G) -> (B, S, G, R) by one batched product."""

    def __init__(self):
        super().__init__(D // G, R * G, bias=False)

    def forward(self, x):
        lead = x.shape[:-2]
        w = self.weight.view(G, R, -1).transpose(1, 2)
        y = torch.bmm(x.reshape(-1, G, x.shape[-1]).transpose(0, 1), w).transpose(0, 1)
        return y.reshape(*lead, G, R)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(D, D) for _ in range(3))
        self.o_a = GroupedLinear()
        self.o_b = nn.Linear(G * R, D)

    def forward(self, x, after=lambda y: y):
        b, s, _ = x.shape

        def heads(t):
            return t.view(b, s, H, D // H).transpose(1, 2)

        a = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), is_causal=True)
        return after(self.o_b(self.o_a(a.transpose(1, 2).reshape(b, s, G, D // G)).flatten(2)))


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = Attention()
        self.ffn = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        self.mix = nn.Parameter(torch.tensor([1.0, 0.5]))

    def forward(self, x, after=lambda y: y):
        x = self.mix[0] * x + self.mix[1] * self.attn(self.norm(x), after)  # weighted: no plain residual add
        return x + self.ffn(self.norm2(x))


class GroupedOutputLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, D)
        self.layers = nn.ModuleList(Layer() for _ in range(2))

    def forward(self, ids, pet_of=None):
        x = self.emb(ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, pet_of(i) if pet_of else (lambda y: y))
        return x


@pytest.fixture(scope="module")
def grouped():
    torch.manual_seed(0)
    model = GroupedOutputLM().eval()
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    cap = vlpet_fx.capture(model, (ids,))
    return model, ids, vlpet_fx.discover(model, captured=cap), cap


def test_the_output_is_the_mixing_projections_value_at_its_width(grouped):
    _, _, table, cap = grouped
    nodes = {n.name: n for n in cap.graph.nodes}
    for layer in range(2):
        os = table.where(layer=layer, block="self_attn", role="o")
        assert [(s.path, s.in_features, s.out_features) for s in os] == [
            (f"layers.{layer}.attn.o_a", D // G, R), (f"layers.{layer}.attn.o_b", G * R, D)]
        out = table.get("decoder", layer, "self_attn", "output")
        assert (out.path, out.in_features, out.out_features) == (f"layers.{layer}.attn", D, D)
        assert out.node == os[1].node  # the mixing projection's value, which the attention returns
        assert nodes[out.node].meta["val"].shape[-1] == out.out_features


@pytest.mark.parametrize("method", ["{type: adapter, reduction: 4}",
                                    "{type: vlpet, dim: 4, heads: 1, gate: large, gate_dim: 4}"])
def test_a_module_on_the_output_matches_a_hand_computation_and_the_graph(grouped, method):
    """An adapter, and VL-PET with its large gate reading the block input X: eager = graph = by hand."""
    model, ids, table, _ = grouped
    rules = parse_rules(f"name: a\nmethods: {{a: {method}}}\n"
                        "rules: [{select: {block: self_attn, role: output}, insert: a, placement: after}]")
    eager = vlpet_fx.patch(copy.deepcopy(model), rules, table=table)
    perturb(eager)
    mods = pets(eager)
    assert sorted(mods) == ["decoder.0.self_attn.output", "decoder.1.self_attn.output"]
    got = eager(ids)
    if "gate" not in method:  # the adapter by hand (VL-PET's gate reads X: compared with the graph only)
        assert torch.allclose(got, model(ids, lambda i: mods[f"decoder.{i}.self_attn.output"].after), atol=1e-6)
    assert not torch.allclose(got, model(ids), atol=1e-3)
    graph_agrees(model, rules, eager, got, (ids,))
