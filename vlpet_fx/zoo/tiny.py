"""Tiny configs for any ``transformers`` family: shrink a config class's defaults generically.

Used by the coverage benchmark and the family tests: every size-like integer of a config (hidden widths,
feed-forward widths, layer/head/expert counts, vocabulary, image and audio sizes) is replaced by a small
value chosen by the *meaning of the setting* in transformers' shared config vocabulary, never by family.
Sub-configs (``text_config``, ``vision_config``, ``audio_config``, ``encoder``/``decoder``) are shrunk the
same way. Lists sized by the layer count (``layer_types`` ...) are cut to the new count keeping every kind of
layer that fits (a hybrid keeps a softmax-attention layer), periods of layer kinds are brought inside it; token
ids that would fall outside the smaller vocabulary are moved inside it. Multi-head attention stays multi-head
(latent attention expands k/v to every query head), routing fits the experts (top-k, expert groups), and the
config class is built again from the shrunk settings so that settings it derives (head widths, SSM head widths,
a decoder's cross-attention width) follow them. Widths that name another sub-config's width stay equal to it, at
any depth (a diarization head's ``audio_hidden_size``); an audio encoder's ``output_dim`` no narrower than its own
width is the width it hands to the language model. A config whose layer count is its list of layer kinds keeps
one layer of each kind. An audio encoder's windows in mel frames keep their defaults.

Settings derived from others stay consistent with the shrunk ones: per-layer overrides of a heterogeneous config
(``per_layer_config``) are shrunk the same way and re-indexed to the tiny layers by kind; per-layer lists of widths
are shrunk element by element; the count of the last layers that share an earlier layer's cache keeps its
fraction of the layers (rounded down); sizes derived from the vocabulary (an unpadded vocabulary, a modality's
first token id after the text vocabulary) follow it; parts that sum to the width (axial position embeddings) sum
to the tiny width; an SSM's heads split ``expand`` times the tiny width. ``tiny_config(..., layers=4)`` gives two
layers of each kind a hybrid repeats (layers of a kind may share one block, which takes two of them).
"""

from __future__ import annotations

import copy
import dataclasses
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
TOP_K = 2
LATENT = 128
SSM_HEADS = 8
SSM_STATE = 16
SSM_CHUNK = 16

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
     r"|intermediate_dim|d_inner|expert_ffn_hidden_size)$", FFN),
    (r"^(num_experts|num_local_experts|n_routed_experts|moe_num_experts|num_routed_experts|zero_expert_num)$",
     EXPERTS),
    (r"^(num_experts_per_tok|num_selected_experts|top_k|moe_topk|moe_top_k|moe_k|top_k_experts"
     r"|num_experts_per_token)$", TOP_K),
    # how many of the layers are sparse (MoE): one of the tiny model's layers
    (r"^(num_sparse_\w+_layers)$", 1),
    # state-space (Mamba-2 style) mixers: heads, state width and scan chunk in tokens (the tiny inputs are short)
    (r"^(mamba_n_heads|mamba_num_heads|n_mamba_heads|ssm_num_heads)$", SSM_HEADS),
    (r"^(mamba_d_state|ssm_state_size|state_size|d_state)$", SSM_STATE),
    (r"^(mamba_chunk_size|chunk_size)$", SSM_CHUNK),
    # routed experts in groups (group-limited routing): EXPERTS / 2 experts per group, tokens pick from one group
    (r"^(n_group|num_expert_group|n_expert_groups)$", 2),
    (r"^(topk_group)$", 1),
    # the compressed (latent) widths of multi-head latent attention (not below the shipped LoRA rule's rank)
    (r"^(q_lora_rank|kv_lora_rank|o_lora_rank)$", LATENT),
    (r"^(vocab_size|decoder_vocab_size|text_vocab_size|\w*hash\w*_vocab)$", VOCAB),
    (r"^(image_size)$", 32),
    (r"^(patch_size)$", 8),
    (r"^(max_source_positions)$", 16),
    (r"^(num_mel_bins)$", 16),
    # an audio encoder's window in mel frames (n_window ...) is kept: an encoder may hard-code how many embeddings
    # a window of the default length makes
]
_COMPILED = [(re.compile(p), v) for p, v in _RULES]
_LAYER_KEYS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "decoder_layers",
               "num_decoder_layers", "num_encoder_layers")
_TOKEN_ID = re.compile(r"^(.*_token_id|.*_token_index|decoder_start_token_id|.*_token_ids)$")


_HIDDEN_KEY = re.compile(_RULES[3][0])
_HEADS_KEY = re.compile(_RULES[1][0])
MAX_HIDDEN = 1024


def _shrink_value(name: str, value: Any, hidden: int, layers: int = LAYERS) -> Any:
    if isinstance(value, (list, tuple)) and value and all(_count(v) for v in value):  # per-layer widths ...
        new = type(value)(_shrink_value(name, v, hidden, layers) for v in value)
        return value if list(new) == list(value) else new
    if isinstance(value, bool) or not isinstance(value, int):
        return value
    for pat, new in _COMPILED:
        if pat.match(name):
            new = hidden if pat is _COMPILED[3][0] else layers if pat is _COMPILED[2][0] else new
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


_KV_KEY = re.compile(_RULES[0][0])
# the names of the query-head count, in the order a config is searched for it
_HEADS_KEY_ORDER = ("num_attention_heads", "n_head", "n_heads", "num_heads", "attention_heads")


_EXPERTS_KEY = re.compile(_RULES[5][0])
_TOP_K_KEY = re.compile(_RULES[6][0])


def _name_top_k(config) -> None:
    """A bare config with routed experts but no top-k (published checkpoints name one) routes to TOP_K experts."""
    attrs = vars(config)
    if any(_EXPERTS_KEY.match(k) and isinstance(v, int) and v > 0 for k, v in attrs.items()):
        for k, v in list(attrs.items()):
            if _TOP_K_KEY.match(k) and v is None:
                setattr(config, k, TOP_K)


def _keep_kv_equal_to_heads(config, old: dict) -> None:
    """Multi-head attention stays multi-head: where the defaults have as many key/value heads as query heads, so
    does the tiny config (latent-attention models expand k/v to every query head, whatever the k/v head count)."""
    heads = next((k for k in old if _HEADS_KEY.match(k) and isinstance(old[k], int) and old[k] > 0), None)
    if heads is None:
        return
    for k, v in old.items():
        if _KV_KEY.match(k) and v == old[heads] and getattr(config, k) != getattr(config, heads):
            setattr(config, k, getattr(config, heads))


def _cut_layers(values: list, n: int) -> list:
    """The first ``n`` entries of a per-layer list, keeping every kind of layer it names (as many as fit).

    A hybrid model lists layer kinds (``["linear_attention"] * 3 + ["full_attention"]``, mamba/attention ...); its
    first two would all be of one kind, and the tiny model would have no softmax attention at all. Kinds are
    only strings; numbers (per-layer widths, ids) are cut as they are. Where ``n`` leaves room for two layers of
    each kind, a kind the list repeats occurs twice (layers of one kind may share weights, which takes two)."""
    cut = values[:n]
    if not n or not all(isinstance(v, str) for v in values):
        return cut
    kinds = list(dict.fromkeys(values))
    for times in (1, 2) if n >= 2 * len(kinds) else (1,):
        for kind in [k for k in kinds if cut.count(k) < min(times, values.count(k))]:
            while cut.count(kind) < min(times, values.count(kind)):
                # replace from the end a layer whose kind occurs more than `times` times; the first layer stays
                i = next((i for i in range(n - 1, 0, -1) if cut[i] != kind and cut.count(cut[i]) > times), None)
                if i is None:
                    break
                cut[i] = kind
    return cut


_PERIOD = re.compile(r"^(.*layer.*)_(period|interval|frequency)$")


def _every_period_in_reach(config, old: dict, layers: int) -> None:
    """Layer kinds given by a period and an offset (an attention layer every 8 layers from the 4th, ...): the
    period and offset are brought inside the tiny layer count, so each kind still occurs."""
    if layers < 2:
        return
    for key, period in old.items():
        m = _PERIOD.match(key)
        if not m or isinstance(period, bool) or not isinstance(period, int) or period <= layers:
            continue
        setattr(config, key, layers)
        for suffix in ("offset", "start", "start_index"):
            off = f"{m.group(1)}_{suffix}"
            if isinstance(old.get(off), int) and not isinstance(old.get(off), bool):
                setattr(config, off, old[off] % layers)


def _overrides(config) -> dict[int, dict[str, Any]] | None:
    """The per-layer overrides of a heterogeneous config (``per_layer_config``: layer index -> the settings in which
    that layer differs from the global ones), or None for a config whose layers all read the global settings."""
    spec = vars(config).get("_heterogeneity_spec")
    overrides = getattr(spec, "per_layer_overrides", None)
    return {int(i): dict(o) for i, o in overrides.items()} if isinstance(overrides, dict) else None


def _allow_global(config, on: bool) -> None:
    """Let the settings a heterogeneous config overrides per layer be read and written globally (transformers
    refuses that by default), for ``config`` and every sub-config; ``on=False`` restores the refusal."""
    for _, c in _tree(config):
        if _overrides(c) is not None and on:
            vars(c)["allow_global_per_layer_attribute_access"] = True
        else:
            vars(c).pop("allow_global_per_layer_attribute_access", None)


def _layer_sources(old_kinds, new_kinds, n: int) -> list[int]:
    """For each of the ``n`` tiny layers, the layer of the default model it stands for: the same index where the
    kind is the same (or no kinds are listed), else the first default layer of that kind not yet taken."""
    if not isinstance(old_kinds, (list, tuple)) or not isinstance(new_kinds, (list, tuple)) or len(new_kinds) != n:
        return list(range(n))
    taken: set[int] = set()
    out = []
    for i, kind in enumerate(new_kinds):
        if i < len(old_kinds) and old_kinds[i] == kind and i not in taken:
            j = i
        else:
            j = next((j for j, k in enumerate(old_kinds) if k == kind and j not in taken), i)
        taken.add(j)
        out.append(j)
    return out


def _shrink_overrides(config, old: dict, overrides: dict[int, dict[str, Any]], hidden: int) -> dict[int, dict]:
    """The per-layer overrides of a heterogeneous config, for its tiny layers: each tiny layer takes the overrides
    of the default layer of its kind (``_layer_sources``), shrunk by the same rules as the global settings (head
    counts, latent ranks ...); a layer whose default key/value heads equal its query heads keeps them equal."""
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or isinstance(n, bool):
        n = max(overrides, default=-1) + 1
    sources = _layer_sources(old.get("layer_types"), getattr(config, "layer_types", None), n)
    out: dict[int, dict] = {}
    for i, j in enumerate(sources):
        if j not in overrides:
            continue
        layer = {k: _shrink_value(k, v, hidden) for k, v in overrides[j].items()}
        heads = next((k for k in _HEADS_KEY_ORDER if k in layer or k in old), None)
        if heads is not None:
            old_heads = overrides[j].get(heads, old.get(heads))
            for k in [k for k in overrides[j] if _KV_KEY.match(k)]:
                if overrides[j][k] == old_heads:
                    layer[k] = layer.get(heads, getattr(config, heads, None))
        out[i] = layer
    return out


# a count of the model's last layers that reuse an earlier layer's key/value cache (``num_kv_shared_layers``)
_SHARED_LAYERS = re.compile(r"^(num|n)_\w*shared\w*_layers$")


def _shared_layers_in_reach(config, old: dict, old_layers: dict, new_layers: dict) -> None:
    """The count of the last layers that reuse an earlier layer's cache, fewer than all layers in the defaults and
    as many as the tiny layers or more, keeps its fraction of the layers, rounded down: layers that fill a cache
    of each kind stay in front of them. A count of all the layers stays all of them."""
    if "num_hidden_layers" in old_layers:
        before, after = old_layers["num_hidden_layers"], new_layers["num_hidden_layers"]
    elif len(set(old_layers.values())) == 1 and len(set(new_layers.values())) == 1:
        before, after = next(iter(old_layers.values())), next(iter(new_layers.values()))
    else:
        return
    if not isinstance(after, int) or after >= before:
        return
    for key, value in old.items():
        if not _SHARED_LAYERS.match(key) or isinstance(value, bool) or not isinstance(value, int):
            continue
        if value == before:
            setattr(config, key, after)
        elif after <= value < before:
            setattr(config, key, value * after // before)


def _parts_of_width(config, old: dict) -> None:
    """A list of widths that sums to the config's width in the defaults (the axial position embedding's parts of
    the hidden width) is rescaled to sum to the tiny width, each part in proportion (the last takes the rest)."""
    own = next((k for k in _WIDTH_KEYS if _count(old.get(k))), None)
    if own is None or not _count(getattr(config, own, None)) or getattr(config, own) >= old[own]:
        return
    before, after = old[own], getattr(config, own)
    for key, value in old.items():
        if (key.startswith("_") or not isinstance(value, (list, tuple)) or len(value) < 2
                or not all(_count(v) and v > 0 for v in value) or sum(value) != before):
            continue
        parts = [max(1, v * after // before) for v in value[:-1]]
        if sum(parts) < after:
            setattr(config, key, type(value)([*parts, after - sum(parts)]))


_EXPAND = re.compile(r"^(\w+_)?expand$")


def _inner_heads_follow_the_width(config, before) -> None:
    """A state-space mixer's inner width is ``expand`` times the width, split into heads of the head width: where
    the defaults' heads times head width equal that product and the shrunk (and rebuilt) config's do not, the head
    count follows the tiny width (the head width is kept). For ``config`` and every sub-config."""
    for path, c in _tree(config):
        old = vars(_at(before, path) or object())
        hidden = next((k for k in _WIDTH_KEYS if _count(old.get(k))), None)
        if hidden is None or not _count(getattr(c, hidden, None)):
            continue
        for ek, expand in old.items():
            if not _EXPAND.match(ek) or not _count(expand) or expand <= 0:
                continue
            prefix = ek[: -len("expand")]
            for hk in (f"{prefix}num_heads", f"{prefix}n_heads"):
                for dk in (f"{prefix}head_dim", f"{prefix}d_head", f"{prefix}headdim"):
                    heads, width = old.get(hk), old.get(dk)
                    if not (_count(heads) and _count(width) and width > 0 and heads * width == expand * old[hidden]):
                        continue
                    inner, now = getattr(c, ek) * getattr(c, hidden), getattr(c, hk) * getattr(c, dk)
                    if now != inner and inner % getattr(c, dk) == 0:
                        setattr(c, hk, inner // getattr(c, dk))


def shrink(config, layers: int = LAYERS) -> Any:
    """Shrink ``config`` (a ``PretrainedConfig``) in place to ``layers`` layers per stack and return it."""
    overrides = _overrides(config)
    opened = overrides is not None and "allow_global_per_layer_attribute_access" not in vars(config)
    if opened:  # the per-layer settings are read and shrunk globally first, then per layer
        vars(config)["allow_global_per_layer_attribute_access"] = True
    attrs = {k: v for k, v in vars(config).items() if k not in ("_heterogeneity_spec",
                                                                 "allow_global_per_layer_attribute_access")}
    hd = _head_dim(attrs)
    hidden = min(HEADS * hd, MAX_HIDDEN) if hd else HIDDEN
    old_layers = {k: attrs[k] for k in _LAYER_KEYS if isinstance(attrs.get(k), int)}
    for name, value in attrs.items():
        if name.startswith("_"):
            continue
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a sub-config
            shrink(value, layers)
            continue
        new = _shrink_value(name, value, hidden, layers)
        if new is not value:
            setattr(config, name, new)
    _keep_kv_equal_to_heads(config, attrs)
    _name_top_k(config)
    new_layers = {k: getattr(config, k) for k in old_layers}
    for name, value in vars(config).items():
        if isinstance(value, (list, tuple)) and value and not name.startswith("_"):
            for key, n in old_layers.items():
                if len(value) == n and new_layers[key] < n:
                    setattr(config, name, type(value)(_cut_layers(list(value), new_layers[key])))
                    break
            else:  # a cycle of layer kinds shorter than the model, longer than the tiny one: cover its kinds
                n = min(new_layers.values(), default=0)
                if "type" in name and n and n < len(value) < min(old_layers.values()):
                    setattr(config, name, type(value)(_cut_layers(list(value), n)))
    if not old_layers:  # no layer count: the per-layer list of kinds is the count (cut to one layer of each kind)
        for name, value in vars(config).items():
            if "type" in name and isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
                n = max(layers, len(set(value)))
                if len(value) > n:
                    setattr(config, name, type(value)(_cut_layers(list(value), n)))
    _every_period_in_reach(config, attrs, min(new_layers.values(), default=0))
    _shared_layers_in_reach(config, attrs, old_layers, new_layers)
    _parts_of_width(config, attrs)
    if overrides is not None:  # after the layer count and kinds are final: the setter checks the layer indices
        config.per_layer_config = _shrink_overrides(config, attrs, overrides, hidden)
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
    if opened:
        vars(config).pop("allow_global_per_layer_attribute_access", None)
    return config


# widths of a vision/audio sub-model's output that feed the language model: set to the text width (the bare
# config classes' defaults do not always agree; published checkpoints do). ``hidden_size`` is such an output
# width only in a sub-config whose own width is ``embed_dim``.
_TO_TEXT = ("out_hidden_size", "text_hidden_size")


def _subconfigs(config) -> list:
    return [v for v in vars(config).values() if hasattr(v, "to_dict") and hasattr(v, "model_type")]


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def rederive(config, before):
    """Build ``config``'s class again from the settings the shrink changed, so settings a config derives from
    others (a head width from hidden / heads, an SSM head width, a cross-attention width from the encoder's, layer
    lists from a count) are derived from the tiny values instead of keeping the large defaults.

    Sub-configs are rebuilt first. Settings that are not constructor fields are carried over when the rebuild does
    not set them; where the class refuses the rebuilt settings, the shrunk config is kept as it is."""
    cls = type(config)
    names = _fields(cls)
    if not names:
        return config
    try:  # a sub-config's parent may set settings its class would not: those are passed as they are
        fresh = cls()
    except Exception:  # noqa: BLE001
        return config
    _allow_global(fresh, True)
    kwargs: dict[str, Any] = {}
    for name in names:
        if not hasattr(config, name):
            continue
        value, old = getattr(config, name), getattr(before, name, None)
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):
            kwargs[name] = rederive(value, old) if old is not None else value
        elif not _equal(value, old) or not _equal(old, getattr(fresh, name, None)):
            kwargs[name] = value
    overrides = _overrides(config)
    if overrides is not None:  # the shrunk per-layer overrides, not the ones the class derives from its defaults
        kwargs["per_layer_config"] = overrides
    try:
        new = cls(**kwargs)
    except Exception:  # noqa: BLE001 -- a class that validates its settings its own way: keep the shrunk one
        return config
    _allow_global(new, True)
    for name, value in vars(config).items():
        if name not in names and not hasattr(new, name):
            setattr(new, name, value)
    return new


def _equal(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 -- e.g. tensors: treat as changed
        return False


def _same_place(config, shrunk, old_sub):
    """The sub-config of the rebuilt ``config`` that sits where ``old_sub`` sits in the shrunk one."""
    for name, value in vars(shrunk).items():
        if value is old_sub:
            return getattr(config, name)
    return old_sub


_WIDTH_KEYS = ("hidden_size", "hidden_dim", "d_model", "embed_dim")


def _width(c) -> int | None:
    return next((getattr(c, k) for k in _WIDTH_KEYS if isinstance(getattr(c, k, None), int)), None)


def _tree(config, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """``(path, config)`` for a config and every sub-config below it, outermost first."""
    out = [(path, config)]
    for name, value in vars(config).items():
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):
            out += _tree(value, (*path, name))
    return out


def _at(config, path: tuple[str, ...]):
    for name in path:
        config = getattr(config, name, None)
    return config


def _width_links(config) -> list[tuple[tuple[str, ...], str, tuple[str, ...]]]:
    """Settings of one (sub-)config that name another's width (``hidden_size_global``, ``cross_attention_hidden_size``
    ...): a ``*hidden_size*`` setting other than the config's own width, equal in the defaults to the width of
    exactly one other config nearby. Nearby is the config's parent and the parent's sub-configs (for the outermost
    config, its sub-configs); where none of them has that width, the next level up. As ``(path of the config,
    setting, path of the other config)``."""
    tree = _tree(config)
    links = []
    for path, c in tree:
        own = next((k for k in _WIDTH_KEYS if isinstance(getattr(c, k, None), int)), None)
        for k, v in vars(c).items():
            if k == own or "hidden_size" not in k or isinstance(v, bool) or not isinstance(v, int):
                continue
            parent = path[:-1] if path else ()
            while True:
                scope = [(p, o) for p, o in tree if o is not c and (p == parent or p[:-1] == parent)]
                others = [p for p, o in scope if _width(o) == v]
                if others or not parent:
                    break
                parent = parent[:-1]
            if len(others) == 1:
                links.append((path, k, others[0]))
    return links


def _link_encoder_widths(config, text) -> None:
    """A projector sub-config's ``encoder_hidden_size`` (the width of the features it attends to) is the width of
    the one modality encoder beside it (bare configs of composite models do not always agree; checkpoints do)."""
    subs = _subconfigs(config)
    for c in subs:
        if c is text or not isinstance(getattr(c, "encoder_hidden_size", None), int):
            continue
        encoders = [o for o in subs if o is not c and o is not text and _width(o)
                    and not isinstance(getattr(o, "encoder_hidden_size", None), int)]
        if len(encoders) == 1:
            c.encoder_hidden_size = _width(encoders[0])


def _patches(vision) -> int | None:
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    if isinstance(patch, (list, tuple)):
        patch = patch[0]
    return (size // patch) ** 2 if isinstance(size, int) and isinstance(patch, int) and patch > 0 else None


def _tokens_per_image(config, before) -> None:
    """The number of tokens an image becomes (pooled from its patches) keeps its ratio to the patches per image."""
    vision, old_vision = getattr(config, "vision_config", None), getattr(before, "vision_config", None)
    new_p, old_p = _patches(vision), _patches(old_vision)
    if not new_p or not old_p or new_p >= old_p:
        return
    for key in ("mm_tokens_per_image",):
        old = getattr(before, key, None)
        if isinstance(old, int) and not isinstance(old, bool) and old > new_p:
            setattr(config, key, max(1, old * new_p // old_p))


def _name_modality_tokens(config) -> None:
    """A composite config with an audio/vision sub-config but no placeholder token id for it (published checkpoints
    name one) gets a spare id at the top of the language model's vocabulary."""
    text = getattr(config, "text_config", None)
    vocab = getattr(text, "vocab_size", None) if text is not None else getattr(config, "vocab_size", None)
    if not isinstance(vocab, int) or vocab <= 0:
        return
    used = {v for c in [config, *_subconfigs(config)] for k, v in vars(c).items()
            if _TOKEN_ID.match(k) and isinstance(v, int) and not isinstance(v, bool)}
    for modality in ("audio", "image", "video"):
        sub = getattr(config, f"{modality}_config", None) or (
            getattr(config, "vision_config", None) if modality == "image" else None)
        if sub is None:
            continue
        for key in (f"{modality}_token_id", f"{modality}_token_index"):
            if key in vars(config) and getattr(config, key) is None:
                spare = max(i for i in range(vocab) if i not in used)
                setattr(config, key, spare)
                used.add(spare)


def _projects_out(sub) -> bool:
    """Whether a modality sub-config's ``output_dim`` is the width it hands to the language model: no narrower
    than the sub-config's own width (a projection out of the encoder; bare defaults may name another checkpoint's
    text width), unlike a small output such as a CTC head's vocabulary."""
    out, own = getattr(sub, "output_dim", None), _width(sub)
    return isinstance(out, int) and not isinstance(out, bool) and isinstance(own, int) and out >= own


def _vocab_derived(config, before) -> None:
    """Sizes derived from the vocabulary (a ``*vocab*`` setting no shrink rule names, within a factor 2 of the
    vocabulary in the defaults: an unpadded vocabulary, a per-layer embedding table over the vocabulary, the first
    id of a modality's tokens after the text vocabulary) follow the tiny vocabulary: the config's own, else the
    language model's. They keep their offset from it when that is at most half the tiny vocabulary, else their ratio
    to it (rounded down)."""
    text, old_text = getattr(config, "text_config", None) or config, getattr(before, "text_config", None) or before
    for path, c in _tree(config):
        old_c = _at(before, path)
        if old_c is None:
            continue
        refs = [(getattr(old_c, "vocab_size", None), getattr(c, "vocab_size", None)),
                (getattr(old_text, "vocab_size", None), getattr(text, "vocab_size", None))]
        refs = [(a, b) for a, b in refs if _count(a) and _count(b) and 0 < b < a]
        for k, v in vars(old_c).items():
            if "vocab" not in k or not _count(v) or any(p.match(k) for p, _ in _COMPILED) or getattr(c, k, None) != v:
                continue
            for old_v, new_v in refs:
                if old_v / 2 <= v <= 2 * old_v:
                    offset = v - old_v
                    setattr(c, k, new_v + offset if abs(offset) <= new_v // 2 else max(1, v * new_v // old_v))
                    break


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def tiny_config(model_type: str, layers: int = LAYERS):
    """The config class of ``model_type`` (a key of transformers' ``CONFIG_MAPPING``) with shrunk defaults and
    ``layers`` layers per stack (more layers: each kind of layer twice, where two of a kind are needed to build)."""
    import transformers as tf

    config = tf.AutoConfig.for_model(model_type)
    _allow_global(config, True)  # heterogeneous configs: the global settings are shrunk, then the per-layer ones
    text = getattr(config, "text_config", None) or config
    old_text = getattr(text, "hidden_size", None)
    linked = [(c, k) for c in _subconfigs(config) if c is not text and isinstance(old_text, int)
              for k in _TO_TEXT + (("hidden_size",) if isinstance(getattr(c, "embed_dim", None), int) else ())
              if isinstance(getattr(c, k, None), int)]
    linked += [(c, k) for c in _subconfigs(config) if c is not text and isinstance(old_text, int)
               for k in ("projection_dim", "output_dim", "text_embed_dim") if getattr(c, k, None) == old_text]
    linked += [(c, "output_dim") for c in _subconfigs(config) if c is not text and isinstance(old_text, int)
               and _projects_out(c) and not any(o is c and k == "output_dim" for o, k in linked)]
    widths = _width_links(config)
    before = copy.deepcopy(config)
    shrunk = shrink(config, layers)
    config = rederive(shrunk, before)
    text = getattr(config, "text_config", None) or config
    linked = [(_same_place(config, shrunk, c), k) for c, k in linked]
    for c, k in linked:  # e.g. a vision merger's output width = the language model's width
        setattr(c, k, text.hidden_size)
    for path, k, other in widths:  # e.g. a local encoder's `hidden_size_global` = the global transformer's width
        c, other = _at(config, path), _at(config, other)
        if c is not None and other is not None and _width(other):
            setattr(c, k, _width(other))
    _link_encoder_widths(config, text)
    _vocab_derived(config, before)
    _inner_heads_follow_the_width(config, before)
    _tokens_per_image(config, before)
    _name_modality_tokens(config)
    if getattr(config, "is_encoder_decoder", False) and getattr(config, "decoder_start_token_id", None) is None:
        # saved checkpoints name the decoder's first token; a bare config may not
        pad = getattr(config, "pad_token_id", None)
        config.decoder_start_token_id = pad if isinstance(pad, int) else 0
    _allow_global(config, False)
    return config
