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
                expect = {"q", "k", "v", "o", "output"} if block != "ffn" else {"in", "out", "output"}
                assert expect <= roles, (name, stack, layer, block, roles)


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


def test_layers_follow_the_residual_stream(discovered):
    """Layer i of a stack lives in an earlier container element than layer i+1 (order along the stream)."""
    name, _, table, want, _ = discovered
    for stack, n in want.items():
        paths = [table.where(stack=stack, layer=i)[0].layer_path for i in range(n)]
        assert len(set(paths)) == n, (name, stack, paths)


SPOT = {
    "t5": [("encoder", 1, "self_attn", "v", "encoder.block.1.layer.0.SelfAttention.v"),
           ("decoder", 0, "cross_attn", "v", "decoder.block.0.layer.1.EncDecAttention.v"),
           ("encoder", 0, "ffn", "in", "encoder.block.0.layer.1.DenseReluDense.wi"),
           ("decoder", 1, "ffn", "out", "decoder.block.1.layer.2.DenseReluDense.wo")],
    "mt5": [("encoder", 0, "ffn", "out", "encoder.block.0.layer.1.DenseReluDense.wo")],
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


def test_cross_attention_reads_keys_from_encoder(discovered):
    name, _, table, _, _ = discovered
    for s in table.where(block="cross_attn", role="k"):
        assert s.stack == "decoder"


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
    assert all(set(s) == {"stack", "layer", "block", "role", "path", "in_features", "out_features"} for s in d["sites"])
