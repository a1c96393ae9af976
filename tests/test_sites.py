"""One identity per site, and packed (fused q/k/v) projections as slice sites.

* a gated MLP's two input projections are two sites (roles gate/up), two placements, two modules; the eager and
  the graph back ends change the same projection for the same plan;
* methods placed on q, k or v of a packed matrix change only that slice: identity at init, equal to an
  independent computation (the slice's rows of the weight changed by LoRA's B·A), eager == graph (outputs
  and gradients), and what cannot work is refused when planning, in one line.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import vlpet_fx
from toy_patterns import build
from vlpet_fx.analysis import Site, SiteTable
from vlpet_fx.rules import parse_rules
from vlpet_fx.zoo import build_model


def rules(text: str):
    return parse_rules(text)


def perturb(model: nn.Module, scale: float = 0.05) -> None:
    """Move every trainable (PET) parameter off its initial value, deterministically."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def pets(model: nn.Module) -> dict[tuple, nn.Module]:
    """The PET modules of a patched model by placement key, for either back end."""
    if isinstance(model, torch.fx.GraphModule):
        out = {}
        for name, child in model.named_children():
            if name.startswith("vlpet_"):
                out[model.vlpet_plan.placements[int(name.split("_")[1])].key] = child.pet
        return out
    return {p.key: model.get_submodule(path) for path, p in model.vlpet_patch.attached.items()}


def copy_pets(src: nn.Module, dst: nn.Module) -> None:
    a, b = pets(src), pets(dst)
    assert sorted(a) == sorted(b)
    for k, mod in a.items():
        b[k].load_state_dict(mod.state_dict())


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{k}/{n}": p.grad for k, mod in pets(model).items() for n, p in mod.named_parameters()}


# ---- one identity --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mt5():
    m = build_model("mt5", "tiny").eval()
    return m, vlpet_fx.discover(m)


def test_gated_mlp_projections_are_distinct_sites(mt5):
    m, table = mt5
    ffn = table.where(block="ffn")
    n_ffn = len({(s.stack, s.layer) for s in ffn})
    assert n_ffn == 4
    assert len(ffn.where(role="gate")) == len(ffn.where(role="up")) == n_ffn
    for s in ffn.where(role="gate"):  # T5's gated-gelu: wi_0 goes through the activation, wi_1 does not
        assert s.path.endswith("DenseReluDense.wi_0") and s.key == f"{s.stack}.{s.layer}.ffn.gate"
    assert len(set(table.keys())) == len(table)


def test_gated_mlp_gets_one_placement_per_projection(mt5):
    m, table = mt5
    plan = vlpet_fx.plan(m, rules("name: g\nmethods: {l: {type: lora, rank: 2}}\n"
                                  "rules: [{select: {block: ffn, role: in}, insert: l, placement: parallel}]"),
                         table=table)
    assert len(plan.placements) == 8  # gate + up of 4 FFNs
    assert len({p.key for p in plan.placements}) == 8
    assert len({(p.site.path, p.attach_name) for p in plan.placements}) == 8
    doc = json.loads(json.dumps(plan.to_full_dict()))
    assert [d["key"] for d in doc["placements_detail"]] == [p.site.key for p in plan.placements]
    patched = vlpet_fx.patch(copy.deepcopy(m), plan)
    assert len(patched.vlpet_patch.attached) == 8


def test_eager_and_graph_change_the_same_gated_projection(mt5):
    m, _ = mt5
    gate_only = rules("name: g\nmethods: {l: {type: lora, rank: 2}}\n"
                      "rules: [{select: {stack: encoder, block: ffn, role: gate}, insert: l, placement: parallel}]")
    eager = vlpet_fx.patch(copy.deepcopy(m), gate_only)
    assert sorted(eager.vlpet_patch.attached) == [f"encoder.block.{i}.layer.1.DenseReluDense.wi_0.pet_gate_parallel"
                                                  for i in range(2)]
    perturb(eager)
    graph = vlpet_fx.patch(copy.deepcopy(m), gate_only, backend="graph")
    copy_pets(eager, graph)
    from vlpet_fx.capture.inputs import build_example_inputs

    _, _, kw = build_example_inputs(m)
    base = m(**kw).logits
    out_e, out_g = eager(**kw).logits, graph(**kw).logits
    assert not torch.allclose(out_e, base)
    torch.testing.assert_close(out_e, out_g, rtol=1e-5, atol=1e-6)
    # the same change on `up` instead gives another model: the back ends did not just agree by accident
    up_only = rules("name: u\nmethods: {l: {type: lora, rank: 2}}\n"
                    "rules: [{select: {stack: encoder, block: ffn, role: up}, insert: l, placement: parallel}]")
    other = vlpet_fx.patch(copy.deepcopy(m), up_only)
    for mod, src in zip(pets(other).values(), pets(eager).values()):
        mod.load_state_dict(src.state_dict())
    assert not torch.allclose(other(**kw).logits, out_e)


def test_seeds_differ_between_the_two_projections(mt5):
    m, table = mt5
    from vlpet_fx.passes import build_pet

    plan = vlpet_fx.plan(m, rules("name: g\nmethods: {l: {type: lora, rank: 2}}\n"
                                  "rules: [{select: {stack: encoder, layers: [0], block: ffn, role: in}, "
                                  "insert: l, placement: parallel}]"), table=table)
    a, b = (build_pet(p).lora_A.weight for p in plan.placements)
    assert not torch.equal(a, b)


def test_table_lookup_never_guesses():
    twin = dict(stack="encoder", layer=0, block="ffn", role="in", in_features=4, out_features=8)
    table = SiteTable([Site(path="m.a", **twin), Site(path="m.b", **twin)])
    assert table.keys() == ["encoder.0.ffn.in@m.a", "encoder.0.ffn.in@m.b"]
    with pytest.raises(KeyError, match="2 sites are encoder.0.ffn.in"):
        table.get("encoder", 0, "ffn", "in")
    assert table["encoder.0.ffn.in@m.b"].path == "m.b"
    # a sub-table keeps the keys of the table it came from
    assert table.where(path="m.b").keys() == ["encoder.0.ffn.in@m.b"]


# ---- packed projections: slice sites -------------------------------------------------------------------------

PACKED = ["fused", "conv1d", "interleaved"]
D = 32


@pytest.fixture(scope="module", params=PACKED)
def packed(request):
    m = build(request.param, d=D, depth=2)
    return request.param, m, vlpet_fx.discover(m, m.example_inputs())


def test_packed_qkv_are_slice_sites(packed):
    kind, m, table = packed
    want = {"fused": [[0, 32], [32, 64], [64, 96]], "conv1d": [[0, 32], [32, 64], [64, 96]],
            # per head h (4 heads of 8): [q_h | k_h | v_h], 24 channels a head
            "interleaved": [[0, 8, 24, 4], [8, 16, 24, 4], [16, 24, 24, 4]]}[kind]
    for layer in range(2):
        sites = [table.get("encoder", layer, "self_attn", r) for r in "qkv"]
        assert [s.public()["out_slice"] for s in sites] == want
        assert {s.path for s in sites} == {f"layers.{layer}.att.{'packed' if kind == 'interleaved' else 'qkv'}"}
        assert all((s.in_features, s.out_features) == (D, D) for s in sites)


SLICE_RULES = """
name: slices
methods:
  lo: {type: lora, rank: 4}
  ad: {type: adapter, reduction: 4}
  val: {type: vlpet, dim: 8, heads: 1, gate: none}   # VL-PET's value adapter
rules:
  - {select: {role: q}, insert: lo, placement: parallel}
  - {select: {role: k}, insert: ad, placement: parallel}
  - {select: {role: v}, insert: val, placement: parallel}
"""


AFTER_RULES = """
name: slices-after
methods:
  big: {type: vlpet, dim: 8, heads: 2, gate: large, gate_dim: 4}   # gate reads the block input X
  ad: {type: adapter, reduction: 4}
rules:
  - {select: {role: q}, insert: big}
  - {select: {role: v}, insert: ad}
"""


def test_slice_methods_are_identity_at_init_in_both_back_ends(packed):
    kind, m, table = packed
    (x,) = m.example_inputs()
    base = m(x)
    eager = vlpet_fx.patch(copy.deepcopy(m), rules(SLICE_RULES), example_inputs=(x,))
    assert len(eager.vlpet_patch.attached) == 6
    assert torch.equal(eager(x), base)
    graph = vlpet_fx.patch(copy.deepcopy(m), rules(SLICE_RULES), backend="graph", example_inputs=(x,))
    torch.testing.assert_close(graph(x), base, rtol=0, atol=1e-6)


@pytest.mark.parametrize("text", [SLICE_RULES, AFTER_RULES], ids=["parallel", "after"])
def test_slice_methods_agree_between_back_ends_outputs_and_grads(packed, text):
    kind, m, table = packed
    (x,) = m.example_inputs()
    eager = vlpet_fx.patch(copy.deepcopy(m), rules(text), example_inputs=(x,))
    perturb(eager)
    graph = vlpet_fx.patch(copy.deepcopy(m), rules(text), backend="graph", example_inputs=(x,))
    copy_pets(eager, graph)
    out_e, out_g = eager(x), graph(x)
    assert not torch.allclose(out_e, m(x), atol=1e-4)
    torch.testing.assert_close(out_e, out_g, rtol=1e-5, atol=1e-6)
    out_e.square().mean().backward()
    out_g.square().mean().backward()
    ge, gg = grads(eager), grads(graph)
    # per layer: lora A,B + adapter down/up + vlpet down/up (4) ; or vlpet with its large gate (8) + adapter (4)
    assert sorted(ge) == sorted(gg) and len(ge) == 2 * (10 if text is SLICE_RULES else 12)
    for k in ge:
        assert ge[k] is not None and ge[k].abs().sum() > 0, k
        torch.testing.assert_close(ge[k], gg[k], rtol=1e-4, atol=1e-7)


def test_lora_on_a_slice_equals_changing_that_slice_of_the_weight(packed):
    """Independent check: LoRA on q (or v) of a packed matrix == the base model with ΔW = s·B·A added to
    exactly the weight columns that make q (v), computed here from the slice, not by the library."""
    kind, m, table = packed
    (x,) = m.example_inputs()
    for role in "qv":
        patched = vlpet_fx.patch(copy.deepcopy(m), rules(
            f"name: r\nmethods: {{l: {{type: lora, rank: 4}}}}\n"
            f"rules: [{{select: {{role: {role}}}, insert: l, placement: parallel}}]"), example_inputs=(x,))
        perturb(patched)
        ref = copy.deepcopy(m)
        for layer in range(2):
            site = table.get("encoder", layer, "self_attn", role)
            sl = site.out_slice
            cols = (list(range(sl[0], sl[1])) if len(sl) == 2 else
                    [h * sl[2] + c for h in range(sl[3]) for c in range(sl[0], sl[1])])
            pet = patched.get_submodule(f"{site.path}.{'pet_' + role}_{'_'.join(map(str, sl))}_parallel")
            delta = (pet.lora_B.weight @ pet.lora_A.weight) * pet.scaling  # (slice width, in)
            packed_mod = ref.get_submodule(site.path)
            with torch.no_grad():
                if kind == "conv1d":  # weight stored (in, out)
                    packed_mod.weight[:, cols] += delta.T
                else:
                    packed_mod.weight[cols, :] += delta
        torch.testing.assert_close(patched(x), ref(x), rtol=1e-5, atol=1e-5)


def test_after_on_a_slice_changes_only_that_slice():
    m = build("fused", d=D, depth=1)
    (x,) = m.example_inputs()
    patched = vlpet_fx.patch(copy.deepcopy(m), rules(
        "name: a\nmethods: {ad: {type: adapter, reduction: 4, zero_init_up: false}}\n"
        "rules: [{select: {role: v}, insert: ad}]"), example_inputs=(x,))
    seen = {}
    patched.layers[0].att.qkv.register_forward_hook(lambda mod, a, y: seen.setdefault("y", y))
    m.layers[0].att.qkv.register_forward_hook(lambda mod, a, y: seen.setdefault("base", y))
    patched(x)
    m(x)
    y, base = seen["y"], seen["base"]
    assert torch.equal(y[..., :64], base[..., :64])  # q and k untouched
    pet = patched.layers[0].att.qkv.pet_v_64_96_after
    torch.testing.assert_close(y[..., 64:], base[..., 64:] + pet.delta(base[..., 64:]))


def test_merged_export_folds_a_slice_lora_into_its_rows():
    from vlpet_fx.export.merged import merge

    m = build("fused", d=D, depth=1)
    (x,) = m.example_inputs()
    patched = vlpet_fx.patch(copy.deepcopy(m), rules(
        "name: r\nmethods: {l: {type: lora, rank: 4}}\nrules: [{select: {role: k}, insert: l, placement: parallel}]"),
        example_inputs=(x,))
    perturb(patched)
    want = patched(x)
    merge(patched)
    torch.testing.assert_close(patched(x), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(patched.layers[0].att.qkv.weight[:32], m.layers[0].att.qkv.weight[:32])


def test_packed_in_proj_slices_run_in_the_graph_back_end():
    """nn.MultiheadAttention's in_proj_weight: q/k/v are slices of one op's output, not module outputs."""
    m = build_model("torch-transformer", "tiny").eval()
    r = rules("name: p\nmethods: {a: {type: adapter, reduction: 4}}\n"
              "rules: [{select: {stack: encoder, block: self_attn, role: v}, insert: a, placement: parallel}]")
    table = vlpet_fx.discover(m)
    assert [s.public()["out_slice"] for s in table.where(stack="encoder", layer=0, block="self_attn",
                                                         role=["q", "k", "v"])] == [[0, 64], [64, 128], [128, 192]]
    from vlpet_fx.capture.inputs import build_example_inputs

    _, args, kw = build_example_inputs(m)
    gm = vlpet_fx.patch(m, r, backend="graph")
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        torch.testing.assert_close(gm(*args, **kw), m(*args, **kw), rtol=0, atol=1e-6)
        perturb(gm)
        assert not torch.allclose(gm(*args, **kw), m(*args, **kw), atol=1e-4)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def test_fused_gated_mlp_halves_are_slice_sites_and_patchable():
    m = build("alibi", d=D, depth=2, mlp="fused")
    (x,) = m.example_inputs()
    table = vlpet_fx.discover(m, (x,))
    ffn = {s.role: (s.path, s.out_slice) for s in table.where(layer=1, block="ffn")}
    # chunk(2): the first half is multiplied as is (up), the second passes gelu (gate)
    assert ffn == {"gate": ("layers.1.mlp.both", (64, 128)), "up": ("layers.1.mlp.both", (0, 64)),
                   "out": ("layers.1.mlp.drop", None), "output": ("layers.1.mlp", None)}
    r = rules("name: f\nmethods: {l: {type: lora, rank: 2}}\n"
              "rules: [{select: {role: gate}, insert: l, placement: parallel}]")
    eager = vlpet_fx.patch(copy.deepcopy(m), r, example_inputs=(x,))
    assert torch.equal(eager(x), m(x))
    perturb(eager)
    ref = copy.deepcopy(m)
    with torch.no_grad():
        for layer in range(2):
            pet = eager.get_submodule(f"layers.{layer}.mlp.both.pet_gate_64_128_parallel")
            ref.layers[layer].mlp.both.weight[64:] += (pet.lora_B.weight @ pet.lora_A.weight) * pet.scaling
    torch.testing.assert_close(eager(x), ref(x), rtol=1e-5, atol=1e-5)
    graph = vlpet_fx.patch(copy.deepcopy(m), r, backend="graph", example_inputs=(x,))
    copy_pets(eager, graph)
    torch.testing.assert_close(graph(x), eager(x), rtol=1e-5, atol=1e-6)


# ---- refusals at plan time -----------------------------------------------------------------------------------

def test_parallel_on_a_block_output_is_refused_when_planning():
    m = build_model("bart", "tiny")
    r = rules("name: p\nmethods: {a: {type: adapter}}\n"
              "rules: [{select: {block: ffn, role: output}, insert: a, placement: parallel}]")
    with pytest.raises(vlpet_fx.RulesError) as err:
        vlpet_fx.plan(m, r)
    msg = str(err.value)
    assert "\n" not in msg and "placement: after" in msg and "encoder.0.ffn.output" in msg


def test_full_finetune_of_a_slice_is_refused_when_planning(packed):
    kind, m, table = packed
    r = rules("name: n\nrules: [{select: {role: q}, insert: none}]")
    with pytest.raises(vlpet_fx.RulesError, match="slice") as err:
        vlpet_fx.plan(m, r, table=table)
    assert "\n" not in str(err.value)


def test_two_modules_with_one_name_are_refused_when_planning():
    """Two sites of one role on one module (a module called twice) would put two PET modules under one name."""
    twin = dict(stack="encoder", layer=0, block="ffn", role="in", path="layers.0.mlp.a", in_features=D,
                out_features=2 * D)
    table = SiteTable([Site(**twin), Site(**twin)], model="twice")
    assert table.keys() == ["encoder.0.ffn.in@layers.0.mlp.a#1", "encoder.0.ffn.in@layers.0.mlp.a#2"]
    r = rules("name: t\nmethods: {l: {type: lora, rank: 2}}\n"
              "rules: [{select: {role: in}, insert: l, placement: parallel}]")
    with pytest.raises(vlpet_fx.RulesError, match="share the name layers.0.mlp.a.pet_in_parallel"):
        vlpet_fx.plan(build("fused", d=D, depth=1, gated=False), r, table=table)
    with pytest.raises(ValueError, match="share the key"):
        SiteTable([Site(**twin, key="k"), Site(**twin, key="k")])


def test_gpt2_conv1d_c_attn_is_sliced_and_patchable():
    """GPT-2's c_attn (HF Conv1D: addmm with an (in, out) weight) makes q, k and v: three slice sites."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0,
                        eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    m = tf.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 8))
    inputs = ((), {"input_ids": ids, "use_cache": False})
    table = vlpet_fx.discover(m, inputs)
    q, k, v = (table.get(table.stacks()[0], 1, "self_attn", r) for r in "qkv")
    assert {q.path, k.path, v.path} == {"transformer.h.1.attn.c_attn"}
    assert [q.out_slice, k.out_slice, v.out_slice] == [(0, 32), (32, 64), (64, 96)]
    # c_fc → gelu_new written out (x · (1 + tanh(...))) → c_proj: a plain MLP, not a fused gate
    assert {s.role: s.path for s in table.where(layer=1, block="ffn")} == {
        "in": "transformer.h.1.mlp.c_fc", "out": "transformer.h.1.mlp.c_proj", "output": "transformer.h.1.mlp"}
    r = rules("name: g\nmethods: {l: {type: lora, rank: 4}}\n"
              "rules: [{select: {role: [q, v]}, insert: l, placement: parallel}]")
    base = m(**inputs[1]).logits
    eager = vlpet_fx.patch(copy.deepcopy(m), r, table=table)
    assert torch.equal(eager(**inputs[1]).logits, base)
    perturb(eager)
    graph = vlpet_fx.patch(copy.deepcopy(m), r, backend="graph", example_inputs=inputs)
    copy_pets(eager, graph)
    torch.testing.assert_close(eager(**inputs[1]).logits, graph(**inputs[1]).logits, rtol=1e-5, atol=1e-5)


# ---- tiny Hugging Face models built from configs (offline) -----------------------------------------------------

def _hf(name):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    return {
        "umt5": lambda: tf.UMT5ForConditionalGeneration(tf.UMT5Config(
            vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)),
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**common, num_key_value_heads=2)),
        "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**common)),
        "bloom": lambda: tf.BloomForCausalLM(tf.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)),
        "falcon": lambda: tf.FalconForCausalLM(tf.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                               num_attention_heads=4)),
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**common, pad_token_id=0)),
    }[name]().eval()


# family -> (site of layer 1 -> (path suffix, out_slice, out_features)); from the configs: d = 32, 4 heads of 8,
# FFN width 64 (bloom: 4·d = 128, falcon: 4·d = 128)
HF_SITES = {
    "umt5": {"ffn.gate": ("DenseReluDense.wi_0", None, 64), "ffn.up": ("DenseReluDense.wi_1", None, 64)},
    "llama": {"self_attn.k": ("self_attn.k_proj", None, 16),  # 2 kv heads
              "ffn.gate": ("mlp.gate_proj", None, 64), "ffn.up": ("mlp.up_proj", None, 64)},
    # per-head packing [q_h k_h v_h], rotary on a quarter of each head (partial rotary)
    "gpt_neox": {"self_attn.q": ("attention.query_key_value", (0, 8, 24, 4), 32),
                 "self_attn.v": ("attention.query_key_value", (16, 24, 24, 4), 32)},
    # baddbmm with the ALiBi bias; per-head packing
    "bloom": {"self_attn.q": ("self_attention.query_key_value", (0, 8, 24, 4), 32),
              "self_attn.k": ("self_attention.query_key_value", (8, 16, 24, 4), 32)},
    # multi-query: [q (4 heads) | k (1 head) | v (1 head)], k and v picked by a constant gather
    "falcon": {"self_attn.q": ("self_attention.query_key_value", (0, 32), 32),
               "self_attn.k": ("self_attention.query_key_value", (32, 40), 8),
               "self_attn.v": ("self_attention.query_key_value", (40, 48), 8)},
    # packed qkv and a fused gate_up matrix (chunk: gate first)
    "phi3": {"self_attn.v": ("self_attn.qkv_proj", (64, 96), 32),
             "ffn.gate": ("mlp.gate_up_proj", (0, 64), 64), "ffn.up": ("mlp.gate_up_proj", (64, 128), 64)},
}


@pytest.mark.parametrize("family", sorted(HF_SITES))
def test_hf_patterns(family):
    m = _hf(family)
    inputs = None if family == "umt5" else ((), {"input_ids": torch.randint(0, 64, (2, 8)), "use_cache": False})
    table = vlpet_fx.discover(m, inputs, name=family)
    stack = "encoder" if family == "umt5" else None
    assert len(set(table.keys())) == len(table)
    for what, (suffix, out_slice, width) in HF_SITES[family].items():
        block, role = what.split(".")
        found = [s for s in table.where(block=block, role=role) if (stack is None or s.stack == stack)
                 and s.layer_path and s.layer_path.endswith(".1") and not s.layer_path.startswith("decoder")]
        assert len(found) == 1, (family, what, [str(s) for s in found])
        (s,) = found
        assert s.path.endswith(suffix) and s.out_slice == out_slice and s.out_features == width, (family, str(s))


def test_gpt_neox_interleaved_slices_agree_between_back_ends():
    m = _hf("gpt_neox")
    kw = {"input_ids": torch.randint(0, 64, (2, 8)), "use_cache": False}
    r = rules("name: n\nmethods: {l: {type: lora, rank: 2}, a: {type: adapter, reduction: 4}}\nrules:\n"
              "  - {select: {role: q}, insert: l, placement: parallel}\n"
              "  - {select: {role: v}, insert: a, placement: parallel}\n")
    eager = vlpet_fx.patch(copy.deepcopy(m), r, example_inputs=((), kw))
    assert torch.equal(eager(**kw).logits, m(**kw).logits)
    perturb(eager)
    graph = vlpet_fx.patch(copy.deepcopy(m), r, backend="graph", example_inputs=((), kw))
    copy_pets(eager, graph)
    out_e, out_g = eager(**kw).logits, graph(**kw).logits
    assert not torch.allclose(out_e, m(**kw).logits, atol=1e-4)
    torch.testing.assert_close(out_e, out_g, rtol=1e-5, atol=1e-5)


# ---- a module called more than once is one site ---------------------------------------------------------------

class TwoStreamLayer(nn.Module):
    """One attention and one FFN (and their norms) applied to two token streams: each module is called twice
    per layer (Pegasus-X's encoder feeds its tokens and its global tokens through one FFN)."""

    def __init__(self, d: int):
        super().__init__()
        self.n1 = nn.LayerNorm(d)
        self.att = ATTENTION_FOR_TESTS(d)
        self.n2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def ffn(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(self.n2(x))))

    def forward(self, x, g):
        x, g = x + self.att(self.n1(x)), g + self.att(self.n1(g))
        return x + self.ffn(x), g + self.ffn(g)


def ATTENTION_FOR_TESTS(d: int) -> nn.Module:
    from toy_patterns import AlibiAttention

    return AlibiAttention(d, 4)


class TwoStreams(nn.Module):
    def __init__(self, d: int = D, depth: int = 2, vocab: int = 40):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.emb_g = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(TwoStreamLayer(d) for _ in range(depth))
        self.head = nn.Linear(d, vocab)
        self.vocab = vocab

    def forward(self, ids):
        x, g = self.emb(ids), self.emb_g(ids)
        for layer in self.layers:
            x, g = layer(x, g)
        return self.head(x + g)

    def example_inputs(self):
        return (torch.randint(0, self.vocab, (2, 6), generator=torch.Generator().manual_seed(0)),)


@pytest.fixture(scope="module")
def two_streams():
    torch.manual_seed(0)
    m = TwoStreams().eval()
    return m, vlpet_fx.discover(m, m.example_inputs())


def test_a_module_called_twice_is_one_site_with_two_calls(two_streams):
    m, table = two_streams
    ffn = table.where(layer=1, block="ffn")
    assert sorted(s.role for s in ffn) == ["in", "out", "output"]  # not in×2 out×2 output×2
    assert {s.key for s in ffn} == {"encoder.1.ffn.in", "encoder.1.ffn.out", "encoder.1.ffn.output"}
    for s in ffn:
        assert len(s.call_nodes()) == 2 and len({c.node for c in s.call_nodes()}) == 2
    assert table.get("encoder", 1, "ffn", "output").path == "layers.1.fc2"
    assert len(table) == len(set(table.keys())) == 2 * (5 + 3)
    # X of each FFN call is handed to its own call of the norm; both attention calls read X that enters through
    # one call of the layer, so the eager back end could not hand each its own X: not tied
    assert table.get("encoder", 1, "ffn", "output").input_path == "layers.1.n2"
    att = table.get("encoder", 0, "self_attn", "output")
    assert len(att.call_nodes()) == 2 and att.input_path is None


def _by_hand(m: TwoStreams, ids, pets: dict[int, nn.Module]) -> torch.Tensor:
    """The forward of TwoStreams with ``pets[i]`` applied after layer i's FFN, at both of its calls."""
    x, g = m.emb(ids), m.emb_g(ids)
    for i, layer in enumerate(m.layers):
        x, g = x + layer.att(layer.n1(x)), g + layer.att(layer.n1(g))
        x, g = x + pets[i](layer.ffn(x)), g + pets[i](layer.ffn(g))
    return m.head(x + g)


def test_a_module_called_twice_gets_one_pet_module_applied_at_every_call(two_streams):
    """A rule on the FFN output gives one placement per layer (not a name clash); its module changes both calls,
    as an independent computation says, and the graph back end agrees with the eager one."""
    m, table = two_streams
    r = rules("name: a\nmethods: {a: {type: adapter, reduction: 4}}\n"
              "rules: [{select: {block: ffn, role: output}, insert: a, placement: after}]")
    plan = vlpet_fx.plan(m, r, table=table)
    assert [p.site.key for p in plan.placements] == ["encoder.0.ffn.output", "encoder.1.ffn.output"]
    (ids,) = m.example_inputs()
    eager = vlpet_fx.patch(copy.deepcopy(m), plan)
    perturb(eager)
    modules = {p.site.layer: eager.get_submodule(path) for path, p in eager.vlpet_patch.attached.items()}
    with torch.no_grad():
        want = _by_hand(m, ids, modules)
        torch.testing.assert_close(eager(ids), want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(want, m(ids), atol=1e-4)  # the modules do change the output
    graph = vlpet_fx.patch(copy.deepcopy(m), r, backend="graph", example_inputs=(ids,))
    copy_pets(eager, graph)
    torch.testing.assert_close(graph(ids), eager(ids), rtol=1e-5, atol=1e-5)


def test_a_gate_reading_x_at_every_call_eager_equals_graph(two_streams):
    """VL-PET's gate reads the block input X of each call (the tokens for the first, the other stream for the
    second): the eager pre-hook and the graph's per-call X agree; LoRA on the called-twice fc1 too."""
    m, table = two_streams
    r = rules("name: v\nmethods: {v: {type: vlpet, dim: 8, heads: 1, gate: large, gate_dim: 4},"
              " l: {type: lora, rank: 2}}\n"
              "rules: [{select: {block: ffn, role: output}, insert: v, placement: after},"
              " {select: {block: ffn, role: in}, insert: l, placement: parallel}]")
    (ids,) = m.example_inputs()
    eager = vlpet_fx.patch(copy.deepcopy(m), r, table=table)
    perturb(eager)
    graph = vlpet_fx.patch(copy.deepcopy(m), r, backend="graph", example_inputs=(ids,))
    copy_pets(eager, graph)
    with torch.no_grad():
        torch.testing.assert_close(graph(ids), eager(ids), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(eager(ids), m(ids), atol=1e-4)


# ---- a site's module must return the site's value; shapes are checked when planning ---------------------------

class NarrowingMix(nn.Module):
    """A map lift → act → back to the input's width, used as a gate inside the module, which returns a
    narrower mix: its module's output is not the map's value (a hyper-connection mixer)."""

    def __init__(self, d: int):
        super().__init__()
        self.down = nn.Linear(2 * d, 8)
        self.up = nn.Linear(8, 2 * d)

    def forward(self, h):
        w = torch.sigmoid(self.up(nn.functional.silu(self.down(h))))
        return (w * h).unflatten(-1, (2, -1)).mean(-2)


class MixLayer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.mix = NarrowingMix(d)
        self.n = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, h):
        x = self.mix(h)
        x = x + self.mlp(self.n(x))
        return torch.cat([x, h[..., x.shape[-1]:]], dim=-1)


class MixModel(nn.Module):
    def __init__(self, d: int = D, vocab: int = 40):
        super().__init__()
        self.emb = nn.Embedding(vocab, 2 * d)
        self.layers = nn.ModuleList(MixLayer(d) for _ in range(2))
        self.vocab = vocab

    def forward(self, ids):
        h = self.emb(ids)
        for layer in self.layers:
            h = layer(h)
        return h

    def example_inputs(self):
        return (torch.randint(0, self.vocab, (2, 6), generator=torch.Generator().manual_seed(0)),)


def test_a_site_its_module_does_not_return_is_placed_through_its_anchor_as_the_graph_places_it():
    """The mixer's lift → act → back map is found as a feed-forward block, but its module returns a narrower
    value: the site keeps no module path (a hook on that module would change another value) and gets an anchor,
    the one module call that returns exactly the value; the eager back end places the method there and computes
    what the graph back end computes at the value itself (same weights, perturbed so the adapters act)."""
    torch.manual_seed(0)
    m = MixModel().eval()
    (ids,) = m.example_inputs()
    table = vlpet_fx.discover(m, (ids,))
    mixes = [s for s in table.where(role="output") if s.block_path and s.block_path.endswith(".mix")]
    assert mixes and all(s.path is None and s.out_features == 2 * D for s in mixes)
    assert all(s.anchor is not None and s.anchor.path.startswith(s.block_path + ".") for s in mixes)
    ffn = [s for s in table.where(role="output") if s not in mixes]
    assert ffn and all(s.path is not None for s in ffn)  # the real FFN keeps its module
    r = rules("name: a\nmethods: {a: {type: adapter, reduction: 4}}\n"
              "rules: [{select: {block: ffn, role: output}, insert: a, placement: after}]")
    plan = vlpet_fx.plan(m, r, table=table)
    eager = vlpet_fx.patch(copy.deepcopy(m), plan).eval()
    with pytest.warns(Warning):
        graph = vlpet_fx.patch(copy.deepcopy(m), r, backend="graph", example_inputs=(ids,))
    pe = [p for p in eager.parameters() if p.requires_grad]
    pg = [p for p in graph.parameters() if p.requires_grad]
    assert len(pe) == len(pg) == 4 * len(plan.placements)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a_, b_ in zip(pe, pg):  # both back ends list the placements in graph order
            v = torch.randn(a_.shape, generator=gen)
            a_.copy_(v)
            b_.copy_(v)
        out = eager(ids)
        assert (out - m(ids)).abs().max() > 1e-3  # the adapters act
        torch.testing.assert_close(out, graph(ids), rtol=0, atol=1e-6)


def test_a_gate_reading_x_of_another_width_is_refused_when_planning():
    """VL-PET's large gate is built for X of the site's width: on an FFN's input projection (2d wide, X is d
    wide) it would fail in the forward; the plan refuses it in one line."""
    m = build_model("bart", "tiny")
    r = rules("name: g\nmethods: {v: {type: vlpet, dim: 8, heads: 1, gate: large, gate_dim: 4}}\n"
              "rules: [{select: {stack: encoder, block: ffn, role: in}, insert: v, placement: after}]")
    with pytest.raises(vlpet_fx.RulesError, match="reads the block input X") as err:
        vlpet_fx.plan(m, r)
    msg = str(err.value)
    assert "\n" not in msg and "encoder.0.ffn.in" in msg and "gate: middleY or none" in msg


class _SharedDropout(nn.Module):
    """Attention whose one dropout module is called on the probabilities (width = tokens) and on the output
    (width = d), as XLNet's relative attention does."""

    def __init__(self, d=16):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        p = self.drop(torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1))
        return x + self.drop(self.o(p @ self.v(x)))


def test_a_module_called_on_values_of_other_widths_is_no_eager_site():
    """An eager hook acts on every call of its module: a site whose module also returns a value of another width
    (here the attention probabilities, 8 wide, through the dropout that also returns the 16-wide output) keeps
    only its graph node (path None), so the eager back end refuses it in one line instead of a shape error."""
    from vlpet_fx.analysis.sites import every_call_returns_width, module_exits
    from vlpet_fx.capture import capture

    model = _SharedDropout().eval()
    cap = capture(model, (torch.randn(2, 8, 16),))
    exits = module_exits(cap)["drop"]
    assert len(exits) == 2
    site = Site("encoder", 0, "self_attn", "output", "drop", 16, 16)
    assert not every_call_returns_width(site, exits)
    assert every_call_returns_width(Site("encoder", 0, "self_attn", "o", "o", 16, 16), module_exits(cap)["o"])
