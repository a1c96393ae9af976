"""Hugging Face encoder-decoder families at four sizes (random weights, built from configs).

``small``/``base``/``large`` follow the public checkpoints' shapes where the family has one (t5-small/base/
large, bart-base/large, mt5-small/base/large, opus-mt for Marian, bert-base/large for BERT2BERT); otherwise
they use the BART widths. ``tiny`` is for tests; ``large`` is mostly for the compiler-scaling benchmark
(build it with ``device="meta"`` to capture it without allocating its weights).
"""

from __future__ import annotations

import transformers as tf

from .registry import register_model

# family -> (config class, model class, {size: config kwargs}); "tiny" shapes keep tests fast.
_BART_LIKE = dict(
    tiny=dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
              encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=256, max_position_embeddings=128),
    small=dict(d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8, decoder_attention_heads=8,
               encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_position_embeddings=1024),
    base=dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
              decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024),
    large=dict(d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
               decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024),
)

_T5 = dict(
    tiny=dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=256),
    small=dict(d_model=512, d_ff=2048, d_kv=64, num_layers=6, num_decoder_layers=6, num_heads=8, vocab_size=32128),
    base=dict(d_model=768, d_ff=3072, d_kv=64, num_layers=12, num_decoder_layers=12, num_heads=12, vocab_size=32128),
    large=dict(d_model=1024, d_ff=4096, d_kv=64, num_layers=24, num_decoder_layers=24, num_heads=16, vocab_size=32128),
)
_MT5 = dict(
    tiny=dict(_T5["tiny"], feed_forward_proj="gated-gelu"),
    small=dict(d_model=512, d_ff=1024, d_kv=64, num_layers=8, num_decoder_layers=8, num_heads=6, vocab_size=250112,
               feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    base=dict(d_model=768, d_ff=2048, d_kv=64, num_layers=12, num_decoder_layers=12, num_heads=12, vocab_size=250112,
              feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    large=dict(d_model=1024, d_ff=2816, d_kv=64, num_layers=24, num_decoder_layers=24, num_heads=16,
               vocab_size=250112, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
)

FAMILIES = {
    "t5": (tf.T5Config, tf.T5ForConditionalGeneration, _T5, "T5 (t5-small / t5-base shapes)"),
    "mt5": (tf.MT5Config, tf.MT5ForConditionalGeneration, _MT5, "mT5, gated-GELU FFN (mt5-small / mt5-base shapes)"),
    "bart": (tf.BartConfig, tf.BartForConditionalGeneration,
             {**_BART_LIKE, "base": dict(_BART_LIKE["base"], vocab_size=50265),
              "large": dict(_BART_LIKE["large"], vocab_size=50265)}, "BART (bart-base shape)"),
    "mbart": (tf.MBartConfig, tf.MBartForConditionalGeneration, _BART_LIKE, "mBART (pre-LN BART)"),
    "pegasus": (tf.PegasusConfig, tf.PegasusForConditionalGeneration, _BART_LIKE, "Pegasus (sinusoidal positions)"),
    "marian": (tf.MarianConfig, tf.MarianMTModel,
               {**_BART_LIKE, "small": dict(_BART_LIKE["small"], vocab_size=58101, decoder_vocab_size=58101)},
               "Marian (opus-mt shape at small)"),
    "blenderbot": (tf.BlenderbotConfig, tf.BlenderbotForConditionalGeneration, _BART_LIKE, "Blenderbot"),
    "m2m100": (tf.M2M100Config, tf.M2M100ForConditionalGeneration, _BART_LIKE, "M2M100"),
}


def _register_family(name: str) -> None:
    config_cls, model_cls, sizes, description = FAMILIES[name]

    def build(size: str):
        kwargs = dict(sizes[size])
        kwargs.setdefault("vocab_size", 32128 if size != "tiny" else 256)
        kwargs.setdefault("decoder_start_token_id", 0)
        kwargs.setdefault("pad_token_id", 0)
        return model_cls(config_cls(**kwargs))

    register_model(name, description)(build)


for _name in FAMILIES:
    _register_family(_name)

_BERT = dict(
    tiny=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=256,
              max_position_embeddings=128),
    small=dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522),
    base=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=30522),
    large=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
               vocab_size=30522),
)


@register_model("bert2bert", "BERT2BERT EncoderDecoderModel (MiniLM-L6 / bert-base shapes)")
def bert2bert(size: str):
    enc = tf.BertConfig(**_BERT[size])
    dec = tf.BertConfig(**_BERT[size], is_decoder=True, add_cross_attention=True)
    cfg = tf.EncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id = 1
    cfg.pad_token_id = 0
    return tf.EncoderDecoderModel(config=cfg)
