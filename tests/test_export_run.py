"""Every export format from a `train` run reads back to the same outputs as the trained model: adapters, pt2 (the
VL programs, with other batch/text/image counts than the export example), merged and peft (a LoRA run)."""

from __future__ import annotations

import pytest
import torch

import vlpet_fx
from vlpet_fx.export import export, load_pt2
from vlpet_fx.export.patched_dir import load_base, read_manifest

LORA = """name: lora4
description: LoRA r=4 on q and v, nothing else trains
methods:
  lora: {type: lora, rank: 4, alpha: 8, dropout: 0.0}
rules:
  - name: attention-qv
    select: {stack: [encoder, decoder], block: [self_attn, cross_attn], role: [q, v]}
    insert: lora
    placement: parallel
"""


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from vlpet_fx.train import TrainConfig, train

    d = tmp_path_factory.mktemp("lora")
    (d / "lora4.yaml").write_text(LORA)
    out = d / "run"
    train(TrainConfig(out=str(out), rules=str(d / "lora4.yaml"), steps=4, train_per_task=16, eval_per_task=2,
                      batch_size=8, eval_every=0, save_every=0, tasks=[("vqa", 1.0)], source="digits", lr=2e-2))
    return out


def _inputs(model, batch=3, src=7, images=3, tgt=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    vocab = model.text.get_input_embeddings().num_embeddings
    ids = torch.randint(3, vocab, (batch, src), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[0, -2:] = 0  # padded text
    pix = torch.rand(batch, images, 3, model.image_size, model.image_size, generator=g) * 2 - 1
    vmask = torch.ones(batch, images, dtype=torch.long)
    if batch > 1 and images > 1:
        vmask[1, -1] = 0  # a padded image slot
    dec = torch.randint(3, vocab, (batch, tgt), generator=g)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pix, visual_mask=vmask, decoder_input_ids=dec)


@torch.no_grad()
def _logits(model, x):
    return model.eval()(**x).logits


def _differs_from_base(trained, manifest_dir, x):
    base = load_base(read_manifest(manifest_dir))
    assert (_logits(trained, x) - _logits(base, x)).abs().max() > 1e-4, "training changed nothing: a vacuous test"


def test_adapters_round_trip(vl_run, tmp_path):
    export(vl_run, "adapters", tmp_path / "a")
    trained, again = vlpet_fx.load(vl_run / "model"), vlpet_fx.load(tmp_path / "a")
    x = _inputs(trained)
    _differs_from_base(trained, vl_run / "model", x)
    torch.testing.assert_close(_logits(again, x), _logits(trained, x), rtol=0, atol=0)


@pytest.mark.slow
def test_pt2_of_a_vl_run(vl_run, tmp_path):
    export(vl_run, "pt2", tmp_path / "p")
    trained = vlpet_fx.load(vl_run / "model").eval()
    progs = {n: load_pt2(tmp_path / "p" / f"{n}.pt2").module() for n in ("model", "encoder", "decoder")}
    for shape in [dict(batch=3, src=7, images=3, tgt=4), dict(batch=1, src=12, images=1, tgt=1)]:
        x = _inputs(trained, **shape)
        want = _logits(trained, x)
        got = progs["model"](x["input_ids"], x["attention_mask"], x["pixel_values"], x["visual_mask"],
                             x["decoder_input_ids"])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        hidden, enc_mask = progs["encoder"](x["input_ids"], x["attention_mask"], x["pixel_values"], x["visual_mask"])
        last = progs["decoder"](x["decoder_input_ids"], hidden, enc_mask)
        torch.testing.assert_close(last, want[:, -1], rtol=1e-4, atol=1e-4)


def test_merged_round_trip_of_a_lora_run(lora_run, tmp_path):
    from vlpet_fx.export.merged import load_merged

    export(lora_run, "merged", tmp_path / "m")
    trained = vlpet_fx.load(lora_run / "model")
    merged = load_merged(tmp_path / "m")
    assert not hasattr(merged, "vlpet_patch") and not any("lora" in n for n, _ in merged.named_parameters())
    x = _inputs(trained)
    _differs_from_base(trained, lora_run / "model", x)
    torch.testing.assert_close(_logits(merged, x), _logits(trained, x), rtol=1e-4, atol=1e-5)


def test_peft_round_trip_of_a_lora_run(lora_run, tmp_path):
    peft = pytest.importorskip("peft")
    export(lora_run, "peft", tmp_path / "q")
    trained = vlpet_fx.load(lora_run / "model")
    base = load_base(read_manifest(lora_run / "model"))
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "q")).eval()
    x = _inputs(trained)
    with torch.no_grad():
        got = model(**x).logits
    torch.testing.assert_close(got, _logits(trained, x), rtol=1e-4, atol=1e-5)


def test_vlpet_run_refuses_merged_and_peft_with_the_reason(vl_run, tmp_path):
    from vlpet_fx.errors import ExportError

    with pytest.raises(ExportError, match="cannot merge .*vlpet"):
        export(vl_run, "merged", tmp_path / "m")
    with pytest.raises(ExportError, match="LoRA only"):
        export(vl_run, "peft", tmp_path / "q")
    assert not (tmp_path / "m").exists() and not (tmp_path / "q").exists()
    assert not [p for p in tmp_path.iterdir()]  # no temporary directories left behind
