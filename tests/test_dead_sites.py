"""Sites whose value reaches no output of the model are no sites: a PET module there would change nothing and
get no gradient. Pegasus-X's encoder runs a global stream beside the tokens and drops it after the last layer;
that layer's global query, output projection and output are such values. The independent check is autograd:
PET modules placed at every value of the graph (the dropped ones included) by the graph back end, one backward
from the model's output: exactly the dropped ones get no gradient. The reduced-depth capture (one layer of a
kind, replicated) sees the last layer as the last too, so its table equals the full capture's."""

from __future__ import annotations

import copy

import pytest
import torch

import vlpet_fx
from vlpet_fx.analysis.discover import _sites
from vlpet_fx.analysis.sites import SiteTable, merge_calls, without_dead
from vlpet_fx.capture import capture
from vlpet_fx.capture.inputs import build_example_inputs
from vlpet_fx.capture.reduce import Reduction
from vlpet_fx.rules import parse_rules
from vlpet_fx.zoo.tiny import tiny_config

from patched_checks import pets

transformers = pytest.importorskip("transformers")

LAYERS = 4  # more than reduce.MIN_LENGTH: the fast discovery shortens the stacks
DEAD = {f"encoder.{LAYERS - 1}.self_attn.{role}" for role in ("q", "o", "output")}
EVERY = parse_rules("name: every\nmethods: {p: {type: vlpet, dim: 4, heads: 1, gate: none}}\n"
                    "rules: [{name: p, select: {}, insert: p, placement: after}]\n", source="test")


@pytest.fixture(scope="module")
def pegasus_x():
    torch.manual_seed(0)
    return transformers.AutoModelForSeq2SeqLM.from_config(tiny_config("pegasus_x", LAYERS)).eval()


def _every_value(model) -> tuple[SiteTable, list, tuple]:
    """Every site the analysis finds before values that reach no output are left out, and the dropped ones."""
    _, args, kwargs = build_example_inputs(model)
    cap = capture(model, (args, kwargs))
    kept, dead = without_dead(_sites(model, cap), cap)
    return SiteTable(merge_calls(kept + dead), model="pegasus_x"), dead, (args, kwargs)


def test_values_that_reach_no_output_are_no_sites(pegasus_x):
    table = vlpet_fx.discover(pegasus_x)
    assert table.meta["method"] == "export (reduced depth)"
    assert table.num_layers() == {"encoder": LAYERS, "decoder": LAYERS}
    every, dead, _ = _every_value(pegasus_x)
    assert {s.base_key for s in dead} == DEAD
    assert set(table.keys()) == {s.key for s in every} - DEAD
    # the reduced capture keeps the last layer (its sites are the last layer's, not the first's replicated)
    full = vlpet_fx.discover(pegasus_x, fast=False)
    assert [s.public() for s in table] == [s.public() for s in full]
    assert [(s.param, s.anchor, s.input_path, s.layer_path) for s in table] == \
        [(s.param, s.anchor, s.input_path, s.layer_path) for s in full]


def _without_gradient(patched) -> set[str]:
    """Keys of the sites whose PET module got no gradient (every parameter's zero or None)."""
    modules = pets(patched)
    assert modules
    return {k for k, m in modules.items() if all(p.grad is None or not p.grad.any() for p in m.parameters())}


def test_exactly_the_dropped_values_get_no_gradient(pegasus_x):
    """A PET module at every value found (dropped ones included; eager back end, which places what a table
    names), a loss on the logits: exactly the modules on dropped values get no gradient."""
    every, dead, (args, kwargs) = _every_value(pegasus_x)
    plan = vlpet_fx.plan(pegasus_x, EVERY, table=every)
    assert {p.site.key for p in plan.placements} >= DEAD
    patched = vlpet_fx.patch(copy.deepcopy(pegasus_x), plan)
    patched(*args, **kwargs).logits.square().sum().backward()
    assert _without_gradient(patched) == DEAD


@pytest.mark.parametrize("backend", ["eager", "graph"])
def test_every_placed_module_trains(pegasus_x, backend):
    """With the table as discovered, every PET module of the plan gets a gradient, in both back ends."""
    _, args, kwargs = build_example_inputs(pegasus_x)
    plan = vlpet_fx.plan(pegasus_x, EVERY)
    extra = {"backend": "graph", "example_inputs": (args, kwargs)} if backend == "graph" else {}
    patched = vlpet_fx.patch(copy.deepcopy(pegasus_x), plan, **extra)
    patched(*args, **kwargs).logits.square().sum().backward()
    assert _without_gradient(patched) == set()


@pytest.mark.parametrize("auto, model_type, dropped", [
    # SigLIP's pooling head (an attention probe and an MLP), which Gemma 3 does not read (it takes the patches)
    ("AutoModelForCausalLM", "gemma3", {"visual.2.cross_attn.output", "visual.2.ffn.in", "visual.2.ffn.out",
                                        "visual.2.ffn.output"}),
    # RWKV's recurrence writes its output in place step by step: the value projection reaches the logits only
    # through those writes, and stays a site
    ("AutoModelForCausalLM", "rwkv", set()),
])
def test_dropped_exactly_where_the_weights_get_no_gradient(auto, model_type, dropped):
    """Projection and module sites of the tiny family: those dropped are exactly those whose module's weights get
    no gradient from the logits (autograd on the unpatched model)."""
    torch.manual_seed(0)
    model = getattr(transformers, auto).from_config(tiny_config(model_type)).eval()
    _, args, kwargs = build_example_inputs(model)
    cap = capture(model, (args, kwargs))
    kept, dead = without_dead(_sites(model, cap), cap)
    assert {s.base_key for s in dead if s.path is not None} == dropped
    model(*args, **kwargs).logits.sum().backward()

    def trained(path: str) -> bool:
        return any(p.grad is not None and p.grad.any() for p in model.get_submodule(path).parameters())

    assert [s.base_key for s in dead if s.path is not None and trained(s.path)] == []
    assert {s.base_key for s in kept} & dropped == set()
    if model_type == "rwkv":  # (Gemma 3's tiny random tower: gradients vanish in its soft-embedding norm)
        assert [s.base_key for s in kept if s.path is not None and any(True for _ in model.get_submodule(
            s.path).parameters()) and not trained(s.path)] == []


def test_reduction_with_the_last_element_renames_it():
    """`expand_paths` with a list captured as [0, last]: element 1 of the short list is the full list's last."""
    from vlpet_fx.analysis.discover import expand_paths

    red = Reduction(lists={"m.layers": 5}, kept={"m.layers": 1}, representative={"m.layers": {1: 0, 2: 0, 3: 0}},
                    tail={"m.layers"})
    got = expand_paths(["m.norm", "m.layers.0.ln", "m.layers.1.ln", "m.layers.1"], red)
    assert sorted(got) == sorted(["m.norm", "m.layers.0.ln", "m.layers.1.ln", "m.layers.2.ln", "m.layers.3.ln",
                                  "m.layers.4.ln", "m.layers.4"])
    plain = Reduction(lists={"m.layers": 3}, kept={"m.layers": 1}, representative={"m.layers": {1: 0, 2: 0}})
    assert sorted(expand_paths(["m.layers.0.ln"], plain)) == ["m.layers.0.ln", "m.layers.1.ln", "m.layers.2.ln"]
