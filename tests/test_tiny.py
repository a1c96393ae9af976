"""zoo.tiny: shrunk configs stay consistent (checked on the configs alone, nothing is built)."""

from __future__ import annotations

import pytest

from vlpet_fx.zoo import tiny
from vlpet_fx.zoo.tiny import tiny_config

pytest.importorskip("transformers")


def test_cut_layers_keeps_every_kind_that_fits():
    assert tiny._cut_layers(["linear_attention"] * 3 + ["full_attention"], 2) == ["linear_attention", "full_attention"]
    assert tiny._cut_layers(["a", "a", "b", "c"], 3) == ["a", "c", "b"]
    assert tiny._cut_layers(["a", "a", "a", "b", "c"], 2) == ["a", "b"]
    assert tiny._cut_layers(["a", "b", "a"], 2) == ["a", "b"]  # already covered: unchanged
    assert tiny._cut_layers([64, 64, 128], 2) == [64, 64]  # numbers are cut as they are


def test_multi_head_attention_stays_multi_head():
    cfg = tiny_config("deepseek_v2")  # latent attention: k/v expanded to every query head
    assert cfg.num_key_value_heads == cfg.num_attention_heads == tiny.HEADS
    assert tiny_config("llama").num_key_value_heads == tiny.HEADS  # MHA in the defaults
    assert tiny_config("mistral").num_key_value_heads == tiny.KV_HEADS  # GQA in the defaults stays GQA


def test_routing_fits_the_experts():
    cfg = tiny_config("deepseek_v3")
    experts = cfg.n_routed_experts
    assert experts % cfg.n_group == 0 and cfg.topk_group <= cfg.n_group
    assert cfg.num_experts_per_tok <= cfg.topk_group * experts // cfg.n_group
    assert tiny_config("deepseek_v2").num_experts_per_tok == tiny.TOP_K  # named where the bare config has none


def test_hybrids_keep_a_softmax_attention_layer():
    for model_type in ("qwen3_next", "qwen3_5_text", "lfm3"):
        kinds = tiny_config(model_type).layer_types
        assert len(kinds) == 2 and "full_attention" in kinds, (model_type, kinds)
    jamba = tiny_config("jamba")  # kinds given by a period and an offset
    assert jamba.attn_layer_period <= 2 and jamba.attn_layer_offset < jamba.attn_layer_period


def test_derived_settings_follow_the_shrunk_ones():
    z = tiny_config("zamba2")  # head widths derived from hidden / heads in the config class
    assert z.attention_head_dim == 2 * z.hidden_size // z.num_attention_heads
    assert z.mamba_headdim == z.mamba_expand * z.hidden_size // z.n_mamba_heads
    t5g = tiny_config("t5gemma")  # the decoder's cross-attention reads the encoder's width
    assert t5g.decoder.cross_attention_hidden_size == t5g.encoder.hidden_size
    blt = tiny_config("blt")
    assert blt.encoder_hash_byte_group_vocab <= tiny.VOCAB
    assert blt.encoder_config.hidden_size_global == blt.global_config.hidden_size


def test_audio_projection_width_and_windows():
    """An audio encoder's projection into the language model takes the text width (qwen3_asr's bare defaults name
    3584 for a 2048-wide text model); a CTC head's small ``output_dim`` (granite_speech: a vocabulary) does not.
    Windows in mel frames keep their defaults (qwen3_asr hard-codes the embeddings a 100-frame window makes)."""
    import transformers

    q = tiny_config("qwen3_asr")
    assert q.audio_config.output_dim == q.text_config.hidden_size
    default = transformers.AutoConfig.for_model("qwen3_asr").audio_config
    assert (q.audio_config.n_window, q.audio_config.n_window_infer) == (default.n_window, default.n_window_infer)
    g = tiny_config("granite_speech")
    ctc = transformers.AutoConfig.for_model("granite_speech").encoder_config.output_dim
    assert g.encoder_config.output_dim == ctc < g.text_config.hidden_size


def test_nested_width_links_and_kind_lists_without_a_count():
    """A setting two levels down naming a sibling's width follows it (nemo_speechlm: the diarization head reads its
    audio model's width); a config whose layer count is its list of layer kinds keeps one layer of each kind."""
    import transformers

    n = tiny_config("nemo_speechlm")
    diar = n.audio_config.diarization_config
    assert diar.head_config.audio_hidden_size == diar.audio_config.hidden_size < 512
    kinds = transformers.AutoConfig.for_model("nemo_speechlm").text_config.layer_types
    assert len(kinds) > 10  # the defaults' 52 layers
    assert sorted(n.text_config.layer_types) == sorted(set(kinds))
    assert n.text_config.num_hidden_layers == len(set(kinds))
    assert len(tiny_config("nemotron_h").layer_types) == 4  # four kinds in four layers: unchanged
