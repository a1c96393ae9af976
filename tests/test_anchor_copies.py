"""Anchors (``Site.anchor``) of two more kinds of site values that no module returns at every call:

* a projection whose weights are tied to another layer's (one transformer block's weights shared by several
  hybrid layers, each layer holding a module object of its own, as Zamba does): the parameter is named after the
  first layer, so the second layer's projection has no module path; its anchor is the module's own call, which
  reads the projection input x (``Anchor.reads_x``), so a ``parallel`` placement (LoRA, VL-PET's value adapter)
  works in the eager back end: equal to an independent computation and to the graph back end (outputs, gradients);
* a value handed on as an unchanged copy (through a dropout) of one call of a module called twice in its parent
  (Pegasus-X's global-local attention: one output projection for the global and the token stream, each output
  dropped out in the layer): the anchor is that call; with a PET on the projection itself (every call) too, the
  anchored PET runs after it, as in the graph.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import vlpet_fx
from vlpet_fx.analysis.sites import Anchor
from vlpet_fx.rules import parse_rules

from patched_checks import graph_agrees, perturb, pets

D = 16


# -- projections whose weights are tied to another layer's ---------------------------------------------------

class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x, q_of=None, v_of=None):
        """``q_of(x, q)`` / ``v_of(x, v)`` change the projections' values (the hand computation)."""
        q, k, v = self.q(x), self.k(x), self.v(x)
        q = q_of(x, q) if q_of else q
        v = v_of(x, v) if v_of else v
        return self.o(torch.softmax(q @ k.transpose(-1, -2) / D ** 0.5, -1) @ v)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.attn = Attention()
        self.norm2 = nn.LayerNorm(D)
        self.ffn = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, x, q_of=None, v_of=None):
        x = x + self.attn(self.norm(x), q_of, v_of)
        return x + self.ffn(self.norm2(x))


class TiedBlocks(nn.Module):
    """Two layers, each with a block object of its own, sharing every parameter."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(2))
        first = dict(self.layers[0].named_modules())
        for path, module in self.layers[1].named_modules():
            for name, _ in list(module.named_parameters(recurse=False)):
                setattr(module, name, getattr(first[path], name))

    def forward(self, x, pet_of=None):
        for i, layer in enumerate(self.layers):
            x = layer(x, *(pet_of(i) if pet_of else (None, None)))
        return x


LORA_QV = ("name: l\nmethods: {l: {type: lora, rank: 2, alpha: 4}}\n"
           "rules: [{select: {block: self_attn, role: [q, v]}, insert: l, placement: parallel}]")


@pytest.fixture(scope="module")
def tied():
    torch.manual_seed(0)
    model = TiedBlocks().eval()
    assert model.layers[1].attn.v is not model.layers[0].attn.v
    assert model.layers[1].attn.v.weight is model.layers[0].attn.v.weight
    x = torch.randn(2, 5, D)
    return model, x, vlpet_fx.discover(model, (x,))


def test_a_tied_projection_is_anchored_at_its_own_call_which_reads_x(tied):
    _, _, table = tied
    for role in ("q", "k", "v", "o"):
        first, second = table.get("encoder", 0, "self_attn", role), table.get("encoder", 1, "self_attn", role)
        assert second.path == f"layers.1.attn.{role}" and second.anchor is None
        # torch.export names the shared weight after its last owner, layers.1...: the first layer's projection has
        # no module path; its own module, layers.0..., makes the value from x
        assert first.path is None and first.param == f"layers.1.attn.{role}.weight"
        assert first.anchor == Anchor(f"layers.0.attn.{role}", "output", None, 0, 1, reads_x=True)


def test_parallel_placements_on_tied_projections_match_a_hand_computation_and_the_graph(tied):
    model, x, table = tied
    rules = parse_rules(LORA_QV)
    eager = vlpet_fx.patch(copy.deepcopy(model), rules, table=table)
    perturb(eager)
    mods = pets(eager)
    assert sorted(mods) == [f"encoder.{i}.self_attn.{r}" for i in range(2) for r in ("q", "v")]
    # layer 0's modules live on its own projections (the base model's state_dict keys are unchanged)
    assert {p for p in eager.vlpet_patch.attached if p.startswith("layers.0.")} == {
        "layers.0.attn.q.pet_q_parallel", "layers.0.attn.v.pet_v_parallel"}

    def pet_of(i):
        return mods[f"encoder.{i}.self_attn.q"].parallel, mods[f"encoder.{i}.self_attn.v"].parallel

    got = eager(x)
    assert torch.allclose(got, model(x, pet_of), atol=1e-6)
    assert not torch.allclose(got, model(x), atol=1e-3)
    graph_agrees(model, rules, eager, got, (x,))


def test_an_anchored_call_that_reads_another_value_than_x_is_refused_in_one_line(tied):
    """The hook reads x as the one tensor of the projection's input width the call gets: any other input (here a
    second tensor) is a PlanError in the forward, not a wrong sum."""
    model, x, table = tied
    eager = vlpet_fx.patch(copy.deepcopy(model), parse_rules(LORA_QV), table=table)
    v = eager.layers[0].attn.v
    plain = type(v).forward
    v.forward = lambda t, extra=torch.zeros(1, D): plain(v, t)  # same output, but the call reads two tensors
    extra = v.register_forward_pre_hook(lambda m, args, kwargs: (args, {"extra": torch.zeros(1, D)}),
                                        with_kwargs=True)
    with pytest.raises(vlpet_fx.PlanError, match="does not hand out or read one tensor 16 wide") as err:
        eager(x)
    assert "\n" not in str(err.value)
    extra.remove()
    del v.forward
    eager(x)


# -- a value handed on as a copy of one call of a module called twice ------------------------------------------

class GlobalLocal(nn.Module):
    """One set of projections for a global stream ``g`` (a few learned tokens) and the token stream ``x``, both
    attending to both; the output projection is called on the global stream first, on the tokens second, and the
    module returns both outputs (of different lengths)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x, g, o_of=lambda y: y):
        both = torch.cat([g, x], dim=1)
        k, v = self.k(both), self.v(both)

        def attend(q):
            return torch.softmax(q @ k.transpose(-1, -2) / D ** 0.5, -1) @ v

        g_out = o_of(self.o(attend(self.q(g))))
        x_out = o_of(self.o(attend(self.q(x))))
        return x_out, g_out


class GlobalLocalLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.gnorm, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = GlobalLocal()
        self.ffn = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, x, g, o_of=lambda y: y, x_of=lambda y: y, g_of=lambda y: y):
        a, b = self.attn(self.norm(x), self.gnorm(g), o_of)
        x = x + x_of(F.dropout(a, 0.1, self.training))
        g = g + g_of(F.dropout(b, 0.1, self.training))
        return x + self.ffn(self.norm2(x)), g + self.ffn(self.norm2(g))


class GlobalLocalModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.randn(1, 3, D))
        self.layers = nn.ModuleList(GlobalLocalLayer() for _ in range(2))

    def forward(self, x, pets_of=None):
        g = self.g.expand(x.shape[0], -1, -1)
        for i, layer in enumerate(self.layers):
            x, g = layer(x, g, *(pets_of(i) if pets_of else ()))
        return x + g.mean(1, keepdim=True)


@pytest.fixture(scope="module")
def global_local():
    torch.manual_seed(0)
    model = GlobalLocalModel().eval()
    x = torch.randn(2, 6, D)
    cap = vlpet_fx.capture(model, (x,))
    return model, x, vlpet_fx.discover(model, captured=cap), cap


def streams(table, layer: int) -> dict[str, str]:
    """The key of each stream's attention output site of a layer: "x" (tokens) or "g" (global)."""
    out = {}
    for s in table.where(layer=layer, role="output", block={"self_attn", "cross_attn"}):
        assert s.path is None, s  # the attention returns two values of this width, of other lengths
        out["x" if s.anchor.index == 1 else "g"] = s.key
    return out


def test_a_copy_of_one_call_of_a_module_called_twice_is_anchored_at_that_call(global_local):
    _, _, table, cap = global_local
    nodes = {n.name: n for n in cap.graph.nodes}
    for layer in range(2):
        found = {s.anchor for s in table.where(layer=layer, role="output", block={"self_attn", "cross_attn"})}
        # the dropout's operand is the output projection's call: the first (global) and the second (tokens)
        assert found == {Anchor(f"layers.{layer}.attn.o", "output", f"layers.{layer}.attn", i, 2) for i in (0, 1)}
        for stream, key in streams(table, layer).items():
            site = table[key]
            assert nodes[site.node].target == torch.ops.aten.dropout.default
            assert nodes[site.node].meta["val"].shape[1] == (6 if stream == "x" else 3)


# one attention output site per layer (two PET modules on one anchor module would share a name): the token
# stream's in layer 0, the global stream's in layer 1 (as discovery names them)
ONE_PER_LAYER = "{select: {block: self_attn, role: output}, insert: a, placement: after}"
ADAPTER = "name: a\nmethods: {a: {type: adapter, reduction: 4}}\nrules:\n  - %s\n"


def expected_pets(table, mods, o_site=None):
    """``pets_of(layer)`` for the hand computation: (on o's every call, on the token stream's output, on the global
    stream's output)."""

    def pets_of(i):
        keys = {stream: key for stream, key in streams(table, i).items() if key in mods}
        ident = lambda y: y  # noqa: E731
        return (mods[o_site[i]].after if o_site else ident,
                mods[keys["x"]].after if "x" in keys else ident, mods[keys["g"]].after if "g" in keys else ident)

    return pets_of


def test_an_adapter_on_a_streams_copy_matches_a_hand_computation_and_the_graph(global_local):
    model, x, table, _ = global_local
    rules = parse_rules(ADAPTER % ONE_PER_LAYER)
    eager = vlpet_fx.patch(copy.deepcopy(model), rules, table=table)
    perturb(eager)
    mods = pets(eager)
    assert sorted(mods) == ["decoder.0.self_attn.output", "decoder.1.self_attn.output"]
    assert {table[k].anchor.index for k in mods} == {0, 1}  # one stream's in each layer: both call positions
    pets_of = expected_pets(table, mods)
    got = eager(x)
    assert torch.allclose(got, model(x, pets_of), atol=1e-6)
    assert not torch.allclose(got, model(x), atol=1e-3)
    # the stream told apart matters: the adapter on the other stream gives another output
    swapped = model(x, lambda i: (pets_of(i)[0], pets_of(i)[2], pets_of(i)[1]))
    assert not torch.allclose(got, swapped, atol=1e-3)
    graph_agrees(model, rules, eager, got, (x,))


def test_a_pet_on_the_projection_and_one_on_its_anchored_copy_run_in_graph_order(global_local):
    """An adapter on each stream's copy of the output projection's value (the rule listed first) and one on the
    projection itself (every call of it: one site): the graph changes the projection's value first, then the
    copy; the eager hooks must too."""
    model, x, table, _ = global_local
    rules = parse_rules(ADAPTER % ONE_PER_LAYER
                        + "  - {select: {block: [self_attn, cross_attn], role: o}, insert: a, placement: after}\n")
    eager = vlpet_fx.patch(copy.deepcopy(model), rules, table=table)
    assert [p.site.role for p in eager.vlpet_patch.plan.placements] == ["output", "output", "o", "o"]
    perturb(eager)
    mods = pets(eager)
    o_site = {s.layer: s.key for s in table.where(role="o")}
    got = eager(x)
    assert torch.allclose(got, model(x, expected_pets(table, mods, o_site)), atol=1e-6)
    graph_agrees(model, rules, eager, got, (x,))


class NormThenProject(nn.Module):
    """Normalises, then projects by a bare weight: its call hands out only the projection's value, but reads the
    un-normalised h, not the projection input x = norm(h)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.w = nn.Parameter(torch.randn(2 * D, D) / D ** 0.5)

    def forward(self, h):
        return F.linear(self.norm(h), self.w)


class NormThenProjectLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = NormThenProject()
        self.down = nn.Linear(2 * D, D)

    def forward(self, h):
        return h + self.down(F.gelu(self.up(h)))


def test_parallel_on_an_anchored_call_that_does_not_read_x_is_refused_in_one_line():
    torch.manual_seed(0)
    model = nn.Sequential(*(NormThenProjectLayer() for _ in range(2))).eval()
    x = torch.randn(2, 5, D)
    table = vlpet_fx.discover(model, (x,))
    ins = table.where(block="ffn", role="in")
    assert len(ins) == 2
    for s in ins:
        assert s.path is None and s.anchor == Anchor(f"{s.layer}.up", "output", None, 0, 1, reads_x=False)
    rules = parse_rules("name: l\nmethods: {l: {type: lora, rank: 2}}\n"
                        "rules: [{select: {block: ffn, role: in}, insert: l, placement: parallel}]")
    with pytest.raises(vlpet_fx.PlanError, match="use `placement: after`") as err:
        vlpet_fx.patch(copy.deepcopy(model), rules, table=table)
    assert "\n" not in str(err.value)


# -- a projection the graph also calls where no site is ---------------------------------------------------------

class PooledSide(nn.Module):
    """Attention on the tokens, whose output projection is applied to a second stream ``g`` too (a mean over it:
    no attention there, so no site): a hook on the projection's every call would change ``g``'s value as well."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x, g, o_of=None):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / D ** 0.5, -1) @ self.v(x)
        x_out = self.o(a)
        x_out = o_of(a, x_out) if o_of else x_out
        return x_out, self.o(g.mean(1, keepdim=True).expand_as(g))


class PooledSideLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.attn = PooledSide()
        self.ffn = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, x, g, o_of=None):
        a, b = self.attn(self.norm(x), g, o_of)
        x = x + a
        return x + self.ffn(x), g + b


class PooledSideModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.randn(1, 3, D))
        self.layers = nn.ModuleList(PooledSideLayer() for _ in range(2))

    def forward(self, x, pet_of=None):
        g = self.g.expand(x.shape[0], -1, -1)
        for i, layer in enumerate(self.layers):
            x, g = layer(x, g, pet_of(i) if pet_of else None)
        return x + g.mean(1, keepdim=True)


@pytest.fixture(scope="module")
def pooled_side():
    torch.manual_seed(0)
    model = PooledSideModel().eval()
    x = torch.randn(2, 5, D)
    return model, x, vlpet_fx.discover(model, (x,))


def test_a_projection_also_called_where_no_site_is_is_anchored_at_the_sites_call(pooled_side):
    _, _, table = pooled_side
    for layer in range(2):
        o = table.get("encoder", layer, "self_attn", "o")
        assert o.path is None and len(o.call_nodes()) == 1
        assert o.anchor == Anchor(f"layers.{layer}.attn.o", "output", f"layers.{layer}.attn", 0, 2, reads_x=True)
        assert table.get("encoder", layer, "self_attn", "q").path == f"layers.{layer}.attn.q"  # called once


@pytest.mark.parametrize("placement", ["after", "parallel"])
def test_a_pet_on_it_changes_the_sites_call_only_as_the_graph_does(pooled_side, placement):
    model, x, table = pooled_side
    method = "{type: adapter, reduction: 4}" if placement == "after" else "{type: lora, rank: 2, alpha: 4}"
    rules = parse_rules(f"name: a\nmethods: {{a: {method}}}\n"
                        f"rules: [{{select: {{block: self_attn, role: o}}, insert: a, placement: {placement}}}]")
    eager = vlpet_fx.patch(copy.deepcopy(model), rules, table=table)
    perturb(eager)
    mods = pets(eager)
    assert sorted(mods) == ["encoder.0.self_attn.o", "encoder.1.self_attn.o"]

    def pet_of(i):
        mod = mods[f"encoder.{i}.self_attn.o"]
        return (lambda a, y: mod.after(y)) if placement == "after" else mod.parallel

    got = eager(x)
    assert torch.allclose(got, model(x, pet_of), atol=1e-6)
    assert not torch.allclose(got, model(x), atol=1e-3)
    graph_agrees(model, rules, eager, got, (x,))
