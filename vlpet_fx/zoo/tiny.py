"""Tiny configs for any ``transformers`` family: shrink a config class's defaults generically.

Used by the coverage benchmark and the family tests: every size-like integer of a config (hidden widths,
feed-forward widths, layer/head/expert counts, vocabulary, image and audio sizes) is replaced by a small
value chosen by the *meaning of the setting* in transformers' shared config vocabulary, never by family.
Sub-configs (``text_config``, ``vision_config``, ``audio_config``, ``encoder``/``decoder``) are shrunk the
same way. Lists sized by the layer count (``layer_types`` ...) are cut to the new count; token ids that
would fall outside the smaller vocabulary are moved inside it.
"""

from __future__ import annotations

import re
from typing import Any

HIDDEN = 64
FFN = 128
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
LAYERS = 2
VOCAB = 512
EXPERTS = 4

# (regex over the setting's name, new value); first match wins. The hidden width is HEADS times the default head width
# (kept), so rotary sections, partial rotary sizes and heads * head_dim == hidden stay consistent.
_RULES: list[tuple[str, Any]] = [
    (r"^(num_key_value_heads|num_kv_heads|n_head_kv|multi_query_group_num|num_query_groups)$", KV_HEADS),
    (r"^(num_attention_heads|n_head|n_heads|num_heads|encoder_attention_heads|decoder_attention_heads"
     r"|attention_heads|num_attention_heads_.*)$", HEADS),
    (r"^(num_hidden_layers|num_layers|n_layer|n_layers|encoder_layers|decoder_layers|num_decoder_layers"
     r"|num_encoder_layers|depth|num_blocks)$", LAYERS),
    (r"^(hidden_size|d_model|n_embd|dim|embed_dim|model_dim|width|hidden_dim|word_embed_proj_dim"
     r"|embedding_size|projection_dim|out_hidden_size|vision_embed_dim|text_embed_dim)$", HIDDEN),
    (r"^(intermediate_size|ffn_dim|d_ff|n_inner|encoder_ffn_dim|decoder_ffn_dim|ffn_hidden_size|mlp_dim"
     r"|moe_intermediate_size|shared_expert_intermediate_size|expert_intermediate_size|inner_dim"
     r"|intermediate_dim|d_inner)$", FFN),
    (r"^(num_experts|num_local_experts|n_routed_experts|moe_num_experts|num_routed_experts)$", EXPERTS),
    (r"^(num_experts_per_tok|num_selected_experts|top_k|moe_topk|num_experts_per_token)$", 2),
    (r"^(vocab_size|decoder_vocab_size|text_vocab_size)$", VOCAB),
    (r"^(image_size)$", 32),
    (r"^(patch_size)$", 8),
    (r"^(max_source_positions)$", 16),
    (r"^(num_mel_bins)$", 16),
]
_COMPILED = [(re.compile(p), v) for p, v in _RULES]
_LAYER_KEYS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "decoder_layers",
               "num_decoder_layers", "num_encoder_layers")
_TOKEN_ID = re.compile(r"^(.*_token_id|.*_token_index|decoder_start_token_id|.*_token_ids)$")


_HIDDEN_KEY = re.compile(_RULES[3][0])
_HEADS_KEY = re.compile(_RULES[1][0])
MAX_HIDDEN = 1024


def _shrink_value(name: str, value: Any, hidden: int) -> Any:
    if isinstance(value, bool) or not isinstance(value, int):
        return value
    for pat, new in _COMPILED:
        if pat.match(name):
            new = hidden if pat is _COMPILED[3][0] else new
            return min(value, new) if value > 0 else value
    return value


def _head_dim(attrs: dict) -> int | None:
    """The default width of one attention head: kept, so rotary sections and partial-rotary sizes stay valid."""
    for key in ("head_dim", "d_kv", "kv_channels", "attention_head_dim"):
        if isinstance(attrs.get(key), int) and attrs[key] > 0:
            return attrs[key]
    hidden = next((v for k, v in attrs.items() if _HIDDEN_KEY.match(k) and isinstance(v, int) and v > 0), None)
    heads = next((v for k, v in attrs.items() if _HEADS_KEY.match(k) and isinstance(v, int) and v > 0), None)
    return hidden // heads if hidden and heads and hidden % heads == 0 else None


def shrink(config) -> Any:
    """Shrink ``config`` (a ``PretrainedConfig``) in place and return it."""
    attrs = dict(vars(config))
    hd = _head_dim(attrs)
    hidden = min(HEADS * hd, MAX_HIDDEN) if hd else HIDDEN
    old_layers = {k: attrs[k] for k in _LAYER_KEYS if isinstance(attrs.get(k), int)}
    for name, value in attrs.items():
        if name.startswith("_"):
            continue
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a sub-config
            shrink(value)
            continue
        new = _shrink_value(name, value, hidden)
        if new is not value:
            setattr(config, name, new)
    new_layers = {k: getattr(config, k) for k in old_layers}
    for name, value in vars(config).items():
        if isinstance(value, (list, tuple)) and value and not name.startswith("_"):
            for key, n in old_layers.items():
                if len(value) == n and new_layers[key] < n:
                    setattr(config, name, type(value)(value[: new_layers[key]]))
                    break
    vocab = getattr(config, "vocab_size", None)
    text = getattr(config, "text_config", None)
    if not isinstance(vocab, int) and text is not None:  # a VLM: its token ids index the language model's vocabulary
        vocab = getattr(text, "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        spare = vocab - 1
        for name in sorted(vars(config)):
            value = getattr(config, name)
            if _TOKEN_ID.match(name) and isinstance(value, int) and not isinstance(value, bool) and value >= vocab:
                setattr(config, name, spare)  # distinct ids at the top of the vocabulary
                spare -= 1
    return config


# widths of a vision/audio sub-model's output that feed the language model: set to the text width (the bare
# config classes' defaults do not always agree; published checkpoints do). ``hidden_size`` is such an output
# width only in a sub-config whose own width is ``embed_dim``.
_TO_TEXT = ("out_hidden_size", "text_hidden_size")


def _subconfigs(config) -> list:
    return [v for v in vars(config).values() if hasattr(v, "to_dict") and hasattr(v, "model_type")]


def tiny_config(model_type: str):
    """The config class of ``model_type`` (a key of transformers' ``CONFIG_MAPPING``) with shrunk defaults."""
    import transformers as tf

    config = tf.AutoConfig.for_model(model_type)
    text = getattr(config, "text_config", None) or config
    old_text = getattr(text, "hidden_size", None)
    linked = [(c, k) for c in _subconfigs(config) if c is not text and isinstance(old_text, int)
              for k in _TO_TEXT + (("hidden_size",) if isinstance(getattr(c, "embed_dim", None), int) else ())
              if isinstance(getattr(c, k, None), int)]
    linked += [(c, k) for c in _subconfigs(config) if c is not text and isinstance(old_text, int)
               for k in ("projection_dim", "output_dim", "text_embed_dim") if getattr(c, k, None) == old_text]
    config = shrink(config)
    for c, k in linked:  # e.g. a vision merger's output width = the language model's width
        setattr(c, k, text.hidden_size)
    if getattr(config, "is_encoder_decoder", False) and getattr(config, "decoder_start_token_id", None) is None:
        # saved checkpoints name the decoder's first token; a bare config may not
        pad = getattr(config, "pad_token_id", None)
        config.decoder_start_token_id = pad if isinstance(pad, int) else 0
    return config
