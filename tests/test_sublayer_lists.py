"""A decoder layer whose sub-layers sit in lists inside it (LongCat-Flash: ``self_attn = ModuleList([a, a])``,
``norms = ModuleList([n, n])``): the tie-break names each list element a layer container, while the block input
X enters a norm beside it, in the real layer (discover.input_path_of's fallback to the residual add's module)."""

import pytest
import torch
from torch import nn

import vlpet_fx
from toy_branches import Attention, GatedExpert

D = 32


class TwinLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleList(Attention(D) for _ in range(2))
        self.mlps = nn.ModuleList(GatedExpert(D, 48) for _ in range(2))
        self.attn_norm = nn.ModuleList(nn.LayerNorm(D) for _ in range(2))
        self.mlp_norm = nn.ModuleList(nn.LayerNorm(D) for _ in range(2))

    def forward(self, x):
        for i in range(2):
            x = x + self.attn[i](self.attn_norm[i](x))
            x = x + self.mlps[i](self.mlp_norm[i](x))
        return x


class TwinLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, D)
        self.layers = nn.ModuleList(TwinLayer() for _ in range(2))
        self.head = nn.Linear(D, 50, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


@pytest.fixture(scope="module")
def table():
    torch.manual_seed(0)
    model = TwinLM().eval()
    return vlpet_fx.discover(model, (torch.randint(0, 50, (2, 6)),), fast=False)


def test_block_input_is_the_norm_beside_the_sub_layer_list(table):
    got = {(s.path, s.input_path) for s in table.where(role="output")}
    # the outermost module that takes X first and did not make it: the layer itself for its first sub-layer
    want = {(f"layers.{n}.{kind}.{i}", f"layers.{n}" if (kind, i) == ("attn", 0) else f"layers.{n}.{norm}.{i}")
            for n in range(2) for i in range(2) for kind, norm in (("attn", "attn_norm"), ("mlps", "mlp_norm"))}
    assert got == want


def test_eager_and_graph_back_ends_agree_on_gates_reading_x(table):
    """VL-PET's gates read X: the eager pre-hook (input_path) and the graph (input_node) must hand the same X."""
    torch.manual_seed(0)
    model = TwinLM().eval()
    ids = torch.randint(0, 50, (2, 6))
    rules = vlpet_fx.rules.parse_rules(
        "name: gates\n"
        "methods: {v: {type: vlpet, dim: 4, heads: 1, gate: large, gate_dim: 4, init: normal, zero_init_up: false}}\n"
        "rules: [{name: all, select: {block: [self_attn, ffn], role: output}, insert: v, placement: after}]\n",
        source="gates")
    plan = vlpet_fx.plan(model, rules, table=table)
    graph = vlpet_fx.patch_graph(model, plan, example_inputs=(ids,))
    with torch.no_grad():
        base = model(ids)
    vlpet_fx.patch(model, plan)  # both back ends build the same PET weights (same seed); up is not zero
    with torch.no_grad():
        eager = model(ids)
        assert (eager - base).abs().max() > 1e-3  # the modules do change the output (so X matters)
        torch.testing.assert_close(graph(ids), eager, rtol=1e-5, atol=1e-5)
