"""Site values that no module returns at every call (``Site.path`` is None) reached by the eager back end through
their anchor (``Site.anchor``): the one call of a module that hands the value out, or reads it.

* a dropout module called on the attention probabilities and on the output (XLNet's relative attention): the
  output site is the dropout's second call inside each call of the attention; the eager hook changes exactly
  that call: equal to an independent computation and to the graph back end (outputs and gradients);
* a second stream that runs the attention's sequence of calls again (XLNet's two streams in ``generate``) gets
  the module at the same position of each repetition; a count that is no repetition is refused in one line;
* a projection by a bare parameter (``F.linear(x, self.w)``) read by one module call: changed in a pre-hook;
* what cannot work is refused in one line (a parallel placement: no projection input at the anchor).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vlpet_fx
from vlpet_fx.analysis.sites import Anchor
from vlpet_fx.rules import parse_rules

from patched_checks import graph_agrees, perturb, pets

D = 16

ADAPTER = ("name: a\nmethods: {a: {type: adapter, reduction: 4}}\n"
           "rules: [{select: {block: %s, role: %s}, insert: a, placement: after}]")


class SharedDropAttention(nn.Module):
    """Attention whose one dropout module is called on the probabilities and on the output, with its output
    projection a bare parameter; with a second stream ``g`` it runs that sequence again (XLNet's relative
    attention and its two streams)."""

    def __init__(self, d: int = D):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(d, d) for _ in range(3))
        self.o = nn.Parameter(torch.randn(d, d) / d ** 0.5)
        self.drop = nn.Dropout(0.1)

    def branch(self, x, after=lambda y: y):
        p = self.drop(torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / D ** 0.5, -1))
        return after(self.drop(nn.functional.linear(p @ self.v(x), self.o)))

    def forward(self, x, g=None):
        return x + self.branch(x), (g + self.branch(g) if g is not None else None)


class Layer(nn.Module):
    def __init__(self, d: int = D):
        super().__init__()
        self.attn = SharedDropAttention(d)
        self.norm = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x, g=None):
        x, g = self.attn(x, g)
        return x + self.ffn(self.norm(x)), (g + self.ffn(self.norm(g)) if g is not None else None)


class TwoStream(nn.Module):
    def __init__(self, d: int = D):
        super().__init__()
        self.layers = nn.ModuleList(Layer(d) for _ in range(2))

    def forward(self, x, g=None):
        for layer in self.layers:
            x, g = layer(x, g)
        return x if g is None else x + g


def expected_two_stream(model: TwoStream, pet_of, x, g=None):
    """The model computed by hand with each layer's adapter on its attention's output (every stream)."""
    for i, layer in enumerate(model.layers):
        a = layer.attn
        x = x + a.branch(x, pet_of(i))
        g = g + a.branch(g, pet_of(i)) if g is not None else None
        x = x + layer.ffn(layer.norm(x))
        g = g + layer.ffn(layer.norm(g)) if g is not None else None
    return x if g is None else x + g


@pytest.fixture(scope="module")
def two_stream():
    torch.manual_seed(0)
    model = TwoStream().eval()
    x = torch.randn(2, 6, D)
    table = vlpet_fx.discover(model, (x,))
    return model, x, table


def test_a_module_called_twice_in_its_parent_anchors_the_second_call(two_stream):
    _, _, table = two_stream
    out = table.where(block="self_attn", role="output")
    assert len(out) == 2
    for s in out:
        assert s.path is None  # the dropout also returns the (6-wide) probabilities
        assert s.anchor == Anchor(f"layers.{s.layer}.attn.drop", "output", f"layers.{s.layer}.attn", 1, 2)


def test_the_eager_anchor_changes_exactly_the_graph_value(two_stream):
    model, x, table = two_stream
    rules = parse_rules(ADAPTER % ("self_attn", "output"))
    plan = vlpet_fx.plan(model, rules, table=table)
    eager = vlpet_fx.patch(copy.deepcopy(model), plan)
    perturb(eager)
    mods = pets(eager)
    assert sorted(mods) == ["encoder.0.self_attn.output", "encoder.1.self_attn.output"]
    # the PET module lives on the anchor's module (state_dict keys of the base model unchanged)
    assert set(eager.vlpet_patch.attached) == {f"layers.{i}.attn.drop.pet_output_after" for i in range(2)}
    want = expected_two_stream(model, lambda i: mods[f"encoder.{i}.self_attn.output"].after, x)
    got = eager(x)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, model(x), atol=1e-3)  # the adapters are not the identity here
    graph_agrees(model, rules, eager, got, (x,))


def test_a_gate_reading_the_block_input_on_an_anchored_value_matches_the_graph(two_stream):
    """VL-PET's large gate reads the block input X (a pre-hook on the layer) and gates the anchored value."""
    model, x, table = two_stream
    rules = parse_rules("name: v\nmethods: {v: {type: vlpet, dim: 4, heads: 1, gate: large, gate_dim: 4}}\n"
                        "rules: [{select: {block: self_attn, role: output}, insert: v, placement: after}]")
    eager = vlpet_fx.patch(copy.deepcopy(model), rules, table=table)
    perturb(eager)
    mods = pets(eager)
    assert all(getattr(m, "needs_block_input", False) for m in mods.values())
    got = eager(x)
    assert not torch.allclose(got, model(x), atol=1e-3)
    graph_agrees(model, rules, eager, got, (x,))


def test_a_second_stream_gets_the_module_at_the_same_call_of_each_repetition(two_stream):
    """Captured with one stream; run with two, the attention's dropout is called four times: the site is the
    second and the fourth call (the output of each stream), as a hand computation says."""
    model, x, table = two_stream
    eager = vlpet_fx.patch(copy.deepcopy(model), parse_rules(ADAPTER % ("self_attn", "output")), table=table)
    perturb(eager)
    mods = pets(eager)
    g = torch.randn(2, 6, D)
    want = expected_two_stream(model, lambda i: mods[f"encoder.{i}.self_attn.output"].after, x, g)
    assert torch.allclose(eager(x, g), want, atol=1e-6)


def test_a_call_count_that_repeats_nothing_is_refused_in_one_line(two_stream):
    model, x, table = two_stream
    eager = vlpet_fx.patch(copy.deepcopy(model), parse_rules(ADAPTER % ("self_attn", "output")), table=table)
    attn = eager.layers[0].attn
    plain = attn.forward

    def with_a_third_call(x, g=None):
        out = plain(x, g)
        attn.drop(out[0])
        return out

    attn.forward = with_a_third_call
    with pytest.raises(vlpet_fx.PlanError, match="called layers.0.attn.drop 3 times") as err:
        eager(x)
    assert "\n" not in str(err.value)
    attn.forward = plain
    eager(x)  # the count starts again at the next call

    def first_call(module, args):  # an extra call before the probabilities: the site's position is theirs now
        attn.drop(args[0])

    extra = attn.register_forward_pre_hook(first_call)
    with pytest.raises(vlpet_fx.PlanError, match="does not hand out or read one tensor 16 wide") as err:
        eager(x)
    assert "\n" not in str(err.value)
    extra.remove()


class RawProjection(nn.Module):
    """A feed-forward block whose input projection is a bare parameter: its value is read by the activation
    module's one call, which returns something else (the activation of it)."""

    def __init__(self, d: int = D):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(2 * d, d) / d ** 0.5)
        self.act = nn.GELU()
        self.out = nn.Linear(2 * d, d)

    def forward(self, x, after=lambda y: y):
        return self.out(self.act(after(nn.functional.linear(x, self.w_in))))


class RawLayer(nn.Module):
    def __init__(self, d: int = D):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = RawProjection(d)

    def forward(self, x, after=lambda y: y):
        return x + self.mlp(self.norm(x), after)


class RawModel(nn.Module):
    def __init__(self, d: int = D):
        super().__init__()
        self.layers = nn.ModuleList(RawLayer(d) for _ in range(2))

    def forward(self, x, pet_of=None):
        for i, layer in enumerate(self.layers):
            x = layer(x, pet_of(i) if pet_of else (lambda y: y))
        return x


def test_a_value_read_by_one_module_call_is_changed_in_its_pre_hook():
    torch.manual_seed(0)
    model = RawModel().eval()
    x = torch.randn(2, 5, D)
    table = vlpet_fx.discover(model, (x,))
    ins = table.where(block="ffn", role="in")
    assert len(ins) == 2
    for s in ins:
        assert s.path is None and s.anchor == Anchor(f"layers.{s.layer}.mlp.act", "input", None, 0, 1)
    rules = parse_rules(ADAPTER % ("ffn", "in"))
    eager = vlpet_fx.patch(copy.deepcopy(model), rules, table=table)
    perturb(eager)
    mods = pets(eager)
    got = eager(x)
    assert torch.allclose(got, model(x, lambda i: mods[f"encoder.{i}.ffn.in"].after), atol=1e-6)
    assert not torch.allclose(got, model(x), atol=1e-3)
    graph_agrees(model, rules, eager, got, (x,))


def test_a_parallel_placement_on_an_anchored_value_is_refused_in_one_line():
    torch.manual_seed(0)
    model = RawModel().eval()
    x = torch.randn(2, 5, D)
    rules = parse_rules("name: l\nmethods: {l: {type: lora, rank: 2}}\n"
                        "rules: [{select: {block: ffn, role: in}, insert: l, placement: parallel}]")
    with pytest.raises(vlpet_fx.PlanError, match="use `placement: after`") as err:
        vlpet_fx.patch(model, rules, example_inputs=(x,))
    assert "\n" not in str(err.value)
    assert not any(n.startswith("pet") or ".pet_" in n for n, _ in model.named_modules())


class TwoStreamWithInputs(TwoStream):
    def example_inputs(self):
        return (torch.randn(2, 6, D, generator=torch.Generator().manual_seed(0)),)


def test_an_anchored_placement_saves_and_loads(tmp_path):
    """The adapters directory names the PET module under the anchor's module; loading re-discovers the anchor
    and gives the same outputs."""
    from vlpet_fx.export.patched_dir import load, save_patched

    torch.manual_seed(0)
    model = TwoStreamWithInputs().eval()
    (x,) = model.example_inputs()
    eager = vlpet_fx.patch(copy.deepcopy(model), parse_rules(ADAPTER % ("self_attn", "output")))
    perturb(eager)
    save_patched(eager, tmp_path / "run", {"kind": "factory", "spec": "test_anchors:TwoStreamWithInputs"})
    loaded = load(copy.deepcopy(model), tmp_path / "run")
    assert torch.equal(loaded(x), eager(x))
    assert not torch.allclose(loaded(x), model(x), atol=1e-3)
