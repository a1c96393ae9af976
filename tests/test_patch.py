"""The rewrite, checked against the unpatched model: identity at init, trainable counts by formula,
eager == graph back end, and HF features (generate with cache, save_pretrained, checkpointing, autocast)."""

from __future__ import annotations

import copy

import pytest
import torch

import vlpet_fx
from toy import ToySeq2Seq
from vlpet_fx.rules import parse_rules
from vlpet_fx.zoo import build_model

IDENTITY_RULES = """
name: identity
methods:
  ad: {type: adapter, reduction: 4}
  mid: {type: vlpet, dim: 8, heads: 2, gate: middleY, zero_init_up: true, zero_init_gate: true}
  lo: {type: lora, rank: 4}
rules:
  - {name: enc-out, select: {stack: [encoder, visual], role: output}, insert: mid, optional: true}
  - {name: dec-out, select: {stack: decoder, role: output}, insert: ad, optional: true}
  - {name: ffn-in, select: {block: ffn, role: in}, insert: lo, placement: parallel}
  - {name: cross-v, select: {block: cross_attn, role: v, path_regex: "."}, insert: ad, placement: parallel, optional: true}
"""

FAMILIES = ["t5", "mt5", "bart", "mbart", "pegasus", "marian", "blenderbot", "m2m100", "bert2bert",
            "torch-transformer", "clip-vit-b-32", "clip-rn50", "toy"]


def _build(name):
    if name == "toy":
        torch.manual_seed(0)
        return ToySeq2Seq().eval(), ToySeq2Seq.example_inputs()
    from vlpet_fx.capture.inputs import build_example_inputs

    m = build_model(name, "tiny").eval()
    _, args, kwargs = build_example_inputs(m)
    return m, (args, kwargs)


def _run(m, inputs):
    with torch.no_grad():
        return _run_grad(m, inputs)


def _run_grad(m, inputs):
    args, kwargs = inputs if isinstance(inputs[-1], dict) and len(inputs) == 2 else (inputs, {})
    out = m(*args, **kwargs)
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0] if isinstance(out, tuple) else out


@pytest.fixture
def no_mha_fastpath():
    """nn.MultiheadAttention's fused inference kernel is skipped once a hook sits on the layer; compare the
    patched model with the same (non-fused) computation of the unpatched one."""
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(True)


@pytest.mark.parametrize("name", FAMILIES)
def test_identity_methods_leave_outputs_bit_identical(name, no_mha_fastpath):
    m, inputs = _build(name)
    # nn.Transformer takes another (numerically different) attention path once its weights are frozen, as
    # they are after patching: compare against the frozen base
    for p in m.parameters():
        p.requires_grad_(False)
    before = _run(m, inputs)
    rules = parse_rules(IDENTITY_RULES)
    if name == "clip-rn50":  # attention pool only: no FFN
        rules = parse_rules(IDENTITY_RULES.replace("select: {block: ffn, role: in}, insert: lo, placement: parallel}",
                                                   "select: {block: ffn, role: in}, insert: lo, placement: parallel, optional: true}"))
    vlpet_fx.patch(m, rules, example_inputs=None if name != "toy" else inputs)
    attached = m.vlpet_patch.attached
    assert len(attached) > 0
    after = _run(m, inputs)
    # every placement runs in this forward: each inserted module's parameters are on the autograd path to the
    # output (a module whose hook never fired would leave all its gradients None)
    with torch.enable_grad():
        out = _run_grad(m, inputs)
        out.float().sum().backward()
    calls = {path: sum(p.grad is not None for p in m.get_submodule(path).parameters()) for path in attached}
    m.zero_grad(set_to_none=True)
    assert torch.equal(before, after), name
    assert [p for p, n in calls.items() if n == 0] == [], name
    # ... and each one reaches the output: moving its weights off the identity init changes the output
    g = torch.Generator().manual_seed(0)
    for path in attached:
        params = list(m.get_submodule(path).parameters())
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
        moved = _run(m, inputs)
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        assert not torch.allclose(moved, before, rtol=0, atol=1e-6), (name, path)
    assert torch.equal(_run(m, inputs), before)


def test_vlpet_large_is_not_identity_and_changes_outputs():
    m = build_model("bart", "tiny")
    ids = torch.randint(0, 256, (2, 8))
    before = m(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
    vlpet_fx.patch(m, "vlpet_large")
    after = m(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
    assert not torch.allclose(before, after)


# ---- trainable parameters: exactly the declared ones, counts by closed-form formulas -------------------------

def vlpet_count(d, r, gate, r_g=None, pair_heads=None):
    down = d * r + r
    up = (r * d // pair_heads + d) if pair_heads else (r * d + d)
    gates = {"middleX": d + 1, "middleY": d, "small": 2 * d + 1, "none": 0}
    if gate == "large":
        gates["large"] = d * r_g + r_g + r_g * d + d
    return down + up + gates[gate]


@pytest.mark.parametrize("rules, gate", [("vlpet_large", "large"), ("vlpet_middlex", "middleX"),
                                         ("vlpet_middley", "middleY"), ("vlpet_small", "small")])
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_vlpet_counts_match_formula(family, rules, gate):
    m = build_model(family, "tiny")
    d, n_enc, n_dec = 64, 2, 2
    vlpet_fx.patch(m, rules)
    enc = vlpet_count(d, 96, gate, r_g=96)  # the shipped (BART) rule sets: r = r_g = 96
    dec = vlpet_count(d, 96, "none")
    layer_norms = sum(p.numel() for n, p in m.named_parameters()
                      if n.startswith(("encoder.", "model.encoder.")) and ("layer_norm" in n or "layernorm" in n))
    want = 2 * n_enc * enc + n_dec * dec + layer_norms
    have = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert have == want
    s = vlpet_fx.summary(m)
    assert s.trainable == want
    rows = {(r["group"], r["name"]): r for r in s.rows}
    assert rows[("method", "vlpet")]["trainable"] == 2 * n_enc * enc + n_dec * dec
    assert rows[("stack", "encoder")]["trainable"] == 2 * n_enc * enc + layer_norms


def test_down_up_pair_heads_count():
    cfg_text = """
name: pair
methods: {p: {type: vlpet, dim: 32, heads: 4, head_mode: down-up-pair, gate: none}}
rules: [{select: {stack: encoder, role: output}, insert: p}]
"""
    m = build_model("t5", "tiny")
    vlpet_fx.patch(m, parse_rules(cfg_text))
    have = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert have == 4 * vlpet_count(64, 32, "none", pair_heads=4)


def test_adapter_and_lora_counts():
    m = build_model("bart", "tiny")
    plan = vlpet_fx.plan(m, parse_rules("""
name: x
methods:
  a: {type: adapter, reduction: 8}
  l: {type: lora, rank: 4}
rules:
  - {select: {role: output}, insert: a}
  - {select: {block: [self_attn, cross_attn], role: [q, v]}, insert: l, placement: parallel}
"""))
    n_blocks = 2 * 2 + 2 * 3
    n_qv = 2 * (2 * 1 + 2 * 2)
    assert plan.pet_params == n_blocks * (64 * 8 + 8 + 8 * 64 + 64) + n_qv * (4 * 64 + 64 * 4)
    vlpet_fx.patch(m, plan)
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == plan.pet_params


def test_only_declared_parameters_require_grad():
    m = build_model("t5", "tiny")
    vlpet_fx.patch(m, "vlpet_large")
    for n, p in m.named_parameters():
        declared = ".pet_" in n or (n.startswith("encoder.") and "layer_norm" in n)
        assert p.requires_grad == declared, n


def test_full_finetune_trains_everything_and_none_method():
    m = build_model("bart", "tiny")
    vlpet_fx.patch(m, "full_finetune")
    assert all(p.requires_grad for p in m.parameters())
    m = build_model("bart", "tiny")
    vlpet_fx.patch(m, parse_rules("name: n\nrules: [{select: {stack: decoder, block: ffn, role: in}, insert: none}]"))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"model.decoder.layers.{i}.fc1.{w}" for i in range(2) for w in ("weight", "bias")}


# ---- the two back ends agree --------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["t5", "bart"])
def test_eager_and_graph_back_ends_agree(family):
    base = build_model(family, "tiny")
    for m in base.modules():  # dropout off in both (the graph is captured in eval mode)
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    eager = vlpet_fx.patch(copy.deepcopy(base), "vlpet_large")
    graph = vlpet_fx.patch(copy.deepcopy(base), "vlpet_large", backend="graph")
    assert isinstance(graph, torch.fx.GraphModule)
    from vlpet_fx.capture.inputs import build_example_inputs

    _, _, kw = build_example_inputs(base)
    out_e = eager(**kw).logits
    out_g = graph(**kw).logits
    torch.testing.assert_close(out_e, out_g, rtol=1e-5, atol=1e-6)
    out_e.square().mean().backward()
    out_g.square().mean().backward()
    ge = sorted(p.grad.norm().item() for p in eager.parameters() if p.requires_grad)
    gg = sorted(p.grad.norm().item() for p in graph.parameters() if p.requires_grad)
    assert len(ge) == len(gg)
    torch.testing.assert_close(torch.tensor(ge), torch.tensor(gg), rtol=1e-4, atol=1e-7)
    # the graph module moves like any module (`.to()` walks every submodule's `_apply`), and still runs
    graph.zero_grad(set_to_none=True)
    torch.testing.assert_close(graph.to("cpu").to(torch.float32)(**kw).logits, out_g.detach())


def test_eager_back_end_releases_stashed_block_inputs():
    """The block input X a gate reads is stashed by a pre-hook. Without autograd, once the sub-layer that takes X
    and holds the site has returned (or raised), no PET module holds it: an inference forward frees each X after
    its sub-layer as the unpatched model does. With autograd it stays (activation checkpointing re-runs the
    layer's forward in backward without the layer's own pre-hook, where block 0 takes X: the test below)."""
    m = build_model("t5", "tiny").eval()
    vlpet_fx.patch(m, "vlpet_large")
    pets = [mod for mod in m.modules() if getattr(mod, "needs_block_input", False)]
    assert len(pets) == 2 * m.config.num_layers  # every encoder self-attention and FFN gate reads X
    seen = {}
    site = m.encoder.block[0].layer[0].SelfAttention.o  # the first gated site; X is taken at its block's input
    site.register_forward_hook(lambda *a: seen.setdefault("during", pets[0].block_input is not None) and None)
    m.encoder.register_forward_hook(lambda *a: seen.setdefault("after", [p.block_input for p in pets]) and None)
    ids = torch.randint(3, 256, (2, 8))
    with torch.no_grad():
        m(input_ids=ids, decoder_input_ids=ids[:, :4])
    assert seen["during"] is True  # held while its sub-layer runs ...
    assert seen["after"] == [None] * len(pets)  # ... dropped before the decoder runs ...
    assert all(p.block_input is None for p in pets)  # ... and after the forward
    m.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert all(p.block_input is None for p in pets)
    m.train()(input_ids=ids, decoder_input_ids=ids[:, :4]).logits.sum().backward()
    assert all(p.block_input is not None for p in pets)  # with autograd: kept for a re-run in backward
    m.eval()
    with pytest.raises(ZeroDivisionError), torch.no_grad():  # the layer fails after X was stashed: dropped all the same
        m.encoder.block[0].layer[1].DenseReluDense.wo.register_forward_hook(lambda *a: 1 / 0)
        m(input_ids=ids, decoder_input_ids=ids[:, :4])
    assert pets[1].block_input is None and pets[0].block_input is None


def test_graph_back_end_reaches_packed_in_proj_sites():
    m = build_model("torch-transformer", "tiny")
    rules = parse_rules("""
name: packed
methods: {a: {type: adapter, reduction: 4, zero_init_up: false}}
rules: [{select: {stack: encoder, block: self_attn, role: v}, insert: a}]
""")
    with pytest.raises(vlpet_fx.PlanError, match="graph back end"):
        vlpet_fx.patch(copy.deepcopy(m), rules)
    gm = vlpet_fx.patch(m, rules, backend="graph")
    assert sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("vlpet_")) == 2


# ---- Hugging Face features keep working ---------------------------------------------------------------------

@pytest.mark.parametrize("family", ["t5", "bart"])
def test_generate_with_kv_cache_matches_no_cache(family):
    m = build_model(family, "tiny")
    vlpet_fx.patch(m, "vlpet_large")
    ids = torch.randint(3, 256, (2, 8))
    a = m.generate(input_ids=ids, max_new_tokens=6, do_sample=False, use_cache=True)
    b = m.generate(input_ids=ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


def test_save_pretrained_keeps_base_keys(tmp_path):
    m = build_model("bart", "tiny")
    vlpet_fx.patch(m, "vlpet_large")
    m.save_pretrained(tmp_path / "m")
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "m" / "model.safetensors")))
    build_model("bart", "tiny").save_pretrained(tmp_path / "base")  # what the unpatched model writes
    base_keys = set(load_file(str(tmp_path / "base" / "model.safetensors")))
    pet_keys = {n for n, _ in m.named_parameters() if ".pet_" in n}
    # 2 encoder layers x 2 VL-PET modules (down, up, large gate down/up: 8 tensors) + 2 decoder value adapters (4)
    assert len(pet_keys) == 2 * 2 * 8 + 2 * 4
    assert keys == base_keys | pet_keys
    assert not base_keys & pet_keys


def test_gradient_checkpointing_and_autocast():
    m = build_model("t5", "tiny")
    for mod in m.modules():  # dropout off: the checkpointed and the plain backward must agree exactly
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
        if isinstance(getattr(mod, "dropout", None), float):
            mod.dropout = 0.0
    vlpet_fx.patch(m, "vlpet_large")
    m.train()
    ids = torch.randint(3, 256, (2, 8))
    labels = ids[:, :4].contiguous()
    m(input_ids=ids, labels=labels).loss.backward()
    plain = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    m.zero_grad(set_to_none=True)
    m.gradient_checkpointing_enable()
    loss = m(input_ids=ids, labels=labels).loss
    loss.backward()
    pet = [n for n, p in m.named_parameters() if ".pet_" in n]
    assert any(".gate." in n for n in pet)
    # every trainable parameter, the gates' included, gets the gradient of the plain backward
    assert sorted(plain) == sorted(n for n, p in m.named_parameters() if p.requires_grad)
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
            torch.testing.assert_close(p.grad, plain[n], rtol=1e-4, atol=1e-6, msg=n)
    assert any(torch.count_nonzero(plain[n]) for n in pet if ".gate." in n)
    m.gradient_checkpointing_disable()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(input_ids=ids, labels=labels)
    assert torch.isfinite(out.loss)
    m.to(torch.float64)
    assert all(p.dtype == torch.float64 for n, p in m.named_parameters() if ".pet_" in n)


COMPILE_BACKEND = "aot_eager"  # inductor's CPU code generation takes minutes per model here: see BENCHMARKS.md


@pytest.mark.parametrize("backend", ["eager", "graph"])
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_torch_compile_fullgraph(family, backend):
    """Both back ends compile as one graph (fullgraph=True: any graph break is an error), forward and backward,
    with the uncompiled model's outputs and gradients."""
    from vlpet_fx.capture.inputs import build_example_inputs

    base = build_model(family, "tiny").eval()
    m = vlpet_fx.patch(base, "vlpet_large", backend=backend)
    assert isinstance(m, torch.fx.GraphModule) == (backend == "graph")
    _, _, kw = build_example_inputs(base)
    ref = m(**kw).logits
    ref.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    m.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend=COMPILE_BACKEND)
    out = compiled(**kw).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    for n, p in m.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)
    with torch.no_grad():  # inference compiles as one graph too (the eager back end then drops its stash of X)
        torch.testing.assert_close(compiled(**kw).logits, ref.detach(), rtol=1e-5, atol=1e-5)


# ---- round trip through a patched-model directory ------------------------------------------------------------

def test_patch_dir_round_trip(tmp_path):
    from vlpet_fx.export import save_patched
    from vlpet_fx.zoo import base_reference

    m = build_model("bart", "tiny")
    vlpet_fx.patch(m, "vlpet_large", seed=0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    save_patched(m, tmp_path / "out", base_reference("bart", "tiny", 0))
    again = vlpet_fx.load(tmp_path / "out")
    ids = torch.randint(3, 256, (2, 8))
    assert torch.equal(m(input_ids=ids, decoder_input_ids=ids[:, :3]).logits,
                       again(input_ids=ids, decoder_input_ids=ids[:, :3]).logits)
