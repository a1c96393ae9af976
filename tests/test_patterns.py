"""The pattern registry: every built-in pattern on a hand-written module, and a user-registered one.

Expectations come from how the toy modules are written (which parameter makes q, which projection passes the
activation), never from running discovery.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vlpet_fx
from toy_patterns import build
from vlpet_fx.analysis import patterns
from vlpet_fx.analysis.dataflow import Dataflow, slice_of, WHOLE
from vlpet_fx.rules import parse_rules


def _flow(model, inputs):
    return Dataflow(vlpet_fx.capture(model, inputs))


# ---- projections -------------------------------------------------------------------------------------------

class AllProjections(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 6)
        self.w_mm = nn.Parameter(torch.randn(8, 5))
        self.w_addmm = nn.Parameter(torch.randn(8, 4))
        self.b_addmm = nn.Parameter(torch.zeros(4))
        self.w_einsum = nn.Parameter(torch.randn(3, 8))  # (out, in), used as "bnd,od->bno"
        self.w_bad = nn.Parameter(torch.randn(8, 2, 3))   # two free weight axes: not a projection

    def forward(self, x):
        flat = x.reshape(-1, 8)
        return (self.lin(x), torch.mm(flat, self.w_mm), torch.addmm(self.b_addmm, flat, self.w_addmm),
                torch.einsum("bnd,od->bno", x, self.w_einsum), torch.einsum("bnd,dhe->bnhe", x, self.w_bad))


@pytest.fixture(scope="module")
def projections():
    flow = _flow(AllProjections(), (torch.randn(2, 3, 8),))
    return {p.param: p for p in flow.projections.values()}


@pytest.mark.parametrize("param, pattern, features", [
    ("lin.weight", "linear", (8, 6)),
    ("w_mm", "matmul", (8, 5)),
    ("w_addmm", "addmm", (8, 4)),          # HF Conv1D: addmm(bias, x, W) with W (in, out)
    ("w_einsum", "einsum", (8, 3)),
])
def test_projection_patterns(projections, param, pattern, features):
    p = projections[param]
    assert p.pattern == pattern
    assert (p.in_features, p.out_features) == features
    assert p.x.meta["val"].shape[-1] == 8  # the activation operand, never the weight or the bias


def test_einsum_with_two_free_weight_axes_is_not_a_projection(projections):
    assert "w_bad" not in projections


# ---- attention products and cores --------------------------------------------------------------------------

def _core_params(kind: str) -> list[tuple[str, dict[str, str]]]:
    m = build(kind, depth=1)
    flow = _flow(m, m.example_inputs())
    out = []
    for core in flow.cores():
        roles = {r: flow.projection_into(v).param for r, v in (("q", core.q), ("k", core.k), ("v", core.v))}
        out.append((core.pattern, roles))
    return out


@pytest.mark.parametrize("kind, pattern, q, k, v", [
    ("fused", "sdpa", "layers.0.att.qkv.weight", "layers.0.att.qkv.weight", "layers.0.att.qkv.weight"),
    ("interleaved", "softmax", "layers.0.att.packed.weight", "layers.0.att.packed.weight",
     "layers.0.att.packed.weight"),
    # the score equation lists the keys first: q is found from the equation, the equation is never an operand
    ("einsum", "softmax", "layers.0.att.wq", "layers.0.att.wk", "layers.0.att.wv"),
    # baddbmm(bias, q, kᵀ): the additive ALiBi bias is never taken for q
    ("alibi", "softmax", "layers.0.att.q.weight", "layers.0.att.k.weight", "layers.0.att.v.weight"),
])
def test_attention_patterns_find_q_k_v(kind, pattern, q, k, v):
    (found,) = _core_params(kind)
    assert found == (pattern, {"q": q, "k": k, "v": v})


def test_product_patterns_name_their_factors():
    m = build("alibi", depth=1)
    flow = _flow(m, m.example_inputs())
    nodes = {n.target.__name__.split(".")[0]: n for n in flow.nodes if n.op == "call_function"
             and flow.product(n) is not None}
    bad = nodes["baddbmm"]
    a, b = flow.product(bad).factors(bad)
    assert bad.args[0] not in (a, b)  # the bias
    assert flow.product(bad).keys_factor(bad, -1) == 1
    m = build("einsum", depth=1)
    flow = _flow(m, m.example_inputs())
    scores = next(n for n in flow.nodes if flow.product(n) is not None and "->bhqk" in str(n.args[0]))
    assert flow.product(scores).keys_factor(scores, -1) == 0  # "bkhe,bqhe->bhqk": keys are the first operand


@pytest.mark.parametrize("kind", ["einsum", "alibi"])
def test_self_attention_stays_self_attention(kind):
    """A bias operand or an equation string taken for q would make this cross-attention and the stack a decoder."""
    m = build(kind, depth=3)
    table = vlpet_fx.discover(m, m.example_inputs())
    assert table.num_layers() == {"encoder": 3}
    assert {s.block for s in table} == {"self_attn", "ffn"}


# ---- feed-forward blocks -----------------------------------------------------------------------------------

def test_gated_ffn_roles_follow_the_activation():
    m = build("alibi", depth=1, gated=True)
    table = vlpet_fx.discover(m, m.example_inputs())
    ffn = {s.role: s.path for s in table.where(block="ffn")}
    # `switch` goes through silu before the product, `lift` does not
    assert ffn == {"gate": "layers.0.mlp.switch", "up": "layers.0.mlp.lift", "out": "layers.0.mlp.drop",
                   "output": "layers.0.mlp"}


def test_fused_gated_ffn_roles_are_slices():
    m = build("alibi", depth=1, mlp="fused")
    table = vlpet_fx.discover(m, m.example_inputs())
    ffn = {s.role: (s.path, s.out_slice) for s in table.where(block="ffn", role=["gate", "up"])}
    assert ffn == {"gate": ("layers.0.mlp.both", (64, 128)), "up": ("layers.0.mlp.both", (0, 64))}


@pytest.mark.parametrize("mlp", ["plain", "written-gelu"])
def test_plain_ffn_roles(mlp):
    m = build("alibi", depth=1, mlp=mlp)
    table = vlpet_fx.discover(m, m.example_inputs())
    ffn = {s.role: (s.path, s.out_slice) for s in table.where(block="ffn")}
    assert ffn == {"in": ("layers.0.mlp.a", None), "out": ("layers.0.mlp.b", None), "output": ("layers.0.mlp", None)}


# ---- the slice arithmetic --------------------------------------------------------------------------------

def test_slice_of():
    assert slice_of(list(range(12)), 12) == WHOLE
    assert slice_of(list(range(4, 8)), 12) == (4, 8)
    assert slice_of([0, 1, 6, 7], 12) == (0, 2, 6, 2)          # per-head packing: 2 blocks of 6
    assert slice_of([0, 1, 6, 9], 12) is None                  # irregular: no site
    assert slice_of([], 12) is None


# ---- the registry and a user pattern -----------------------------------------------------------------------

def test_registry_lists_every_kind_and_refuses_non_patterns():
    names = patterns.list_patterns()
    assert names["projection"] == ["linear", "matmul", "addmm", "einsum"]
    assert names["product"] == ["matmul", "baddbmm", "einsum"]
    assert names["attention"] == ["sdpa", "softmax"]
    assert names["ffn"] == ["gated", "fused-gated", "plain"]
    with pytest.raises(TypeError):
        vlpet_fx.register_pattern(object())
    with pytest.raises(TypeError):
        vlpet_fx.register_pattern(patterns.AttentionPattern())  # no name


# the worked example of docs/PATTERNS.md: a model whose attention is one custom op
@torch.library.custom_op("vlpet_demo::attend", mutates_args=())
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


@attend.register_fake
def _(q, k, v):
    return torch.empty_like(q)


class CustomBlock(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        h = self.norm(x)
        x = x + self.o(attend(self.q(h), self.k(h), self.v(h)))
        return x + self.down(torch.relu(self.up(x)))


class CustomModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.blocks = nn.ModuleList(CustomBlock() for _ in range(2))

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        return x


class AttendPattern(patterns.AttentionPattern):
    name = "vlpet-demo-attend"
    targets = frozenset({torch.ops.vlpet_demo.attend.default})

    def match(self, node, flow):
        from vlpet_fx.analysis.dataflow import Core

        q, k, v = node.args[:3]
        return Core(node, q, k, v, node)


@pytest.fixture
def attend_pattern():
    vlpet_fx.register_pattern(AttendPattern())
    yield
    vlpet_fx.unregister_pattern("vlpet-demo-attend", "attention")


def test_user_attention_pattern(attend_pattern):
    torch.manual_seed(0)
    m = CustomModel().eval()
    ids = torch.randint(0, 20, (2, 5))
    table = vlpet_fx.discover(m, (ids,))
    assert table.num_layers() == {"encoder": 2}
    assert {(s.role, s.path) for s in table.where(layer=1, block="self_attn")} == {
        ("q", "blocks.1.q"), ("k", "blocks.1.k"), ("v", "blocks.1.v"), ("o", "blocks.1.o"),
        ("output", "blocks.1.o")}  # attention has no module of its own here: its output is o's
    before = m(ids)
    vlpet_fx.patch(m, parse_rules("name: u\nmethods: {l: {type: lora, rank: 2}}\n"
                                  "rules: [{select: {role: [q, v]}, insert: l, placement: parallel}]"),
                   example_inputs=(ids,))
    assert len(m.vlpet_patch.attached) == 4
    assert torch.equal(m(ids), before)


def test_without_the_user_pattern_the_custom_op_is_no_attention():
    torch.manual_seed(0)
    m = CustomModel().eval()
    table = vlpet_fx.discover(m, (torch.randint(0, 20, (2, 5)),))
    assert {s.block for s in table} == {"ffn"}
