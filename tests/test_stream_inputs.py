"""The block input X of VL-PET's gates where the module that receives it is not plain to see (issue 12, seq2seq
side): a layer that also takes a padding mask (LED's Longformer encoder), a module called on two streams of other
lengths (Pegasus-X's FFN norm on the token and the global stream), one key projection call for the main and the
n-gram streams (ProphetNet), a residual branch between two layers outside any repeated layer (Granite Speech's
intermediate CTC head), and a feed-forward map on a time embedding that only scales the stream (Voxtral
Realtime's AdaRMSNorm), which is no block; a layer whose X leaves a norm inside the module that also holds the
sub-layer (X-MOD's language adapters) and a module that takes X beside a stack of earlier values of its width
(Inkling2's attention over the outputs of earlier blocks).

Every gate's X is checked, at every call of its site, against the value the model's own modules hand over there
(hooks on the model's layers, independent of discovery)."""

from __future__ import annotations

import copy

import pytest
import torch

import vlpet_fx
from vlpet_fx.capture.inputs import build_example_inputs
from vlpet_fx.rules import parse_rules
from vlpet_fx.zoo.tiny import tiny_config

from patched_checks import perturb, same_pets_as

transformers = pytest.importorskip("transformers")


def _build(auto: str, model_type: str):
    cfg = tiny_config(model_type)
    if auto == "AutoModelForCausalLM" and getattr(cfg, "is_decoder", None) is False:
        cfg.is_decoder = True  # the causal-LM head of an encoder-decoder family needs it (as in bench/coverage)
    torch.manual_seed(0)
    return getattr(transformers, auto).from_config(cfg).eval()


def _gates(select: dict) -> object:
    import json

    return parse_rules(
        "name: gates\nmethods: {g: {type: vlpet, dim: 8, heads: 1, gate: large, gate_dim: 8}}\n"
        "rules: [{name: g, select: %s, insert: g, placement: after}]\n" % json.dumps(select), source="test")


def _first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


def _hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _record(module, where, store: list):
    """A hook on ``module`` that appends its first input (``where="in"``), its positional input ``where`` (an
    int) or its first output (``"out"``)."""
    if where == "in":
        return module.register_forward_pre_hook(lambda m, a, kw: store.append(_hidden(a, kw).clone()), with_kwargs=True)
    if isinstance(where, int):
        return module.register_forward_pre_hook(lambda m, a: store.append(a[where].clone()))
    return module.register_forward_hook(lambda m, a, out: store.append(_first(out).clone()))  # before any in-place op


def _seen_x(model, select: dict, watched, where="in"):
    """Patch VL-PET gates on the selected sites and run once. Returns the plan, the patched model, per placement
    the X each call of its site used, and per module of ``watched(patched)`` (a list) what each of its calls
    received (``where="in"``) or returned (``"out"``): the reference, from the model's own modules."""
    inputs = build_example_inputs(model)  # before any hook: building them may run the model
    plan = vlpet_fx.plan(model, _gates(select), table=vlpet_fx.discover(model))
    assert plan.placements
    patched = vlpet_fx.patch(copy.deepcopy(model), plan)
    used: dict[str, list[torch.Tensor]] = {}
    handles = []
    for path, p in patched.vlpet_patch.attached.items():
        pet = patched.get_submodule(path)
        assert pet.needs_block_input
        # the X the gate really reads: its first input (the site may be a value no module returns)
        handles.append(pet.gate.register_forward_pre_hook(
            lambda m, a, path=path: used.setdefault(path, []).append(a[0].clone())))
    seen: list[list[torch.Tensor]] = []
    for module in watched(patched):
        seen.append([])
        handles.append(_record(module, where, seen[-1]))
    _, args, kwargs = inputs
    try:
        with torch.no_grad():
            patched(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return plan, patched, used, seen


def _check(used: dict, patched, want_of, name: str) -> int:
    n = 0
    assert set(used) == set(patched.vlpet_patch.attached), name  # every gate ran
    for path, xs in used.items():
        p = patched.vlpet_patch.attached[path]
        want = want_of(p.site)
        assert len(xs) == len(want), (name, p.site.key, len(xs), len(want))
        for got, exp in zip(xs, want):
            torch.testing.assert_close(got, exp, rtol=0, atol=0, msg=lambda m: f"{name} {p.site.key}: {m}")
            n += 1
    return n


@pytest.mark.slow
def test_led_encoder_attention_reads_the_layer_input_beside_its_padding_mask():
    """LED's encoder layer takes X with a per-token padding mask (B, S) beside it: the layer is X's module."""
    model = _build("AutoModelForSeq2SeqLM", "led")
    plan, patched, used, seen = _seen_x(model, {"stack": "encoder", "block": "self_attn", "role": "output"},
                                        lambda m: list(m.led.encoder.layers))
    assert len(plan.placements) == len(seen) == len(model.led.encoder.layers)
    assert _check(used, patched, lambda s: seen[s.layer], "led") == len(seen)


def test_prophetnet_main_and_ngram_streams_read_one_x():
    """ProphetNet's decoder attends its main and n-gram streams with one call of each projection: the two
    attention calls' output site reads the layer input, taken from that one call."""
    model = _build("AutoModelForCausalLM", "prophetnet")
    plan, patched, used, seen = _seen_x(model, {"stack": "decoder", "block": "self_attn", "role": "output"},
                                        lambda m: list(m.prophetnet.decoder.layers))
    assert len(plan.placements) == len(seen) == len(model.prophetnet.decoder.layers)
    assert _check(used, patched, lambda s: seen[s.layer], "prophetnet") == len(seen)


@pytest.mark.slow
def test_granite_speech_intermediate_head_reads_the_middle_layer_output():
    """``h += out_mid(softmax(out(h)))`` after the middle encoder layer is a residual branch outside any repeated
    layer: its X is that layer's output (the head reads a copy of it)."""
    model = _build("AutoModelForSeq2SeqLM", "granite_speech")
    enc = model.model.encoder
    select = {"stack": "encoder", "block": "ffn", "role": "output", "path_regex": r"^model\.encoder\.out_mid$"}
    plan, patched, used, (outs,) = _seen_x(model, select, lambda m: [m.model.encoder.layers[enc.num_layers // 2 - 1]],
                                           where="out")
    (site,) = [p.site for p in plan.placements]
    assert site.path == "model.encoder.out_mid" and site.layer_path is None
    assert _check(used, patched, lambda s: outs, "granite_speech") == 1


@pytest.mark.slow
def test_voxtral_realtime_time_conditioning_is_no_block_and_ffn_gates_read_the_stream():
    """The AdaRMSNorm's linear -> GELU -> linear on the time embedding scales the stream and is never added back:
    no site; each language-model FFN's X is the stream after the attention (what its norm receives)."""
    model = _build("AutoModelForSeq2SeqLM", "voxtral_realtime")
    cond = {p for p, m in model.named_modules() if type(m).__name__.endswith("AdaRmsNorm")}
    assert cond
    table = vlpet_fx.discover(model)
    assert not [s for s in table if any(s.path and (s.path == c or s.path.startswith(c + ".")) for c in cond)]
    lm = "model.language_model.layers."
    plan, patched, used, seen = _seen_x(
        model, {"stack": "decoder", "block": "ffn", "role": "output", "path_regex": "^" + lm.replace(".", r"\.")},
        lambda m: [layer.post_attention_layernorm for layer in m.model.language_model.layers])
    assert len(plan.placements) == len(seen) == len(model.model.language_model.layers)
    assert _check(used, patched, lambda s: seen[int(s.path[len(lm):].split(".")[0])], "voxtral_realtime") == len(seen)


def test_pegasus_x_ffn_norm_called_on_two_streams_hands_each_call_its_x():
    """Pegasus-X runs one FFN (norm, fc1, fc2) on the token stream and on the global stream of another length:
    each call of the FFN's output site reads the X of its own stream (the residual that call's norm receives,
    in the model's own code), token stream first."""
    model = _build("AutoModelForSeq2SeqLM", "pegasus_x")
    plan, patched, used, seen = _seen_x(model, {"stack": "encoder", "block": "ffn", "role": "output"},
                                        lambda m: [layer.final_layer_norm for layer in m.model.encoder.layers])
    assert len(plan.placements) == len(seen) == len(model.model.encoder.layers)
    assert all(len(xs) == 2 and xs[0].shape[1] != xs[1].shape[1] for xs in seen)  # two lengths
    assert _check(used, patched, lambda s: seen[s.layer], "pegasus_x") == 2 * len(seen)


def test_pegasus_x_attention_output_of_two_streams_is_anchored_at_its_streams_call():
    """Pegasus-X's attention module returns the token and the global stream's outputs (one width, two lengths),
    which the layer drops out: the found (global) attention's output site keeps no module path (an eager hook on
    the attention would change the first it returns, which the graph does not name); its anchor is the output
    projection's call that makes it, the first inside the attention (the global stream's), so the eager back end
    changes exactly the value the graph back end changes."""
    from vlpet_fx.analysis.sites import Anchor

    model = _build("AutoModelForSeq2SeqLM", "pegasus_x")
    table = vlpet_fx.discover(model)
    att = table.where(stack="encoder", block="self_attn", role="output")
    # the last layer's global stream reaches no output of the model (the encoder drops it): no site there
    assert [s.layer for s in att] == list(range(len(model.model.encoder.layers) - 1))
    assert att and all(s.path is None for s in att)
    for s in att:
        attn = f"model.encoder.layers.{s.layer}.self_attn"
        assert s.anchor == Anchor(f"{attn}.out_proj", "output", attn, 0, 2)
    assert all(s.path is not None for s in table.where(stack="encoder", block="ffn", role="output"))
    rules = _gates({"stack": "encoder", "block": "self_attn", "role": "output"})
    plan = vlpet_fx.plan(model, rules, table=table)
    eager = vlpet_fx.patch(copy.deepcopy(model), plan)
    perturb(eager)
    _, args, kwargs = build_example_inputs(model)
    graph = vlpet_fx.patch(copy.deepcopy(model), plan, backend="graph", example_inputs=(args, kwargs))
    same_pets_as(graph, eager)
    with torch.no_grad():
        got = eager(*args, **kwargs).logits
        assert torch.allclose(graph(*args, **kwargs).logits, got, atol=1e-5)
        assert not torch.allclose(got, model(*args, **kwargs).logits, atol=1e-3)


def test_xmod_language_adapter_reads_the_norm_output_it_adapts():
    """X-MOD's output module normalises ``dense(h) + input`` and runs its language adapter (down, ReLU, up, a
    residual) on the result, inside the same module: no module receives that X as an input, and the norm's output
    is it. Each FFN output gate -- the layers' own FFNs and the adapters -- reads what its norm hands out."""
    model = _build("AutoModelForCausalLM", "xmod")
    layers = model.roberta.encoder.layer
    plan, patched, used, seen = _seen_x(
        model, {"stack": "decoder", "block": "ffn", "role": "output"},
        lambda m: [norm for layer in m.roberta.encoder.layer
                   for norm in (layer.attention.output.LayerNorm, layer.output.LayerNorm)], where="out")
    adapters = [p.site for p in plan.placements if p.site.path is None]
    assert len(adapters) == len(layers) and all(s.input_path is None and s.input_anchor for s in adapters)
    assert len(plan.placements) == len(seen) == 2 * len(layers)
    # the output norm runs twice per layer: for the adapter (inside the output module), then on the layer's output
    assert [len(xs) for xs in seen] == [1, 2] * len(layers)
    assert _check(used, patched, lambda s: seen[s.layer][:1], "xmod") == len(seen)


def test_inkling2_gates_read_x_beside_the_stack_of_earlier_blocks():
    """Inkling2's layers call an attention over depth as ``mlp_input(block_states, hidden_states)``: the stack of
    earlier blocks' outputs first (four axes, X's width), X second. The sub-layer after it reads X there, and the
    next layer's attention reads the layer input; both gates get exactly those values."""
    model = _build("AutoModelForCausalLM", "inkling2_text")
    layers = list(model.model.layers)
    # the mixture's router (512 -> 4 scores, which scale the experts' outputs) is no projection of the sub-layer:
    # the experts, a grouped product of a batched parameter, leave it only its output site
    table = vlpet_fx.discover(model)
    assert not [s for s in table if s.param and s.param.endswith(".mlp.gate.weight")]
    assert {s.role for s in table.where(block="mixer")} == {"output"}
    plan, patched, used, seen = _seen_x(model, {"stack": "decoder", "block": "mixer", "role": "output"},
                                        lambda m: [layer.mlp_input for layer in m.model.layers], where=1)
    assert len(plan.placements) == len(seen) == len(layers)
    assert all(xs[0].dim() == 3 for xs in seen)  # not the stack of earlier blocks (4 axes)
    assert _check(used, patched, lambda s: seen[s.layer], "inkling2 mlp") == len(seen)
    plan, patched, used, seen = _seen_x(model, {"stack": "decoder", "block": "self_attn", "role": "output"},
                                        lambda m: list(m.model.layers))
    assert len(plan.placements) == len(seen) == len(layers)
    assert _check(used, patched, lambda s: seen[s.layer], "inkling2 attention") == len(seen)
