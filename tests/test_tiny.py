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


# ---- settings derived from others that the shrink must keep consistent (the families named build since) ----

def test_per_layer_overrides_follow_the_tiny_layers():
    """A heterogeneous config (``per_layer_config``: layers that differ from the global settings) keeps, for each
    tiny layer, the overrides of a default layer of its kind, shrunk like the global settings; reading a per-layer
    setting globally is refused again afterwards (as in transformers)."""
    import transformers
    from transformers.integrations.heterogeneity.configuration_utils import AmbiguousGlobalPerLayerAttributeError

    g = tiny_config("gemma4_text")  # full-attention layers have a wider head (an override of head_dim)
    default = transformers.AutoConfig.for_model("gemma4_text")
    assert g.is_heterogeneous and g.num_hidden_layers == len(g.layer_types) == tiny.LAYERS
    for i, kind in enumerate(g.layer_types):
        assert g.per_layer_config[i].head_dim == default.per_layer_config[kind].head_dim
    assert {g.per_layer_config[i].head_dim for i in range(tiny.LAYERS)} == {256, 512}  # both widths kept
    with pytest.raises(AmbiguousGlobalPerLayerAttributeError):
        g.head_dim  # noqa: B018 -- a per-layer setting, as in the default config
    alone = tiny.shrink(transformers.AutoConfig.for_model("gemma4_text"))  # shrink() on its own: the same
    assert [alone.per_layer_config[i].head_dim for i in range(tiny.LAYERS)] == [
        default.per_layer_config[k].head_dim for k in alone.layer_types]
    with pytest.raises(AmbiguousGlobalPerLayerAttributeError):
        alone.head_dim  # noqa: B018
    d = tiny_config("dots3_note_text")  # sliding layers: fewer heads and another latent rank than the others
    default = transformers.AutoConfig.for_model("dots3_note_text")
    assert set(d.layer_types) == set(default.layer_types)
    for i, kind in enumerate(d.layer_types):
        layer, old = d.per_layer_config[i], default.per_layer_config[kind]
        assert layer.num_attention_heads == min(old.num_attention_heads, tiny.HEADS)
        assert layer.num_key_value_heads == layer.num_attention_heads  # equal in the defaults: kept equal
        assert layer.kv_lora_rank == min(old.kv_lora_rank, tiny.LATENT)
        assert layer.qk_nope_head_dim == old.qk_nope_head_dim  # head widths are kept


def test_layer_sources_pick_a_default_layer_of_each_kind():
    assert tiny._layer_sources(["s", "s", "f", "s", "f"], ["s", "f"], 2) == [0, 2]
    assert tiny._layer_sources(["f", "s", "s"], ["f", "s"], 2) == [0, 1]
    assert tiny._layer_sources(None, None, 3) == [0, 1, 2]


def test_shared_cache_layers_leave_a_filler_of_each_kind():
    """The last layers that reuse an earlier layer's key/value cache keep their fraction of the layers, rounded
    down (gemma3n: 15 of 35 -> 0 of 2, so both kinds fill a cache); all of them stay all of them."""
    import transformers

    g = tiny_config("gemma3n_text")
    default = transformers.AutoConfig.for_model("gemma3n_text")
    assert g.num_kv_shared_layers == default.num_kv_shared_layers * g.num_hidden_layers // default.num_hidden_layers
    assert g.num_kv_shared_layers < g.num_hidden_layers
    assert len(g.kv_sharing_modes) == g.num_hidden_layers  # raises where a kind of layer has no cache filler
    a = tiny_config("gemma4_unified_assistant").text_config  # every layer shares the target model's cache
    assert a.num_kv_shared_layers == a.num_hidden_layers == tiny.LAYERS


def test_sizes_derived_from_the_vocabulary_follow_it():
    """inkling2's unpadded vocabulary (966 under the padded one) keeps its ratio; gemma3n's per-layer embedding
    table and the first ids of its image and audio tokens keep their offsets from the language model's vocabulary
    (image and audio ids stay two consecutive blocks at its end)."""
    import transformers

    i = tiny_config("inkling2_text")
    default = transformers.AutoConfig.for_model("inkling2_text")
    assert i.unpadded_vocab_size == default.unpadded_vocab_size * i.vocab_size // default.vocab_size
    assert 0 < i.unpadded_vocab_size <= i.vocab_size
    g = tiny_config("gemma3n")
    d = transformers.AutoConfig.for_model("gemma3n")
    v, dv = g.text_config.vocab_size, d.text_config.vocab_size
    assert v == tiny.VOCAB
    assert v - g.vision_config.vocab_offset == dv - d.vision_config.vocab_offset
    assert v - g.audio_config.vocab_offset == dv - d.audio_config.vocab_offset
    assert g.audio_config.vocab_offset == g.vision_config.vocab_offset + g.vision_config.vocab_size
    assert g.text_config.vocab_size_per_layer_input == v - (dv - d.text_config.vocab_size_per_layer_input)


def test_per_layer_widths_and_parts_of_the_width():
    """A per-layer list of FFN widths is shrunk element by element (and cut to the layers); parts that sum to the
    width (reformer's axial position embedding) sum to the tiny width, in proportion."""
    g = tiny_config("gemma3n_text")
    assert list(g.intermediate_size) == [tiny.FFN] * g.num_hidden_layers
    r = tiny_config("reformer")
    assert sum(r.axial_pos_embds_dim) == r.hidden_size < 256
    old = (64, 192)  # the defaults' parts: 1:3
    assert r.axial_pos_embds_dim[0] == old[0] * r.hidden_size // sum(old)


def _coverage():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "coverage.py"
    spec = importlib.util.spec_from_file_location("coverage_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_not_buildable_only_when_the_default_config_fails_too(monkeypatch):
    """bench/coverage.py: a family whose tiny config fails to build is "not buildable" only when transformers'
    own default config fails too (on the meta device); else a failure of ours at step build."""
    cov = _coverage()
    assert cov.default_build("causal", "llama") == "ok"
    assert cov.default_build("causal", "gemma4_assistant") != "ok"  # its default config does not validate

    def broken(model_type, layers=tiny.LAYERS):
        raise ValueError("shrunk badly")

    monkeypatch.setattr(tiny, "tiny_config", broken)
    ours = cov.run_family("causal", "llama")
    assert (ours["status"], ours["step"], ours["default_build"]) == ("fail", "build", "ok")
    assert ours["reason"].startswith(cov.TINY_FAILS) and "shrunk badly" in ours["reason"]
    assert cov.cause_of(ours["reason"]) != "other"
    theirs = cov.run_family("causal", "gemma4_assistant")
    assert (theirs["status"], theirs["step"]) == ("not buildable", "build")
    assert "shrunk badly" in theirs["reason"]
    assert cov.summarise([ours, theirs])["causal"]["buildable"] == 1


def test_more_layers_give_two_of_each_repeated_kind():
    """With room for two layers of each kind, a kind the defaults repeat occurs twice (zamba's hybrid layers share
    one attention block, which needs two of them to build); with two layers, one of each kind as before."""
    assert tiny._cut_layers(list("lllhlh"), 4) == ["l", "l", "h", "h"]
    assert tiny._cut_layers(list("llllhll"), 4) == ["l", "l", "l", "h"]  # a kind the list names once: once
    assert tiny._cut_layers(list("lllhlh"), 2) == ["l", "h"]
    z = tiny_config("zamba", layers=4)
    assert z.num_hidden_layers == 4 and z.layers_block_type.count("hybrid") == 2
    assert tiny_config("zamba").num_hidden_layers == tiny.LAYERS


def test_ssm_heads_split_the_expanded_width():
    """mamba2: heads * head width == expand * width holds in the tiny config as in the defaults (the class checks
    it when saving)."""
    import transformers

    m = tiny_config("mamba2")
    d = transformers.AutoConfig.for_model("mamba2")
    assert d.num_heads * d.head_dim == d.expand * d.hidden_size
    assert m.num_heads * m.head_dim == m.expand * m.hidden_size and m.hidden_size < d.hidden_size
    m.validate()


def test_example_inputs_skip_audio_when_the_config_has_no_audio_tower():
    """gemma4's forward takes audio features, but its default config has no audio tower (``audio_config`` None):
    the example inputs are text (and no audio), and the forward runs on them."""
    import transformers

    from vlpet_fx.capture.inputs import build_example_inputs

    torch = pytest.importorskip("torch")
    config = tiny_config("gemma4")
    assert config.audio_config is None
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    built = build_example_inputs(model)
    assert built is not None
    _, args, kwargs = built
    assert "input_features" not in kwargs and kwargs["input_ids"].shape[0] > 0
    with torch.no_grad():
        assert model(*args, **kwargs).logits.shape[-1] == config.text_config.vocab_size
