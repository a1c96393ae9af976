"""One discovery check over every supported family (timm-style table-driven test).

Each row: how to build the model, its expected layer counts per stack, and a few spot checks of paths.
Expectations come from the configs, never from running discovery.
"""

from __future__ import annotations

import pytest
import torch

import vlpet_fx
from toy import ToySeq2Seq
from vlpet_fx.zoo import build_model

HF = ["t5", "mt5", "bart", "mbart", "pegasus", "marian", "blenderbot", "m2m100", "bert2bert"]
GATED = {"mt5"}  # gated MLP (wi_0 through the activation, wi_1 not): roles gate, up, out


def _hf_layers(model) -> dict:
    cfg = model.config
    if hasattr(cfg, "encoder") and hasattr(cfg, "decoder") and hasattr(cfg.encoder, "num_hidden_layers"):
        return {"encoder": cfg.encoder.num_hidden_layers, "decoder": cfg.decoder.num_hidden_layers}
    if hasattr(cfg, "num_layers") and hasattr(cfg, "num_decoder_layers"):
        return {"encoder": cfg.num_layers, "decoder": cfg.num_decoder_layers}
    return {"encoder": cfg.encoder_layers, "decoder": cfg.decoder_layers}


# name -> (builder, example inputs or None, expected layers or callable(model) -> layers, expected blocks per stack)
ENC_DEC_BLOCKS = {"encoder": {"self_attn", "ffn"}, "decoder": {"self_attn", "cross_attn", "ffn"}}
CASES = {
    **{f: (lambda f=f: build_model(f, "tiny"), None, _hf_layers, ENC_DEC_BLOCKS) for f in HF},
    "torch-transformer": (lambda: build_model("torch-transformer", "tiny"),
                          None, {"encoder": 2, "decoder": 2}, ENC_DEC_BLOCKS),
    "clip-vit-b-32": (lambda: build_model("clip-vit-b-32", "base", device="meta"),
                      None, {"visual": 12}, {"visual": {"self_attn", "ffn"}}),
    "clip-rn50": (lambda: build_model("clip-rn50", "base", device="meta"),
                  None, {"visual": 1}, {"visual": {"self_attn"}}),
    "toy": (lambda: ToySeq2Seq(n_enc=3, n_dec=2), ToySeq2Seq.example_inputs(),
            {"encoder": 3, "decoder": 2}, ENC_DEC_BLOCKS),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def discovered(request):
    build, inputs, layers, blocks = CASES[request.param]
    model = build()
    table = vlpet_fx.discover(model, example_inputs=inputs, name=request.param)
    want = layers(model) if callable(layers) else layers
    return request.param, model, table, want, blocks


def test_layer_counts_equal_config(discovered):
    name, model, table, want, _ = discovered
    assert table.num_layers() == want, name


def test_every_layer_has_its_blocks_and_roles(discovered):
    name, model, table, want, blocks = discovered
    for stack, n in want.items():
        for layer in range(n):
            got = {s.block for s in table.where(stack=stack, layer=layer)}
            assert got == blocks[stack], (name, stack, layer, got)
            for block in got:
                roles = {s.role for s in table.where(stack=stack, layer=layer, block=block)}
                ffn = {"gate", "up", "out", "output"} if name in GATED else {"in", "out", "output"}
                expect = {"q", "k", "v", "o", "output"} if block != "ffn" else ffn
                assert expect == roles, (name, stack, layer, block, roles)


def test_paths_are_real_modules_with_matching_shapes(discovered):
    name, model, table, _, _ = discovered
    modules = dict(model.named_modules())
    for s in table:
        if s.path is None:
            continue
        assert s.path in modules, (name, s)
        mod = modules[s.path]
        if isinstance(mod, torch.nn.Linear) and s.role != "output":
            assert (mod.in_features, mod.out_features) == (s.in_features, s.out_features), (name, s)


@pytest.fixture(scope="module", params=sorted(CASES))
def graph_case(request):
    """A full capture (every node kept) and the table discovered on it, for the checks in the graph itself."""
    build, inputs, layers, _ = CASES[request.param]
    model = build()
    cap = vlpet_fx.capture(model, inputs)
    table = vlpet_fx.discover(model, captured=cap, name=request.param)
    want = layers(model) if callable(layers) else layers
    return request.param, cap, table, want


def _in_scope(cap, node, path) -> bool:
    return any(p == path or p.startswith(path + ".") for p in cap.module_stack(node))


def _ancestors(node) -> set:
    seen, todo = set(), [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def _residual_adds(cap, table, stack, layer) -> list:
    """The layer's residual adds, found here from the graph alone: tensor adds run inside the layer's module
    whose two operands and result all have the shape of the stream (the shape of the layer's block outputs)."""
    out_sites = table.where(stack=stack, layer=layer, role="output")
    path = out_sites[0].layer_path
    nodes = {n.name: n for n in cap.graph.nodes}
    stream = {tuple(nodes[s.node].meta["val"].shape) for s in out_sites}
    adds = []
    for n in cap.graph.nodes:
        if n.op != "call_function" or getattr(n.target, "overloadpacket", None) is not torch.ops.aten.add:
            continue
        args = [a for a in n.args[:2] if isinstance(a, torch.fx.Node)]
        shapes = {tuple(a.meta["val"].shape) for a in args if "val" in a.meta}
        if len(args) == 2 and shapes == {tuple(n.meta["val"].shape)} <= stream and _in_scope(cap, n, path):
            adds.append(n)
    return adds


def test_layers_follow_the_residual_stream(graph_case):
    """Layer i + 1 comes after layer i along the residual stream: in the captured graph, each layer's residual
    adds come (topologically) after the previous layer's, and the previous layer's last add feeds this one's
    first add."""
    name, cap, table, want = graph_case
    for stack, n in want.items():
        adds = [_residual_adds(cap, table, stack, i) for i in range(n)]
        if n > 1:
            assert all(adds), (name, stack, [len(a) for a in adds])
        for i in range(n - 1):
            last, first = max(adds[i], key=cap.order), min(adds[i + 1], key=cap.order)
            assert cap.order(max(adds[i], key=cap.order)) < cap.order(min(adds[i + 1], key=cap.order)), (name, stack, i)
            assert last in _ancestors(first), (name, stack, i)
            assert first not in _ancestors(last), (name, stack, i)


SPOT = {
    "t5": [("encoder", 1, "self_attn", "v", "encoder.block.1.layer.0.SelfAttention.v"),
           ("decoder", 0, "cross_attn", "v", "decoder.block.0.layer.1.EncDecAttention.v"),
           ("encoder", 0, "ffn", "in", "encoder.block.0.layer.1.DenseReluDense.wi"),
           ("decoder", 1, "ffn", "out", "decoder.block.1.layer.2.DenseReluDense.wo")],
    "mt5": [("encoder", 0, "ffn", "out", "encoder.block.0.layer.1.DenseReluDense.wo"),
            ("encoder", 1, "ffn", "gate", "encoder.block.1.layer.1.DenseReluDense.wi_0"),
            ("decoder", 0, "ffn", "up", "decoder.block.0.layer.2.DenseReluDense.wi_1")],
    "bart": [("encoder", 0, "self_attn", "q", "model.encoder.layers.0.self_attn.q_proj"),
             ("decoder", 1, "cross_attn", "v", "model.decoder.layers.1.encoder_attn.v_proj"),
             ("decoder", 1, "ffn", "in", "model.decoder.layers.1.fc1")],
    "bert2bert": [("encoder", 1, "self_attn", "k", "encoder.encoder.layer.1.attention.self.key"),
                  ("decoder", 0, "cross_attn", "v", "decoder.bert.encoder.layer.0.crossattention.self.value")],
    "torch-transformer": [("encoder", 0, "self_attn", "v", None),
                          ("encoder", 0, "self_attn", "o", None),  # F.multi_head_attention_forward reads out_proj.weight directly
                          ("decoder", 1, "ffn", "in", "decoder.layers.1.linear1")],
    "clip-vit-b-32": [("visual", 11, "self_attn", "o", None),  # nn.MultiheadAttention: weight used, module not called
                      ("visual", 3, "ffn", "in", "transformer.resblocks.3.mlp.c_fc")],
    "clip-rn50": [("visual", 0, "self_attn", "q", None)],
    "toy": [("encoder", 2, "self_attn", "k", "reader.2.mix.wk"),
            ("decoder", 1, "cross_attn", "v", "writer.1.look.wv"),
            ("decoder", 0, "self_attn", "q", "writer.0.mix.wq"),
            ("encoder", 0, "ffn", "out", "reader.0.narrow")],
}


def test_spot_checks(discovered):
    name, _, table, _, _ = discovered
    for stack, layer, block, role, path in SPOT.get(name, []):
        assert table.get(stack, layer, block, role).path == path, (name, stack, layer, block, role)


_VIEWS = {"view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "clone", "contiguous", "alias",
          "to", "_to_copy", "dropout", "slice", "unsqueeze", "squeeze"}


def _activation_input(cap, node):
    """The activation a projection reads (its non-parameter tensor input), walked back through views/copies."""
    (x,) = [a for a in node.all_input_nodes if cap.param_of(a) is None and any(
        u.op == "placeholder" and u.name in cap.user_inputs for u in _ancestors(a) | {a})]
    while x.op == "call_function" and getattr(x.target, "overloadpacket", None) is not None \
            and x.target.overloadpacket.__name__ in _VIEWS:
        x = x.args[0]
    return x


def test_cross_attention_reads_keys_from_encoder(graph_case):
    """In the graph: the keys and values of every cross-attention are projected from one node, which comes after
    the encoder's last layer and depends on nothing of the decoder (the encoder stack's final output), while the
    decoder's self-attention keys are not."""
    name, cap, table, want = graph_case
    cross = table.where(block="cross_attn", role=("k", "v"))
    if not cross:
        assert "decoder" not in want
        return
    nodes = {n.name: n for n in cap.graph.nodes}
    sources = {_activation_input(cap, nodes[s.node]) for s in cross}
    assert len(sources) == 1, (name, sources)
    (memory,) = sources
    before = _ancestors(memory) | {memory}
    enc_last = max(_residual_adds(cap, table, "encoder", want["encoder"] - 1), key=cap.order)
    assert enc_last in before, name  # after the whole encoder
    dec_paths = {s.layer_path for s in table.where(stack="decoder")}
    assert not any(_in_scope(cap, n, p) for n in before for p in dec_paths), name  # nothing of the decoder
    # between the encoder's last residual add and the memory: only the last layer's own tail (post-LN) or the
    # stack's final norm, outside every other layer
    enc_paths = {s.layer_path for s in table.where(stack="encoder")}
    last_path = table.where(stack="encoder", layer=want["encoder"] - 1)[0].layer_path
    between = (before - _ancestors(enc_last)) - {enc_last}
    assert not any(_in_scope(cap, n, p) for n in between for p in enc_paths - {last_path}), name
    for s in table.where(stack="decoder", block="self_attn", role="k"):
        assert _activation_input(cap, nodes[s.node]) is not memory, (name, s)


@pytest.mark.parametrize("name", ["t5", "bart", "bert2bert", "torch-transformer"])
def test_fast_discovery_equals_full_capture(name):
    """Depth reduction (capture one layer of each kind, replicate) gives the table of a full capture."""
    if name == "t5":
        import transformers as tf
        model = tf.T5ForConditionalGeneration(tf.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=4,
                                                          num_decoder_layers=3, num_heads=4, vocab_size=64,
                                                          decoder_start_token_id=0))
    else:
        model = build_model(name, "tiny")
    fast = vlpet_fx.discover(model, fast=True)
    full = vlpet_fx.discover(model, fast=False)
    assert [s.public() for s in fast] == [s.public() for s in full]
    assert [(s.param, s.block_path, s.layer_path) for s in fast] == [(s.param, s.block_path, s.layer_path) for s in full]


def test_json_contract_shape():
    table = vlpet_fx.discover(build_model("bart", "tiny"), name="bart")
    d = table.to_dict()
    assert set(d) == {"model", "base_params", "sites"}
    assert d["base_params"] == sum(p.numel() for p in build_model("bart", "tiny").parameters())
    assert all(set(s) == {"key", "stack", "layer", "block", "role", "path", "in_features", "out_features",
                          "out_slice"} for s in d["sites"])
    assert len({s["key"] for s in d["sites"]}) == len(d["sites"])
    assert all(s["out_slice"] is None for s in d["sites"])  # BART has no packed projection
