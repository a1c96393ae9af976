"""A text checkpoint directory is trained with its own tokenizer (issue 15 point 5): vocabulary and embeddings
untouched, special ids from the tokenizer where the config has none, every HF encoder-decoder class (T5, BART,
EncoderDecoderModel), the tokenizer recorded and used again by predict / load. Built-in random models keep the
word-level tokenizer. Small random checkpoints with WordPiece tokenizers trained here (no extra needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from vlpet_fx.data.tasks import build_task
from vlpet_fx.data.tokenizer import checkpoint_tokenizer, has_tokenizer
from vlpet_fx.errors import VlpetError
from vlpet_fx.vl import build_vl

COMMON = dict(steps=3, train_per_task=16, eval_per_task=4, batch_size=8, eval_every=0, save_every=0,
              tasks=[("vqa", 1.0)], source="digits", lr=3e-3, rules="vl_adapter")

# (special tokens in id order, post-processor template, which token names map to which of them)
STYLES = {
    "t5": (["<pad>", "</s>", "<unk>"], "$A </s>", dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>")),
    "bart": (["<s>", "<pad>", "</s>", "<unk>"], "<s> $A </s>",
             dict(bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>")),
    "bert": (["[PAD]", "[UNK]", "[CLS]", "[SEP]"], "[CLS] $A [SEP]",
             dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")),
}


def wordpiece(style: str, drop_pad: bool = False):
    """A WordPiece tokenizer trained on task-like text (subwords, ids unlike the word-level tokenizer's)."""
    specials, template, names = STYLES[style]
    if drop_pad:
        specials = [s for s in specials if "pad" not in s.lower()]
        names = {k: v for k, v in names.items() if k != "pad_token"}
    texts = [f"{e.task}: {e.input} {e.target}" for e in build_task("vqa", "train", 200, source="digits", seed=5)]
    tk = Tokenizer(models.WordPiece(unk_token=names["unk_token"]))
    tk.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece()
    tk.train_from_iterator(texts + ["a quick brown fox jumps over the lazy dog"],
                           trainers.WordPieceTrainer(vocab_size=160, special_tokens=specials))
    ids = {s: tk.token_to_id(s) for s in specials}
    tk.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, ids[s]) for s in specials if s in template])
    return tf.PreTrainedTokenizerFast(tokenizer_object=tk, model_max_length=512, **names)


def save_checkpoint(kind: str, out: Path, drop_pad: bool = False) -> Path:
    torch.manual_seed(0)
    if kind == "t5":
        tok = wordpiece("t5")
        # like t5-small: more embedding rows than tokens (never shrunk to the tokenizer)
        model = tf.T5ForConditionalGeneration(tf.T5Config(
            d_model=32, d_ff=64, d_kv=8, num_layers=1, num_decoder_layers=1, num_heads=4, vocab_size=len(tok) + 12,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    elif kind == "bart":
        tok = wordpiece("bart")
        model = tf.BartForConditionalGeneration(tf.BartConfig(
            d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=len(tok), max_position_embeddings=64,
            bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2))
    else:  # bert2bert: an EncoderDecoderModel whose config names no start/pad id (as from two BERT checkpoints)
        tok = wordpiece("bert", drop_pad=drop_pad)
        kw = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                  vocab_size=len(tok), max_position_embeddings=64)
        cfg = tf.EncoderDecoderConfig.from_encoder_decoder_configs(
            tf.BertConfig(**kw), tf.BertConfig(**kw, is_decoder=True, add_cross_attention=True))
        model = tf.EncoderDecoderModel(config=cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from vlpet_fx.train import TrainConfig, train

    root = tmp_path_factory.mktemp("ckpt_tok")
    out = {}
    for kind in ("t5", "bart", "bert2bert"):
        ckpt = save_checkpoint(kind, root / f"{kind}-ckpt")
        run = root / f"{kind}-run"
        report = train(TrainConfig(out=str(run), text=str(ckpt), **COMMON))
        out[kind] = (ckpt, run, report)
    return out


KINDS = ("t5", "bart", "bert2bert")


@pytest.mark.parametrize("kind", KINDS)
def test_run_trains_with_the_checkpoints_tokenizer(runs, kind):
    ckpt, run, report = runs[kind]
    own = checkpoint_tokenizer(ckpt)
    saved = tf.PreTrainedTokenizerFast.from_pretrained(str(run / "tokenizer"))
    texts = [f"vqa: {e.input}" for e in build_task("vqa", "val", 8, source="digits")] + ["zebra quokka"]
    assert saved(texts).input_ids == own(texts).input_ids  # the same ids: the checkpoint's vocabulary
    assert len(saved) == len(own) == len(tf.AutoTokenizer.from_pretrained(str(ckpt)))  # nothing added
    assert saved.eos_token_id == own.eos_token_id and saved.pad_token_id == own.pad_token_id
    assert report["tokenizer"] == {"kind": "checkpoint", "class": type(own).__name__, "tokens": len(own)}
    base = json.loads((run / "model" / "vlpet.json").read_text())["base"]
    assert base["tokenizer"] == "checkpoint"


@pytest.mark.parametrize("kind", KINDS)
def test_embeddings_are_the_checkpoints_rows(runs, kind):
    """The rebuilt model's embeddings are the checkpoint's, row for row (same count: T5's spare rows kept)."""
    from vlpet_fx.export import load
    from vlpet_fx.zoo import load_model

    ckpt, run, _ = runs[kind]
    original, _ = load_model(str(ckpt))
    model = load(run / "model")  # base rebuilt from the manifest: text dir + its tokenizer, fingerprint checked
    for get in ("get_input_embeddings", "get_output_embeddings"):
        torch.testing.assert_close(getattr(model.text, get)().weight, getattr(original, get)().weight,
                                   rtol=0, atol=0)


def test_special_ids_come_from_the_tokenizer_where_the_config_has_none(runs):
    ckpt, _, _ = runs["bert2bert"]
    tok = checkpoint_tokenizer(ckpt)
    m = build_vl(str(ckpt), tokenizer=tok)
    assert m.text.config.decoder_start_token_id == tok.cls_token_id
    assert m.text.config.pad_token_id == tok.pad_token_id
    assert m.text.generation_config.eos_token_id == tok.eos_token_id == tok.sep_token_id
    ckpt, _, _ = runs["bart"]  # a config that names its ids keeps them
    m = build_vl(str(ckpt), tokenizer=checkpoint_tokenizer(ckpt))
    assert (m.text.config.decoder_start_token_id, m.text.config.pad_token_id) == (2, 1)


@pytest.mark.parametrize("kind", KINDS)
def test_predict_uses_the_runs_tokenizer(runs, kind):
    """predict reproduces the training loop's final validation answers (same tokenizer, same ids)."""
    from vlpet_fx.infer import Predictor
    from vlpet_fx.train import TrainConfig

    _, run, _ = runs[kind]
    pred = Predictor.from_dir(run)
    assert len(pred.tok) == len(checkpoint_tokenizer(runs[kind][0]))
    rows = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
    exs = build_task("vqa", "val", 4, source="digits", seed=0)
    from vlpet_fx.infer.generate import generate_answers, pixel_inputs

    inputs = pixel_inputs(pred.model, pred.tok, [f"vqa: {e.input}" for e in exs], [e.images for e in exs], "cpu")
    answers = [g.text for g in generate_answers(pred.model, pred.tok, inputs, max_new_tokens=TrainConfig().max_new_tokens,
                                                 with_scores=False)]
    assert [r["input"] for r in rows] == [f"vqa: {e.input}" for e in exs]
    assert answers == [r["prediction"] for r in rows]
    # unknown words: those spelt with the unknown token, not those missing as whole words from a subword vocabulary
    assert pred.unknown_words("vqa: is this a quokka €") == ["€"]


def test_builtin_models_keep_the_word_level_tokenizer(vl_run):
    report = json.loads((vl_run / "report.json").read_text())
    assert report["tokenizer"]["kind"] == "words"
    assert json.loads((vl_run / "model" / "vlpet.json").read_text())["base"]["tokenizer"] == "words"


def test_encoder_decoder_model_resizes_for_the_word_level_tokenizer():
    """`resize_token_embeddings` is not implemented by EncoderDecoderModel: both halves are resized instead."""
    m = build_vl("bert2bert", "tiny", vocab_size=50)
    assert m.text.encoder.get_input_embeddings().num_embeddings == 50
    assert m.text.decoder.get_input_embeddings().num_embeddings == 50
    assert m.text.decoder.get_output_embeddings().weight.shape[0] == 50
    assert m.text.config.decoder_start_token_id == 0 and m.text.generation_config.eos_token_id == 1
    _, kw = m.example_inputs()
    ids = kw["input_ids"].clamp(max=49)
    out = m(input_ids=ids, attention_mask=kw["attention_mask"], pixel_values=kw["pixel_values"],
            decoder_input_ids=kw["decoder_input_ids"].clamp(max=49))
    assert out.logits.shape[-1] == 50


def test_a_tokenizer_without_pad_gets_one_row_added(tmp_path):
    ckpt = save_checkpoint("bert2bert", tmp_path / "nopad", drop_pad=True)
    tok = checkpoint_tokenizer(ckpt)
    n = len(tf.AutoTokenizer.from_pretrained(str(ckpt)))
    assert len(tok) == n + 1 and tok.pad_token == "<pad>"
    from vlpet_fx.zoo import load_model

    original, _ = load_model(str(ckpt))
    m = build_vl(str(ckpt), tokenizer=tok)
    emb = m.text.encoder.get_input_embeddings().weight
    assert emb.shape[0] == n + 1
    torch.testing.assert_close(emb[:n], original.encoder.get_input_embeddings().weight, rtol=0, atol=0)


def test_directories_without_a_tokenizer_and_broken_tokenizers(tmp_path):
    from vlpet_fx.train.loop import uses_own_tokenizer

    assert not uses_own_tokenizer("t5") and not has_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    assert uses_own_tokenizer(str(tmp_path))
    with pytest.raises(VlpetError, match="cannot load the tokenizer in") as err:
        checkpoint_tokenizer(tmp_path)
    assert "\n" not in str(err.value)


def test_bert2bert_from_the_users_own_bert_directory(tmp_path):
    """`vlpet-fx bert2bert OUT --encoder DIR`: the same code as for the packaged MiniLM, on a local BERT."""
    from vlpet_fx.zoo.pretrained import write_bert2bert

    tok = wordpiece("bert")
    torch.manual_seed(0)
    bert = tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=64, vocab_size=len(tok), max_position_embeddings=64))
    bert.save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    out = write_bert2bert(tmp_path / "b2b", encoder=tmp_path / "bert")
    model = tf.EncoderDecoderModel.from_pretrained(str(out))
    for part in (model.encoder, model.decoder):
        torch.testing.assert_close(part.get_input_embeddings().weight, bert.get_input_embeddings().weight)
    assert model.config.decoder_start_token_id == tok.cls_token_id
    assert checkpoint_tokenizer(out)("seven").input_ids == tok("seven").input_ids
    with pytest.raises(VlpetError, match="not a checkpoint directory"):
        write_bert2bert(tmp_path / "other", encoder=tmp_path / "nowhere")
    assert not (tmp_path / "other").exists()
