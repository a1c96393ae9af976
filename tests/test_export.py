"""Round trips through every export format on T5 and BART, fingerprints, and damaged files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import vlpet_fx
from vlpet_fx.export import export, load_pt2, save_patched
from vlpet_fx.rules import parse_rules
from vlpet_fx.zoo import base_reference, build_model

LORA = parse_rules("""
name: lora_small
methods: {lo: {type: lora, rank: 4, alpha: 8}}
rules: [{select: {block: [self_attn, cross_attn], role: [q, v]}, insert: lo, placement: parallel}]
trainable: [{select: {stack: [encoder, decoder]}, params: bias, optional: true}]
""")
FAMILIES = ["t5", "bart"]


def _trained(family, rules, tmp_path):
    """A patched model with moved trainable weights (as after training), saved as a patched directory."""
    m = build_model(family, "tiny")
    vlpet_fx.patch(m, rules)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    src = save_patched(m, tmp_path / "src", base_reference(family, "tiny", 0))
    return m, src


def _inputs(batch=2, src=8, tgt=3):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 256, (batch, src), generator=g)
    return ids, torch.ones_like(ids), torch.randint(3, 256, (batch, tgt), generator=g)


def _logits(m, ids, mask, dec):
    with torch.no_grad():
        return m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_adapters_round_trip_exact(family, tmp_path):
    m, src = _trained(family, "vlpet_large", tmp_path)
    out = export(src, "adapters", tmp_path / "ad")
    manifest = json.loads((out / "vlpet.json").read_text())
    assert {"rules", "plan", "methods", "versions", "fingerprint", "base"} <= set(manifest)
    again = vlpet_fx.load(build_model(family, "tiny"), out)
    x = _inputs()
    assert torch.equal(_logits(m, *x), _logits(again, *x))


def test_mismatching_base_is_refused_unless_forced(tmp_path):
    m, src = _trained("bart", "vlpet_large", tmp_path)
    with pytest.raises(vlpet_fx.ExportError, match="frozen weights differ"):
        vlpet_fx.load(build_model("bart", "tiny", seed=7), src)
    import transformers as tf

    other = tf.BartForConditionalGeneration(tf.BartConfig(**{**build_model("bart", "tiny").config.to_dict(),
                                                             "activation_function": "relu"}))
    with pytest.raises(vlpet_fx.ExportError, match="configuration differs"):
        vlpet_fx.load(other, src)
    assert vlpet_fx.load(build_model("bart", "tiny", seed=7), src, force=True) is not None


def test_dropout_rates_are_no_part_of_the_base_fingerprint(tmp_path):
    """A recipe sets dropout rates on the config it saves (the paper's 0.1 in BART's three dropouts): adapters
    trained so load on the base built again with its own rates, since rates change no weight and nothing an
    eval-mode forward computes. A manifest whose hash still holds the rates (written before) loads too."""
    from vlpet_fx.export.fingerprint import config_hash

    m, src = _trained("bart", "vlpet_large", tmp_path)
    base = build_model("bart", "tiny")
    for key in ("dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop"):
        setattr(base.config, key, 0.3)
    x = _inputs()
    torch.testing.assert_close(_logits(vlpet_fx.load(base, src), *x), _logits(m, *x), rtol=0, atol=0)
    manifest = json.loads((src / "vlpet.json").read_text())
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert manifest["fingerprint"]["config_sha256"] == config_hash(m, trainable) != config_hash(m, trainable,
                                                                                                rates=True)
    manifest["fingerprint"]["config_sha256"] = config_hash(m, trainable, rates=True)  # as written before
    (src / "vlpet.json").write_text(json.dumps(manifest))
    torch.testing.assert_close(_logits(vlpet_fx.load(build_model("bart", "tiny"), src), *x), _logits(m, *x),
                               rtol=0, atol=0)
    manifest["fingerprint"]["config_sha256"] = config_hash(base, trainable, rates=True)  # other rates: refused
    (src / "vlpet.json").write_text(json.dumps(manifest))
    with pytest.raises(vlpet_fx.ExportError, match="configuration differs"):
        vlpet_fx.load(build_model("bart", "tiny"), src)


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_matches_patched(family, tmp_path):
    m, src = _trained(family, LORA, tmp_path)
    out = export(src, "merged", tmp_path / "merged")
    plain = type(m).from_pretrained(out).eval()
    assert not any(".pet_" in n for n, _ in plain.named_parameters())
    x = _inputs()
    torch.testing.assert_close(_logits(plain, *x), _logits(m, *x), rtol=0, atol=1e-5)


def test_merged_refuses_gated_modules(tmp_path):
    _, src = _trained("t5", "vlpet_small", tmp_path)
    with pytest.raises(vlpet_fx.ExportError, match=r"cannot merge .*vlpet.*not a linear change"):
        export(src, "merged", tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_pt2_programs_match_eager_with_dynamic_shapes(family, tmp_path):
    m, src = _trained(family, "vlpet_large", tmp_path)
    out = export(src, "pt2", tmp_path / "pt2")
    assert sorted(p.name for p in out.iterdir()) == ["decoder.pt2", "encoder.pt2", "model.pt2"]
    scorer, enc, step = (load_pt2(out / f"{k}.pt2").module() for k in ("model", "encoder", "decoder"))
    for shape in [(2, 8, 3), (3, 13, 6), (1, 5, 1)]:
        ids, mask, dec = _inputs(*shape)
        ref = _logits(m, ids, mask, dec)
        torch.testing.assert_close(scorer(ids, mask, dec), ref, rtol=1e-5, atol=1e-5)
        hidden = enc(ids, mask)
        torch.testing.assert_close(hidden, m.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step(dec, hidden, mask), ref[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_adapter_loads_in_peft(family, tmp_path):
    peft = pytest.importorskip("peft")
    m, src = _trained(family, LORA, tmp_path)
    out = export(src, "peft", tmp_path / "peft")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    pm = peft.PeftModel.from_pretrained(build_model(family, "tiny"), out).eval()
    x = _inputs()
    torch.testing.assert_close(_logits(pm, *x), _logits(m, *x), rtol=0, atol=1e-6)


def test_peft_refuses_non_lora(tmp_path):
    _, src = _trained("bart", "vlpet_large", tmp_path)
    with pytest.raises(vlpet_fx.ExportError, match="LoRA only"):
        export(src, "peft", tmp_path / "p")


def test_damaged_files_give_clear_errors(tmp_path):
    _, src = _trained("t5", "vlpet_large", tmp_path)
    weights = src / "pet.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(vlpet_fx.ExportError, match="checksum"):
        vlpet_fx.load(src)
    weights.write_bytes(data[:-4] + b"\x00\x00\x00\x01")  # same size, one value changed
    with pytest.raises(vlpet_fx.ExportError, match="checksum"):
        vlpet_fx.load(src)
    weights.write_bytes(data)
    (src / "vlpet.json").write_text("{ damaged")
    with pytest.raises(vlpet_fx.ExportError, match="damaged"):
        vlpet_fx.load(src)
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(vlpet_fx.ExportError, match="cannot load"):
        load_pt2(bad)


@pytest.mark.parametrize("args, needle", [
    (["export", "{tmp}/nowhere", "--format", "adapters", "--out", "{tmp}/o"], "no vlpet.json"),
    (["export", "{src}", "--format", "merged", "--out", "{tmp}/o"], "cannot merge"),
    (["export", "{src}", "--format", "adapters", "--out", "{src}"], "not empty"),
])
def test_export_cli_bad_input(tmp_path, args, needle):
    _, src = _trained("t5", "vlpet_large", tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)).replace("{src}", str(src)) for a in args]
    res = subprocess.run([sys.executable, "-m", "vlpet_fx.cli.main", *args], capture_output=True, text=True)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert needle in lines[0]
    assert not (tmp_path / "o").exists()


def test_export_cli_writes(tmp_path):
    _, src = _trained("bart", "vlpet_large", tmp_path)
    res = subprocess.run([sys.executable, "-m", "vlpet_fx.cli.main", "export", str(src), "--format", "adapters",
                          "--out", str(tmp_path / "ad")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["pet.safetensors", "vlpet.json"]
