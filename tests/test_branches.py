"""Residual branches that are not ``linear → act → linear``: mixtures of experts held as batched parameters,
token mixers that are not softmax attention, non-linearities written out of primitives, parallel layouts.

Expectations come from how the toy models (tests/toy_branches.py) are written, never from running discovery;
every patched model is checked against the unpatched one.
"""

from __future__ import annotations

import copy

import pytest
import torch

import vlpet_fx
from toy_branches import build
from vlpet_fx.analysis import patterns
from vlpet_fx.analysis.patterns import BranchPattern
from vlpet_fx.rules import parse_rules

DEPTH = 2
# the shipped lora.yaml (rank 128) is wider than these toys; the same rule at rank 4
# the shipped `lora` set's two rules at rank 4: q/v of attention, in/out of mixers (the short-conv toy is causal,
# a decoder without attention)
LORA = parse_rules("name: lora4\nmethods: {lora: {type: lora, rank: 4, alpha: 8}}\nrules: [{select: {block: "
                   "[self_attn, cross_attn], role: [q, v]}, insert: lora, placement: parallel, optional: true}, "
                   "{select: {block: mixer, role: [in, out]}, insert: lora, placement: parallel, optional: true}]\n")


def _table(**kw):
    m = build(depth=DEPTH, **kw)
    return m, vlpet_fx.discover(m, m.example_inputs())


def _roles(table, layer, block):
    return {s.role: s.path for s in table.where(layer=layer, block=block)}


@pytest.fixture(scope="module")
def experts():
    return _table(ffn="experts")


@pytest.fixture(scope="module")
def shared():
    return _table(ffn="experts+shared")


@pytest.fixture(scope="module")
def mixer():
    return _table(mix="conv", ffn="gated")


# ---- mixtures of experts -------------------------------------------------------------------------------------

def test_batched_experts_are_one_ffn_block_with_only_an_output(experts):
    """The experts are 3-D parameters (no projection a method could be added to): the block is the module
    that produces the branch value, with its `output` site only; the router is no role."""
    _, table = experts
    assert table.num_layers() == {"decoder": DEPTH}  # causal SDPA attention makes the stack a decoder
    for layer in range(DEPTH):
        assert _roles(table, layer, "ffn") == {"output": f"layers.{layer}.ffn"}
        assert table.get("decoder", layer, "ffn", "output").input_path == f"layers.{layer}.n2"
        assert {s.block for s in table.where(layer=layer)} == {"self_attn", "ffn"}


def test_shared_expert_roles_inside_the_mixture(shared):
    """Routed experts + a shared gated expert meet in a sum: one block, output = the mixture module, and the
    shared expert's real projections keep their roles (the sigmoid gate is not one)."""
    _, table = shared
    for layer in range(DEPTH):
        p = f"layers.{layer}.ffn"
        assert _roles(table, layer, "ffn") == {"gate": f"{p}.shared.wg", "up": f"{p}.shared.wu",
                                               "out": f"{p}.shared.wd", "output": p}


@pytest.mark.parametrize("kind", ["experts", "shared", "mixer"])
def test_patched_models_match_the_unpatched_one(kind, experts, shared, mixer):
    """LoRA with zero-initialised B is the identity; VL-PET after every block changes the output, runs
    backward, and every trainable parameter gets a finite gradient."""
    model, table = {"experts": experts, "shared": shared, "mixer": mixer}[kind]
    (ids,) = model.example_inputs()
    with torch.no_grad():
        reference = model(ids)
    rules = "vlpet_causal_lm" if "decoder" in table.stacks() else "vl_adapter"
    patched = copy.deepcopy(model)
    plan = vlpet_fx.plan(patched, rules, table=table)
    blocks = {(p.site.block, p.site.role) for p in plan.placements}
    assert ("ffn", "output") in blocks
    if kind == "mixer":
        assert ("mixer", "output") in blocks
    vlpet_fx.patch(patched, plan)
    out = patched(ids)
    assert not torch.allclose(out, reference)
    out.sum().backward()
    trainable = [p for p in patched.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    if "decoder" in table.stacks():
        lora = copy.deepcopy(model)
        vlpet_fx.patch(lora, LORA, table=table)
        with torch.no_grad():
            torch.testing.assert_close(lora(ids), reference, rtol=1e-5, atol=1e-5)


def test_parallel_mixture_reads_the_same_input_as_attention():
    """x + attn(n(x)) + moe(n(x)): the mixture is a block of the same layer, its block input is x."""
    _, table = _table(ffn="experts+shared", parallel=True)
    assert table.num_layers() == {"decoder": DEPTH}
    for layer in range(DEPTH):
        out = table.get("decoder", layer, "ffn", "output")
        assert out.path == f"layers.{layer}.ffn"
        assert out.input_path == table.get("decoder", layer, "self_attn", "output").input_path == f"layers.{layer}"


# ---- token mixers that are not softmax attention ------------------------------------------------------------

def test_short_conv_mixer_is_a_mixer_block(mixer):
    _, table = mixer
    # no attention, but a causal conv (padded k - 1, cut to n) and a forward scan: its values at a position do not
    # depend on later tokens, so the stack is a decoder (analysis/behaviour.py; was `encoder` before that)
    assert table.num_layers() == {"decoder": DEPTH}
    for layer in range(DEPTH):
        p = f"layers.{layer}.mix"
        assert _roles(table, layer, "mixer") == {"in": f"{p}.inp", "out": f"{p}.outp", "output": p}
        assert _roles(table, layer, "ffn")["output"] == f"layers.{layer}.ffn"


@pytest.mark.parametrize("conv, scan, block", [(True, False, "mixer"), (False, True, "mixer"), (False, False, "ffn")])
def test_what_makes_a_branch_token_mixing(conv, scan, block):
    """A convolution along the tokens or a cumulative sum over them mixes tokens; the same branch without
    either (a weight matrix applied position by position) is a feed-forward block."""
    _, table = _table(mix="conv", ffn="gated", conv=conv, scan=scan)
    got = {s.block for s in table.where(layer=0, path="layers.0.mix")}
    assert got == {block}


def test_a_user_branch_pattern_runs_first(experts):
    class EverythingMixes(BranchPattern):
        name = "test-everything-mixes"

        def classify(self, branch, flow):
            return "mixer"

    model, _ = experts
    vlpet_fx.register_pattern(EverythingMixes())
    try:
        table = vlpet_fx.discover(model, model.example_inputs())
    finally:
        assert vlpet_fx.unregister_pattern("test-everything-mixes", "branch")
    # a mixer's `in` roles are the projections that read the stream (here the router)
    assert _roles(table, 0, "mixer") == {"in": "layers.0.ffn.router", "output": "layers.0.ffn"}
    assert "ffn" not in {s.block for s in table}
    assert "test-everything-mixes" not in patterns.list_patterns()["branch"]


def test_registry_has_the_branch_patterns():
    assert patterns.list_patterns()["branch"] == ["token-mixing", "position-wise"]


# ---- a non-linearity written out of primitives --------------------------------------------------------------

def test_written_out_activation_is_a_plain_ffn():
    """up → where(h > 0, a·h² + h/2, expm1(min(h, 0)) + h/2) → down (xIELU-like: no activation op)."""
    _, table = _table(ffn="written")
    for layer in range(DEPTH):
        p = f"layers.{layer}.ffn"
        assert _roles(table, layer, "ffn") == {"in": f"{p}.up", "out": f"{p}.down", "output": p}


def test_rules_name_the_mixer_block():
    rs = parse_rules("name: t\nmethods: {a: {type: adapter, reduction: 8}}\n"
                     "rules: [{select: {block: mixer, role: output}, insert: a, placement: after}]\n")
    assert rs.rules[0].select.block == ["mixer"]


# ---- attention with learned sink logits ---------------------------------------------------------------------

class SinkAttention(torch.nn.Module):
    """softmax([q·kᵀ + causal mask | sink]) without the sink column, times v (one learned logit per head)."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d, bias=False) for _ in range(4))
        self.sinks = torch.nn.Parameter(torch.zeros(heads))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (m(x).view(b, t, self.h, d // self.h).transpose(1, 2) for m in (self.q, self.k, self.v))
        pos = torch.arange(t)
        mask = torch.where(pos[None, :] <= pos[:, None], 0.0, float("-inf"))
        scores = q @ k.transpose(-1, -2) / (d // self.h) ** 0.5 + mask
        sink = self.sinks.reshape(1, -1, 1, 1).expand(b, -1, t, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        return self.o((probs @ v).transpose(1, 2).reshape(b, t, d))


class SinkLM(torch.nn.Module):
    def __init__(self, d: int = 32, depth: int = DEPTH):
        super().__init__()
        self.embed = torch.nn.Embedding(50, d)
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(d) for _ in range(depth))
        self.att = torch.nn.ModuleList(SinkAttention(d) for _ in range(depth))

    def forward(self, ids):
        x = self.embed(ids)
        for n, a in zip(self.norms, self.att):
            x = x + a(n(x))
        return x


def test_attention_sinks_concatenated_before_the_softmax():
    """The sink logits (from a parameter only) do not hide the scores product; the mask still makes it causal."""
    torch.manual_seed(0)
    m = SinkLM().eval()
    table = vlpet_fx.discover(m, (torch.randint(0, 50, (2, 7)),))
    assert table.num_layers() == {"decoder": DEPTH}
    for layer in range(DEPTH):
        assert {s.role: s.path for s in table.where(layer=layer, block="self_attn")} == {
            "q": f"att.{layer}.q", "k": f"att.{layer}.k", "v": f"att.{layer}.v", "o": f"att.{layer}.o",
            "output": f"att.{layer}"}
