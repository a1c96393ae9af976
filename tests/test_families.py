"""Families of every kind through discovery and patching (a table-driven subset of bench/coverage.py).

Each row is a transformers model type built from its tiny config (``vlpet_fx.zoo.tiny``) and what the row
spans: gated or plain MLP, fused or separate q/k/v, Conv1D, SDPA or eager attention, pre- or post-LN,
relative or rotary positions, MoE. Expectations come from the config (layer counts) and from the model's
own module classes (norm layers), never from running discovery. Rows that need a pattern the registry does not
have yet are marked ``xfail(strict=True)`` on the tests they fail, so they flip (and fail) when it lands.
"""

from __future__ import annotations

import copy

import pytest
import torch

import vlpet_fx
from patched_checks import assert_trains_and_generates
from vlpet_fx.capture.inputs import build_example_inputs
from vlpet_fx.zoo.tiny import tiny_config

transformers = pytest.importorskip("transformers")

# Pegasus-X's attention module runs a local attention on the token stream and a global one on the global tokens
# and returns both; only the global core is found (the local scores are two products concatenated before the
# softmax), so the encoder's self-attention sites are the global stream's (the eager back end reaches them by the
# output projection's first call, tests/test_anchor_copies.py; the FFN on both streams is tied,
# tests/test_stream_inputs.py). The encoder drops the global stream after its last layer, so that layer's global
# query, output projection and output reach no output of the model and are no sites (tests/test_dead_sites.py).
# name -> {(stack, layer, block): roles that are no sites}; layer -1 is the stack's last
DEAD_ROLES = {"pegasus_x": {("encoder", -1, "self_attn"): {"q", "o", "output"}}}

# name -> (auto class, model type, config overrides, traits, {test name: xfail reason})
AUTO = {"causal": "AutoModelForCausalLM", "seq2seq": "AutoModelForSeq2SeqLM", "vlm": "AutoModelForImageTextToText",
        "speech": "AutoModelForSpeechSeq2Seq", "audio": "AutoModelForSeq2SeqLM"}
CASES = {
    # causal LMs: rotary + gated MLP (SDPA and eager), GQA, biases on q/k/v, (1 + w) RMSNorm
    "llama": ("causal", "llama", {}, {"gated"}, {}),
    "llama-eager": ("causal", "llama", {"attn_implementation": "eager"}, {"gated"}, {}),
    "mistral": ("causal", "mistral", {}, {"gated"}, {}),
    "qwen2": ("causal", "qwen2", {}, {"gated"}, {}),
    "gemma": ("causal", "gemma", {}, {"gated"}, {}),
    "olmo": ("causal", "olmo", {}, {"gated"}, {}),
    "granite": ("causal", "granite", {}, {"gated"}, {}),
    # partial rotary: q and k reach the core through the concatenation of a rotated and a passed-through part
    "stablelm": ("causal", "stablelm", {"num_key_value_heads": 2}, {"gated"}, {}),  # GQA
    # a norm on each sub-layer's output before the residual add: sandwich (x + norm(f(norm(x))), Gemma-2) and
    # post-norm only (x + norm(f(x)), OLMo-2); VL-PET's gate reads the stream value before the add
    "gemma2": ("causal", "gemma2", {}, {"gated", "post-norm"}, {}),
    "olmo2": ("causal", "olmo2", {}, {"gated", "post-norm"}, {}),
    # parallel attention and FFN on one norm (x + attn(norm(x)) + ffn(norm(x))): both read the same X
    "cohere": ("causal", "cohere", {}, {"gated", "parallel"}, {}),
    # causal LMs: plain MLPs, learned / sinusoidal positions, post- and pre-LN
    "opt": ("causal", "opt", {}, set(), {}),
    "opt-eager": ("causal", "opt", {"attn_implementation": "eager"}, set(), {}),
    "xglm": ("causal", "xglm", {}, set(), {}),
    "biogpt": ("causal", "biogpt", {}, set(), {}),
    "gpt_neo": ("causal", "gpt_neo", {}, set(), {}),
    "starcoder2": ("causal", "starcoder2", {}, set(), {}),
    # fused q/k/v: HF Conv1D (GPT-2), query_key_value (GPT-NeoX, parallel attention + FFN)
    "gpt2": ("causal", "gpt2", {}, {"fused"}, {}),
    "gpt_neox": ("causal", "gpt_neox", {}, {"fused"}, {}),
    # MoE: experts held as one batched 3-D parameter (found as a residual branch: only the block's output is a
    # site), and routed + shared experts (the shared expert's projections keep their roles; the FFN's output is
    # the whole mixture)
    "mixtral": ("causal", "mixtral", {}, {"moe", "batched"}, {}),
    "qwen2_moe": ("causal", "qwen2_moe", {}, {"moe", "gated", "shared-expert"}, {}),
    # multi-head latent attention (q/kv through low-rank latents, decoupled rotary part) with routed + shared experts;
    # the key is an empty tensor whose two halves are filled in place (the non-rotary slice of the latent
    # up-projection and the shared rotary part)
    "deepseek_v3": ("causal", "deepseek_v3", {}, {"gated", "moe", "latent"}, {}),
    # a hybrid: recurrent (linear-time) mixers and softmax attention; the tiny config keeps one layer of each kind
    "recurrent_gemma": ("causal", "recurrent_gemma", {}, {"gated", "hybrid"}, {}),
    # encoder-decoders: relative positions + RMS norm (T5), gated (mT5, UMT5), post-LN (BART), pre-LN (mBART)
    "t5": ("seq2seq", "t5", {}, set(), {}),
    "mt5": ("seq2seq", "mt5", {}, {"gated"}, {}),
    "umt5": ("seq2seq", "umt5", {}, {"gated"}, {}),
    "bart": ("seq2seq", "bart", {}, set(), {}),
    "mbart": ("seq2seq", "mbart", {}, set(), {}),
    "pegasus": ("seq2seq", "pegasus", {}, set(), {}),
    "marian": ("seq2seq", "marian", {}, set(), {}),
    "m2m_100": ("seq2seq", "m2m_100", {}, set(), {}),
    # sites and calls: einsum with "..." and keys/values joined from neighbouring blocks (LongT5's local
    # attention); two softmaxes sharing q/k/v and one output projection after their concatenation (DiffLlama);
    # one FFN called on two token streams per layer: one site, applied at both calls (Pegasus-X)
    "longt5": ("seq2seq", "longt5", {}, set(), {}),
    "diffllama": ("causal", "diffllama", {}, {"gated"}, {}),
    "pegasus_x": ("seq2seq", "pegasus_x", {}, set(), {}),  # see DEAD_ROLES
    # sandwich norms with one dropout module called after every sub-layer (its output is no one block's output:
    # the post-norm's is); a fused gate/up read as two halves of a (tokens, 2, d) view (a channel axis, not a loop
    # over positions); routed experts with a short convolution on the FFN's output (output processing, no mixer)
    "t5gemma": ("seq2seq", "t5gemma", {}, {"gated", "post-norm"}, {}),
    "moshi": ("causal", "moshi", {}, {"gated", "fused"}, {}),
    "inkling_text": ("causal", "inkling_text", {}, {"gated", "moe"}, {}),
    # VLMs (vision tower -> projector -> causal LM) and speech; Gemma 3 casts the image features with
    # type_as(vision output), a dtype operand that must not join its text stream to the vision tower's (the
    # tower's pooling head, which Gemma 3 does not use, is left out here: tests/test_streams_kinds.py covers it)
    "gemma3": ("vlm", "gemma3", {"vision_config.vision_use_head": False}, {"gated", "post-norm"}, {}),
    "llava": ("vlm", "llava", {}, {"gated"}, {}),
    "paligemma": ("vlm", "paligemma", {}, {"gated"}, {}),
    "whisper": ("speech", "whisper", {}, set(), {}),
    # an audio LLM: audio encoder -> projector -> causal LM, inputs with one audio token per audio embedding
    "voxtral": ("audio", "voxtral", {}, {"gated"}, {}),
    # one whose audio embeddings are merged groups of frames, counted by its get_audio_features
    "moss_transcribe_diarize": ("audio", "moss_transcribe_diarize", {}, {"gated"}, {}),
}
RULES = {"causal": "vlpet_causal_lm", "vlm": "vlpet_causal_lm", "seq2seq": "vlpet_large", "speech": "vlpet_large",
         "audio": "vlpet_causal_lm"}
LAYER_KEYS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "decoder_layers", "depth")
ENC_KEYS = ("encoder_layers", "num_layers", "num_hidden_layers")
DEC_KEYS = ("decoder_layers", "num_decoder_layers", "num_layers", "num_hidden_layers")


def _count(cfg, keys) -> int:
    for k in keys:
        v = getattr(cfg, k, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    raise KeyError(keys)


def expected_layers(kind: str, cfg) -> dict[str, int]:
    """Layer counts per stack from the config alone."""
    if kind == "causal":
        return {"decoder": _count(cfg, LAYER_KEYS)}
    if kind == "vlm":
        return {"visual": _count(cfg.vision_config, LAYER_KEYS), "decoder": _count(cfg.text_config, LAYER_KEYS)}
    if kind == "audio":  # the audio encoder is an encoder stack, the language model a decoder (no cross-attention)
        return {"encoder": _count(cfg.audio_config, ENC_KEYS), "decoder": _count(cfg.text_config, LAYER_KEYS)}
    if hasattr(cfg, "encoder") and hasattr(cfg, "decoder"):  # one sub-config per stack (T5Gemma)
        return {"encoder": _count(cfg.encoder, ENC_KEYS), "decoder": _count(cfg.decoder, DEC_KEYS)}
    return {"encoder": _count(cfg, ENC_KEYS), "decoder": _count(cfg, DEC_KEYS)}


RECURRENT = ("linear", "recurrent", "mamba", "conv")


def expected_blocks(kind: str, stack: str, cfg=None, layer: int = 0) -> set[str]:
    if stack == "decoder" and kind in ("seq2seq", "speech"):
        return {"self_attn", "cross_attn", "ffn"}
    kinds = getattr(getattr(cfg, "text_config", None) or cfg, "layer_types", None) if cfg is not None else None
    if kinds and any(w in str(kinds[layer % len(kinds)]) for w in RECURRENT):
        return {"mixer", "ffn"}  # a hybrid's recurrent layer: token mixing without softmax attention (a `mixer`)
    return {"self_attn", "ffn"}


def _marks(name: str, test: str):
    reason = CASES[name][4].get(test)
    return [pytest.mark.xfail(strict=True, reason=reason)] if reason else []


def cases_for(test: str):
    return [pytest.param(n, marks=_marks(n, test), id=n) for n in CASES]


_BUILT: dict[str, tuple] = {}


def built(name: str):
    """(kind, model, table) per family, built once for the whole module."""
    if name not in _BUILT:
        kind, model_type, overrides, _traits, _ = CASES[name]
        cfg = tiny_config(model_type)
        for k, v in overrides.items():
            *subs, leaf = k.split(".")
            target = cfg
            for sub in subs:  # "vision_config.x": a field of a sub-config
                target = getattr(target, sub)
            setattr(target, leaf if leaf != "attn_implementation" else "_attn_implementation", v)
        torch.manual_seed(0)
        model = getattr(transformers, AUTO[kind]).from_config(cfg).eval()
        _BUILT[name] = (kind, model, vlpet_fx.discover(model, name=name))
    return _BUILT[name]


@pytest.fixture(scope="module", autouse=True)
def _forget_models():
    yield
    _BUILT.clear()


@pytest.mark.parametrize("name", cases_for("stacks"))
def test_stacks_and_layers_from_the_dataflow(name):
    kind, model, table = built(name)
    assert table.num_layers() == expected_layers(kind, model.config), name
    for stack in table.stacks():
        for layer in range(table.num_layers()[stack]):
            got = {s.block for s in table.where(stack=stack, layer=layer)}
            assert got == expected_blocks(kind, stack, model.config, layer), (name, stack, layer, got)


@pytest.mark.parametrize("name", cases_for("roles"))
def test_roles_of_every_block(name):
    kind, model, table = built(name)
    gated = "gated" in CASES[name][3]
    layers = table.num_layers()
    dead = {(st, lay % layers[st], bl): roles for (st, lay, bl), roles in DEAD_ROLES.get(name, {}).items()}
    for stack, layer, block in table.blocks():
        roles = {s.role for s in table.where(stack=stack, layer=layer, block=block)}
        if (stack, layer, block) in dead:  # roles whose values reach no output: exactly those are missing
            missing = dead.pop((stack, layer, block))
            assert not roles & missing and roles | missing == {"q", "k", "v", "o", "output"}, (name, layer, roles)
            roles |= missing
        if block == "ffn":
            if "batched" in CASES[name][3]:  # one 3-D weight per matrix for all experts: no projection site
                assert roles == {"output"}, (name, stack, layer, roles)
            elif stack == "visual" or (kind == "audio" and stack == "encoder") or not gated:  # plain towers
                assert {"in", "out", "output"} <= roles, (name, stack, layer, roles)
            else:  # the projection whose output passes the activation before the product is the gate
                assert {"gate", "up", "out", "output"} <= roles, (name, stack, layer, roles)
        elif block == "mixer":  # projections into the mixer and the one its value comes from
            assert {"in", "out", "output"} <= roles, (name, stack, layer, block, roles)
        else:
            assert {"q", "k", "v", "o", "output"} <= roles, (name, stack, layer, block, roles)
    assert not dead, (name, dead)  # every block named in DEAD_ROLES was seen


@pytest.mark.parametrize("name", cases_for("norms"))
def test_norms_found_by_computation(name):
    """Every normalisation module of the layers (by its class: the independent reference) is found."""
    kind, model, table = built(name)
    found = set(table.meta["norms"])
    layer_paths = {s.layer_path for s in table if s.layer_path}
    named = {p for p, m in model.named_modules() if type(m).__name__.endswith("Norm")
             and any(p.startswith(lp + ".") for lp in layer_paths)}
    assert named, name
    assert named <= found, (name, sorted(named - found)[:3])
    modules = dict(model.named_modules())
    assert all(p in modules for p in found), name


def _first_float(out):
    return out.logits if hasattr(out, "logits") and out.logits is not None else out[0]


@pytest.mark.parametrize("name", cases_for("patch"))
def test_patch_forward_backward_lora_identity_and_generate(name):
    kind, model, table = built(name)
    _, args, kwargs = build_example_inputs(model)
    with torch.no_grad():
        reference = _first_float(model(*args, **kwargs))
    lora = copy.deepcopy(model)
    vlpet_fx.patch(lora, "lora", table=table)
    with torch.no_grad():
        torch.testing.assert_close(_first_float(lora(*args, **kwargs)), reference, rtol=1e-5, atol=1e-5)
    patched = copy.deepcopy(model)
    plan = vlpet_fx.plan(patched, RULES[kind], table=table)
    assert plan.placements, name
    vlpet_fx.patch(patched, plan)
    out = _first_float(patched(*args, **kwargs))
    assert not torch.allclose(out, reference), name  # VL-PET modules (non-zero init) change the output
    assert_trains_and_generates(patched, out, kwargs, name, generate=kind in ("causal", "vlm", "audio"))


def test_the_table_spans_the_patterns():
    traits = set().union(*(c[3] for c in CASES.values()))
    assert {"gated", "fused", "moe", "latent", "hybrid"} <= traits
    assert len(CASES) >= 25
    assert {c[0] for c in CASES.values()} == set(AUTO)


# The block input X each VL-PET gate must read, computed independently from the model's own modules: the
# self-attention reads the layer's input; the FFN reads the layer's input plus what the attention sub-layer
# adds to it (the output of the module named here, relative to the layer), or the layer's input too in a
# parallel block (None). And the module whose output is the FFN sub-layer's: the value added back to the stream
# (the whole residual branch; behind a norm on the sub-layer's output, that norm: a gate placed before it would be
# normalised away, e.g. the small gate's one scalar by an RMS norm).
X_ROWS = {
    "gemma2": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "olmo2": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "cohere": (None, "mlp"),
    "qwen2_moe": ("self_attn", "mlp"),
}


def _hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


@pytest.mark.parametrize("name", list(X_ROWS))
def test_gates_read_the_stream_value_and_back_ends_agree(name):
    """Post-norm, parallel and shared-expert blocks: every VL-PET gate reads the residual-stream value that
    enters its sub-layer (checked against the layers' own inputs), the FFN output site is the whole residual
    branch, and the graph back end computes what the eager one does for the same plan."""
    kind, model, table = built(name)
    added, ffn_module = X_ROWS[name]
    _, args, kwargs = build_example_inputs(model)
    layers = model.model.layers
    for i in range(len(layers)):
        (site,) = table.where(stack="decoder", layer=i, block="ffn", role="output")
        assert site.path == f"model.layers.{i}.{ffn_module}", (name, site)
    plan = vlpet_fx.plan(model, RULES[kind], table=table)
    eager = vlpet_fx.patch(copy.deepcopy(model), plan)
    seen: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(eager.model.layers):
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, kw, i=i: seen.__setitem__((i, "in"), _hidden(a, kw)), with_kwargs=True))
        if added is not None:
            handles.append(layer.get_submodule(added).register_forward_hook(
                lambda m, a, out, i=i: seen.__setitem__((i, "added"), _first_float(out) if isinstance(out, tuple)
                                                        else out)))
    read = {}  # the X each gate really reads: its first input
    for path in eager.vlpet_patch.attached:
        pet = eager.get_submodule(path)
        if getattr(pet, "needs_block_input", False):
            handles.append(pet.gate.register_forward_pre_hook(lambda m, a, path=path: read.__setitem__(path, a[0])))
    with torch.no_grad():
        out_e = _first_float(eager(*args, **kwargs))
    for h in handles:
        h.remove()
    gates = 0
    for path, p in eager.vlpet_patch.attached.items():
        pet = eager.get_submodule(path)
        if not getattr(pet, "needs_block_input", False):
            continue
        want = seen[(p.site.layer, "in")]
        if p.site.block == "ffn" and added is not None:
            want = want + seen[(p.site.layer, "added")]
        torch.testing.assert_close(read[path], want, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name} {p.site}: {m}")
        gates += 1
    assert gates == 2 * len(layers), name
    graph = vlpet_fx.patch(copy.deepcopy(model), plan, backend="graph", example_inputs=(args, kwargs))
    with torch.no_grad():
        out_g = _first_float(graph(*args, **kwargs))
        reference = _first_float(model(*args, **kwargs))
    assert not torch.allclose(out_e, reference), name
    torch.testing.assert_close(out_g, out_e, rtol=1e-5, atol=1e-5)


def test_latent_attention_key_and_value_are_slices_of_the_up_projection():
    """Multi-head latent attention: per head, the latent up-projection's output is [k without rotary | v]; k's
    site is the first part of every head's channels, v's the second (widths from the config)."""
    _, model, table = built("deepseek_v3")
    cfg = model.config
    nope, v, heads = cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.num_attention_heads
    for layer in range(cfg.num_hidden_layers):
        k_site = table.get("decoder", layer, "self_attn", "k")
        v_site = table.get("decoder", layer, "self_attn", "v")
        assert k_site.path == v_site.path == f"model.layers.{layer}.self_attn.kv_b_proj"
        assert k_site.out_slice == (0, nope, nope + v, heads)
        assert v_site.out_slice == (nope, nope + v, nope + v, heads)
        assert (k_site.out_features, v_site.out_features) == (nope * heads, v * heads)
