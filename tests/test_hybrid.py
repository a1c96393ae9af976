"""Hybrid stacks: layers of several classes in one list, a gate computed inside a norm, a shared sub-layer whose
output feeds the next sub-layer instead of being added back (issue 12: jamba, olmo_hybrid, axk2, zamba2).

Expectations come from how the toy models (tests/toy_hybrid.py) and the families' forwards are written, never
from running discovery: the layer of every site is its index in the model's layer list, and the block input X
every VL-PET gate reads is recomputed from the layers' own inputs and sub-modules' outputs (forward hooks on
the patched model). The graph back end must compute what the eager one does; LoRA at init is the identity.
"""

from __future__ import annotations

import copy

import pytest
import torch

import vlpet_fx
from patched_checks import assert_trains_and_generates
from toy_hybrid import HybridLM, SharedLM, build
from vlpet_fx.rules import parse_rules

LORA = parse_rules("name: lora4\nmethods: {lora: {type: lora, rank: 4, alpha: 8}}\nrules: [{select: {block: "
                   "[self_attn, cross_attn], role: [q, v]}, insert: lora, placement: parallel}]\n")
RULES = "vlpet_causal_lm"
# VL-PET's value adapter (no gate, non-zero weights at init) in parallel to q and v
VALUE = parse_rules("name: value\nmethods: {value: {type: vlpet, dim: 8, heads: 1, gate: none, init: normal, "
                    "zero_init_up: false}}\nrules: [{select: {block: self_attn, role: [q, v]}, insert: value, "
                    "placement: parallel}]\n")


def _discovered(cls, **kw):
    m = build(cls, **kw)
    return m, vlpet_fx.discover(m, m.example_inputs())


@pytest.fixture(scope="module")
def hybrid():
    return _discovered(HybridLM, kinds="AMAM", gated_norm=True)


@pytest.fixture(scope="module")
def shared():
    return _discovered(SharedLM, depth=2)


def _first(out):
    if hasattr(out, "logits") and out.logits is not None:
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


def _layer_input(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _gate_inputs(model, layers, terms, run):
    """Run ``run()`` on the eager-patched ``model`` and compare the X every VL-PET gate read with its expected
    value: ``terms[(layer, path relative to the layer)]`` lists what X is the sum of ("in": the layer's input,
    else the output of that sub-module of the layer). Returns (the forward's output, the gates' (layer, path)
    checked, the gates' (layer, path) not in ``terms``)."""
    seen: dict = {}
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, kw, i=i: seen.__setitem__((i, "in"), _layer_input(a, kw)), with_kwargs=True))
        for name in {t for (j, _), ts in terms.items() if j == i for t in ts if t != "in"}:
            handles.append(layer.get_submodule(name).register_forward_hook(
                lambda m, a, out, i=i, name=name: seen.__setitem__((i, name), _first(out))))
    read = {}  # the X each gate really reads: its first input
    for path in model.vlpet_patch.attached:
        pet = model.get_submodule(path)
        if getattr(pet, "needs_block_input", False):
            handles.append(pet.gate.register_forward_pre_hook(lambda m, a, path=path: read.__setitem__(path, a[0])))
    try:
        with torch.no_grad():
            out = _first(run())
    finally:
        for h in handles:
            h.remove()
    prefix = {i: n for n, layer in model.named_modules() for i, lay in enumerate(layers) if layer is lay}
    checked, other = set(), set()
    for path, p in model.vlpet_patch.attached.items():
        pet = model.get_submodule(path)
        if not getattr(pet, "needs_block_input", False):
            continue
        i = p.site.layer
        rel = p.site.path[len(prefix[i]) + 1:]
        if (i, rel) not in terms:
            other.add((i, rel))
            continue
        want = sum(seen[(i, t)] for t in terms[(i, rel)])
        torch.testing.assert_close(read[path], want, rtol=1e-6, atol=1e-6, msg=lambda m: f"{p.site}: {m}")
        checked.add((i, rel))
    return out, checked, other


# ---- toy models ---------------------------------------------------------------------------------------------

def test_layers_of_several_classes_are_the_layers(hybrid):
    """``ModuleList([AttnLayer, MixerLayer, ...])``: every site's layer is its index in the list (not the
    blocks counted along the stream), and each layer has its own token mixer and FFN."""
    model, table = hybrid
    assert table.num_layers() == {"decoder": 4}
    for i, kind in enumerate("AMAM"):
        sites = table.where(stack="decoder", layer=i)
        assert sites and all(s.layer_path == f"layers.{i}" for s in sites), i
        assert all(s.path is None or s.path.startswith(f"layers.{i}.") for s in sites), i
        assert {s.block for s in sites} == ({"self_attn", "ffn"} if kind == "A" else {"mixer", "ffn"}), i


def test_homogeneous_list_inside_a_mixed_one_is_not_the_layer():
    """The tie-break keeps the innermost homogeneous list: a layer list of one class is the layers even when
    the blocks inside hold lists of several classes (the shared toy's layers hold no list; the plain hybrid's
    ``AA`` is homogeneous)."""
    _, table = _discovered(HybridLM, kinds="AA")
    assert {s.layer_path for s in table} == {"layers.0", "layers.1"}
    assert table.num_layers() == {"decoder": 2}


def _terms_hybrid():
    terms = {}
    for i, kind in enumerate("AMAM"):
        mix = "attn" if kind == "A" else "mix"
        terms[(i, mix)] = ("in",)
        terms[(i, "ffn")] = ("in", mix)
        if kind == "A":
            terms[(i, "n1.gate")] = ("in",)  # the gate MLP inside the norm reads the layer's input
    return terms


def _terms_shared():
    return {(0, "part.mix"): ("in",), (1, "shared.attn"): ("in",), (1, "shared.ffn"): ("shared.attn",),
            (1, "part.mix"): ("in",)}


@pytest.mark.parametrize("which", ["hybrid", "shared"])
def test_gates_read_the_stream_value_and_back_ends_agree(which, hybrid, shared):
    """Every VL-PET gate reads X: the layer's input for a token mixer and for the gate inside a norm, the
    layer's input plus the mixer's output for the FFN, and in a shared sub-layer that is not added back the value
    its sub-layer reads (the layer's input for the attention on ``cat(h, emb)``, the attention's output for the
    FFN after it). The graph back end computes the same; VL-PET changes the output and trains; LoRA at init is
    the identity."""
    model, table = {"hybrid": hybrid, "shared": shared}[which]
    terms = _terms_hybrid() if which == "hybrid" else _terms_shared()
    (ids,) = model.example_inputs()
    with torch.no_grad():
        reference = model(ids)
    plan = vlpet_fx.plan(model, RULES, table=table)
    eager = vlpet_fx.patch(copy.deepcopy(model), plan)
    out_e, checked, other = _gate_inputs(eager, eager.layers, terms, lambda: eager(ids))
    assert checked == set(terms) and not other, other
    assert not torch.allclose(out_e, reference)
    graph = vlpet_fx.patch(copy.deepcopy(model), plan, backend="graph", example_inputs=((ids,), {}))
    with torch.no_grad():
        torch.testing.assert_close(graph(ids), out_e, rtol=1e-5, atol=1e-5)
    eager(ids).sum().backward()
    trainable = [p for p in eager.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    lora = vlpet_fx.patch(copy.deepcopy(model), LORA, table=table)
    with torch.no_grad():
        torch.testing.assert_close(lora(ids), reference, rtol=1e-5, atol=1e-5)


# ---- transformers families (tiny configs) -------------------------------------------------------------------

# (layer, module path relative to the layer) -> what X is the sum of, from each family's forward
FAMILY_TERMS = {
    # attention layer, then a Mamba layer (mixture of experts on batched weights: one output site)
    "jamba": {(0, "self_attn"): ("in",), (0, "feed_forward"): ("in", "self_attn"), (1, "mamba"): ("in",),
              (1, "feed_forward"): ("in", "mamba")},
    # a gated delta-net layer (pre-norm), then a post-norm attention layer (x + norm(attn(x)))
    "olmo_hybrid": {(0, "linear_attn"): ("in",), (0, "mlp"): ("in", "linear_attn"),
                    (1, "post_attention_layernorm"): ("in",),
                    (1, "post_feedforward_layernorm"): ("in", "post_attention_layernorm")},
    # the input norm's low-rank gate MLP reads the layer's input
    "axk2": {(0, "input_layernorm.mlp"): ("in",), (0, "self_attn"): ("in",), (0, "mlp"): ("in", "self_attn")},
    # a Mamba layer, then a hybrid layer: the shared transformer (attention on cat(h, emb), FFN on its output, no
    # residual) feeds the Mamba layer's input
    "zamba2": {(0, "mamba"): ("in",), (1, "shared_transformer.self_attn"): ("in",),
               (1, "shared_transformer.feed_forward"): ("shared_transformer.self_attn",),
               (1, "mamba_decoder.mamba"): ("in",)},
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILY_TERMS))
def test_hybrid_families(family):
    transformers = pytest.importorskip("transformers")
    from vlpet_fx.capture.inputs import build_example_inputs
    from vlpet_fx.zoo.tiny import tiny_config

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    table = vlpet_fx.discover(model, name=family)
    layers = model.model.layers
    assert table.num_layers() == {"decoder": len(layers)}, family
    for i in range(len(layers)):
        sites = table.where(stack="decoder", layer=i)
        assert sites and all(s.layer_path == f"model.layers.{i}" for s in sites), (family, i)
    _, args, kwargs = build_example_inputs(model)
    with torch.no_grad():
        reference = _first(model(*args, **kwargs))
    lora = vlpet_fx.patch(copy.deepcopy(model), "lora", table=table)
    with torch.no_grad():
        torch.testing.assert_close(_first(lora(*args, **kwargs)), reference, rtol=1e-5, atol=1e-5)
    plan = vlpet_fx.plan(model, RULES, table=table)
    patched = vlpet_fx.patch(copy.deepcopy(model), plan)
    terms = FAMILY_TERMS[family]
    out, checked, _ = _gate_inputs(patched, patched.model.layers, terms, lambda: patched(*args, **kwargs))
    assert checked == set(terms), (family, set(terms) - checked)
    assert not torch.allclose(out, reference), family
    assert_trains_and_generates(patched, _first(patched(*args, **kwargs)), kwargs, family)


def test_a_block_shared_by_several_layers_is_one_site():
    """One shared block called by two layers (``layers.1.shared`` is ``layers.2.shared``): each of its modules is
    one site under the name ``named_modules()`` gives it, with both calls; LoRA there is the identity at init, and
    a PET module with non-zero weights applies at both calls alike in both back ends. Its attention's X is another
    value at each call, read by no one module: VL-PET's gate there is refused in one line."""
    model, table = _discovered(SharedLM, depth=3)
    assert model.layers[1].shared is model.layers[2].shared
    names = dict(model.named_modules())
    q = table.where(block="self_attn", role="q")
    assert len(q) == 1 and q[0].path == "layers.1.shared.attn.q" and len(q[0].calls) == 2
    assert all(s.path is None or s.path in names for s in table)
    (ids,) = model.example_inputs()
    with torch.no_grad():
        reference = model(ids)
        torch.testing.assert_close(vlpet_fx.patch(copy.deepcopy(model), LORA, table=table)(ids), reference,
                                   rtol=1e-5, atol=1e-5)
    plan = vlpet_fx.plan(model, VALUE, table=table)
    assert [p.site.key for p in plan.placements] == ["decoder.1.self_attn.q", "decoder.1.self_attn.v"]
    eager = vlpet_fx.patch(copy.deepcopy(model), plan)
    graph = vlpet_fx.patch(copy.deepcopy(model), plan, backend="graph", example_inputs=((ids,), {}))
    with torch.no_grad():
        out_e = eager(ids)
        assert not torch.allclose(out_e, reference)
        torch.testing.assert_close(graph(ids), out_e, rtol=1e-5, atol=1e-5)
    with pytest.raises(vlpet_fx.PlanError, match="reads the block input") as err:
        vlpet_fx.patch(copy.deepcopy(model), RULES, table=table)
    assert "\n" not in str(err.value)
