"""Each VL-PET gate against its formula, written out here with plain torch ops (not by calling vlpet_fx's modules).

The formulas are the ones the authors' code computes (HenryHZY/VL-PET, src/my_transformers/modeling_t5.py and
modeling_bart.py; see /work/shared/VL-PET.md), on a sub-layer with input X (BART: the layer input / the FFN
input; T5: the residual stream *before* the layer norm) and output h:

    H1 = h + W_up gelu_new(Concat_i(W_down^(i) h + b_down^(i))) + b_up          (N_h heads on the down projection)
    large    G = sigmoid(W_u gelu_new(W_d X + b_d) + b_u)                      [B, N, d]
    middleX  G = sigmoid(w · (X + H1) + b)                                     [B, N, 1]
    middleY  G = 1 + g                                                         [d]
    small    G = mean over all N tokens (padding included) of sigmoid(w · [X ; H1] + b)   [B, 1, 1]
    block output = X + s · (G ⊙ H1)        (`gate_op: add`: X + s · (H1 + G))

The test patches a tiny T5 and a tiny BART, reads X, h and the block's output from the model with hooks on
modules this file names (not on what discovery found), and recomputes the output from X, h and the PET module's
weights. The decoder's cross-attention value adapter (a parallel, ungated module) is checked the same way.
"""

from __future__ import annotations

import math

import pytest
import torch
import yaml

import vlpet_fx
from vlpet_fx.rules import parse_rules, shipped_rule_names
from vlpet_fx.zoo import build_model

LAYER = 1
D = 64  # d_model of the tiny T5 and BART
R, HEADS, R_G = 16, 4, 8

# where the paper reads X, where the sub-layer's output h is produced, and where the block's result
# X + H'' can be read: (module path, "in" = the first input of the module / "out" = its output)
WHERE = {
    ("t5", "self_attn"): dict(x="encoder.block.1.layer.0", h="encoder.block.1.layer.0.SelfAttention.o",
                              out=("encoder.block.1.layer.0", "out")),
    ("t5", "ffn"): dict(x="encoder.block.1.layer.1", h="encoder.block.1.layer.1.DenseReluDense.wo",
                        out=("encoder.block.1.layer.1", "out")),
    ("bart", "self_attn"): dict(x="model.encoder.layers.1", h="model.encoder.layers.1.self_attn.out_proj",
                                out=("model.encoder.layers.1.self_attn_layer_norm", "in")),
    ("bart", "ffn"): dict(x="model.encoder.layers.1.fc1", h="model.encoder.layers.1.fc2",
                          out=("model.encoder.layers.1.final_layer_norm", "in")),
}
# the T5 runs: PyTorch's default init and a 0.3 output scale; the BART runs: N(0, 0.02) init and no scale
SETTINGS = {"t5": dict(scale=0.3, init="torch"), "bart": dict(scale=1.0, init="normal")}
GATE_SHAPES = {"large": (2, None, D), "middleX": (2, None, 1), "middleY": (D,), "small": (2, 1, 1)}


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def linear(x, w, b):
    return x @ w.t() + b


def modified(p, h, heads):
    """H1 = h + ΔH, with the N_h down-projection heads computed one by one and concatenated."""
    downs = [linear(h, w, b) for w, b in zip(p["down.weight"].chunk(heads, 0), p["down.bias"].chunk(heads, 0))]
    assert all(d.shape[-1] == p["down.weight"].shape[0] // heads for d in downs)
    return h + linear(gelu_new(torch.cat(downs, dim=-1)), p["up.weight"], p["up.bias"])


def gate_value(p, gate, x, h1):
    if gate == "large":
        return torch.sigmoid(linear(gelu_new(linear(x, p["gate.down.weight"], p["gate.down.bias"])),
                                    p["gate.up.weight"], p["gate.up.bias"]))
    if gate == "middleX":
        return torch.sigmoid(linear(x + h1, p["gate.proj.weight"], p["gate.proj.bias"]))
    if gate == "middleY":
        return 1.0 + p["gate.g"]
    if gate == "small":  # per-token scores, then the plain mean over the sequence (the authors' torch.mean(dim=1))
        scores = torch.sigmoid(linear(torch.cat([x, h1], dim=-1), p["gate.proj.weight"], p["gate.proj.bias"]))
        return scores.sum(dim=1, keepdim=True) / x.shape[1]
    raise ValueError(gate)


def expected_block_output(p, gate, op, scale, heads, x, h):
    h1 = modified(p, h, heads)
    g = gate_value(p, gate, x, h1)
    want_shape = tuple(x.shape[1] if s is None else s for s in GATE_SHAPES[gate])
    assert tuple(g.shape) == want_shape, (gate, g.shape)
    return x + scale * (g * h1 if op == "mul" else h1 + g)


def _inputs(family, pad=True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 256, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[0, -4:] = 0  # padding in the batch: the small gate's mean still runs over every token
    return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :5])


def _model(family):
    torch.manual_seed(0)
    return build_model(family, "tiny").eval()


@pytest.fixture(scope="module")
def tables():
    """Each family's site table, discovered once (patching then only plans against it)."""
    return {f: vlpet_fx.discover(_model(f)) for f in ("t5", "bart")}


def _patched(tables, family, rules):
    model = _model(family)
    vlpet_fx.patch(model, vlpet_fx.plan(model, rules, table=tables[family]))
    return model


class Taps:
    """Hooks on named modules: X (first input), h (raw output, before any PET hook) and the block result."""

    def __init__(self, model, where):
        self.seen: dict[str, torch.Tensor] = {}
        mods = dict(model.named_modules())

        def first(args, kwargs):
            return args[0] if args else kwargs["hidden_states"]

        def pre(key):
            return lambda mod, args, kwargs: self.seen.__setitem__(key, first(args, kwargs))

        def post(key):
            return lambda mod, args, out: self.seen.__setitem__(key, out[0] if isinstance(out, tuple) else out)

        self.handles = [mods[where["x"]].register_forward_pre_hook(pre("x"), with_kwargs=True),
                        mods[where["h"]].register_forward_hook(post("h"), prepend=True)]
        path, side = where["out"]
        self.handles.append(mods[path].register_forward_pre_hook(pre("out"), with_kwargs=True) if side == "in"
                            else mods[path].register_forward_hook(post("out")))

    def remove(self):
        for h in self.handles:
            h.remove()


def _pet_of(model, block):
    """The PET module planned on encoder layer LAYER's `block` output, and its parameters by name."""
    (path,) = [k for k, p in model.vlpet_patch.attached.items()
               if (p.site.stack, p.site.layer, p.site.block, p.site.role) == ("encoder", LAYER, block, "output")]
    pet = model.get_submodule(path)
    return pet, {n: t.detach() for n, t in pet.named_parameters()}


def _rules(gate, op, scale, init, zero_up=False, zero_gate=False, start=None):
    extra = f", gate_start: {start}" if start is not None else ""
    return parse_rules(f"""
name: formula
methods:
  pet: {{type: vlpet, dim: {R}, heads: {HEADS}, head_mode: down, gate: {gate}, gate_dim: {R_G}, gate_op: {op},
        scale: {scale}, init: {init}, activation: gelu_new, zero_init_up: {str(zero_up).lower()},
        zero_init_gate: {str(zero_gate).lower()}{extra}}}
rules:
  - {{select: {{stack: encoder, block: [self_attn, ffn], role: output}}, insert: pet}}
""")


def _perturb(model, seed=3):
    """Move every PET weight away from its init (g ≠ 0, gates away from 0.5 but not saturated)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".pet_" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _check(model, family, block, gate, op, scale, heads, inputs):
    taps = Taps(model, WHERE[(family, block)])
    with torch.no_grad():
        model(**inputs)
    taps.remove()
    _, params = _pet_of(model, block)
    x, h, out = taps.seen["x"], taps.seen["h"], taps.seen["out"]
    want = expected_block_output(params, gate, op, scale, heads, x, h)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    return x, h, out


@pytest.mark.parametrize("op", ["mul", "add"])
@pytest.mark.parametrize("gate", ["large", "middleX", "middleY", "small"])
@pytest.mark.parametrize("block", ["self_attn", "ffn"])
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_gate_against_its_formula(tables, family, block, gate, op):
    s = SETTINGS[family]
    model = _patched(tables, family, _rules(gate, op, s["scale"], s["init"]))
    _perturb(model)
    x, h, out = _check(model, family, block, gate, op, s["scale"], HEADS, _inputs(family))
    assert not torch.allclose(out, x + s["scale"] * h, atol=1e-3)  # the module really changed the block


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_small_gate_averages_over_padding_too(tables, family):
    """With padding in the batch the per-example scalar is the unmasked mean: it differs from the masked one."""
    model = _patched(tables, family, _rules("small", "mul", 1.0, "torch"))
    _perturb(model)
    inputs = _inputs(family, pad=True)
    x, h, out = _check(model, family, "ffn", "small", "mul", 1.0, HEADS, inputs)
    _, p = _pet_of(model, "ffn")
    h1 = modified(p, h, HEADS)
    scores = torch.sigmoid(linear(torch.cat([x, h1], -1), p["gate.proj.weight"], p["gate.proj.bias"]))
    keep = inputs["attention_mask"][..., None].float()
    masked = (scores * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True)
    assert not torch.allclose(out[0], (x + masked * h1)[0], atol=1e-4)


@pytest.mark.parametrize("op", ["mul", "add"])
@pytest.mark.parametrize("gate", ["large", "middleX", "middleY", "small"])
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_zero_init_gate(tables, family, gate, op):
    """zero_init_gate zeroes the gate generator's last layer: G = 1/2 (sigmoid gates) or 1 (middleY)."""
    s = SETTINGS[family]
    model = _patched(tables, family, _rules(gate, op, s["scale"], s["init"], zero_up=True, zero_gate=True))
    pet, p = _pet_of(model, "ffn")
    last = {"large": ["gate.up.weight", "gate.up.bias"], "middleX": ["gate.proj.weight", "gate.proj.bias"],
            "middleY": ["gate.g"], "small": ["gate.proj.weight", "gate.proj.bias"]}[gate]
    assert all(torch.count_nonzero(p[n]) == 0 for n in last + ["up.weight", "up.bias"])
    if gate == "large":  # the generator's first layer keeps its init
        assert torch.count_nonzero(p["gate.down.weight"]) == p["gate.down.weight"].numel()
    taps = Taps(model, WHERE[(family, "ffn")])
    with torch.no_grad():
        model(**_inputs(family))
    x, h, out = taps.seen["x"], taps.seen["h"], taps.seen["out"]
    g0 = 1.0 if gate == "middleY" else 0.5
    torch.testing.assert_close(out, x + s["scale"] * (g0 * h if op == "mul" else h + g0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init", ["normal", "torch"])
def test_init(tables, init):
    """init: normal is N(0, 0.02) weights and zero biases (BART's _init_weights); torch is nn.Linear's default,
    U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    rules = parse_rules(f"""
name: init
methods: {{pet: {{type: vlpet, dim: 96, heads: 4, gate: large, gate_dim: 96, init: {init}, zero_init_up: false}}}}
rules: [{{select: {{stack: encoder, block: ffn, role: output}}, insert: pet}}]
""")
    model = _patched(tables, "bart", rules)
    _, p = _pet_of(model, "ffn")
    for name, t in p.items():
        fan_in = t.shape[1] if t.dim() == 2 else None
        if init == "normal":
            if name.endswith("bias"):
                assert torch.count_nonzero(t) == 0, name
            else:
                assert abs(t.std().item() - 0.02) < 0.002 and abs(t.mean().item()) < 0.002, name
        elif fan_in is not None:
            bound = 1 / math.sqrt(fan_in)
            assert t.abs().max() <= bound and abs(t.std().item() - bound / math.sqrt(3)) < 0.1 * bound, name


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_cross_attention_value_adapter(tables, family):
    """The decoder's parallel value adapter (N_h = 1, no gate): V = W_v E + W_up gelu_new(W_down E + b) + b."""
    model = _patched(tables, family, "vlpet_large")
    _perturb(model)
    path = {"t5": "decoder.block.1.layer.1.EncDecAttention.v", "bart": "model.decoder.layers.1.encoder_attn.v_proj"}
    v = model.get_submodule(path[family])
    seen = {}
    handles = [v.register_forward_pre_hook(lambda m, a: seen.__setitem__("e", a[0])),
               v.register_forward_hook(lambda m, a, o: seen.__setitem__("raw", o), prepend=True),
               v.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))]
    with torch.no_grad():
        model(**_inputs(family))
    for h in handles:
        h.remove()
    p = {n: t.detach() for n, t in v.pet_v_parallel.named_parameters()}
    assert set(p) == {"down.weight", "down.bias", "up.weight", "up.bias"}  # no gate
    e = seen["e"]
    want = seen["raw"] + linear(gelu_new(linear(e, p["down.weight"], p["down.bias"])), p["up.weight"], p["up.bias"])
    torch.testing.assert_close(seen["out"], want, rtol=1e-5, atol=1e-5)


def _shipped(name):
    from pathlib import Path

    return yaml.safe_load((Path(__file__).resolve().parents[1] / "rules" / f"{name}.yaml").read_text())


@pytest.mark.parametrize("gate", ["large", "middleX", "middleY", "small"])
def test_shipped_t5_rule_sets_compute_their_formula(tables, gate):
    """The shipped *_t5 rule sets, as written in their YAML (r = 192, N_h = 4, scale 0.3), on a tiny T5."""
    name = {"large": "vlpet_large_t5", "middleX": "vlpet_middlex_t5", "middleY": "vlpet_middley_t5",
            "small": "vlpet_small_t5"}[gate]
    cfg = _shipped(name)["methods"]["encoder_pet"]
    assert (cfg["gate"], cfg["scale"], cfg["dim"], cfg["heads"]) == (gate, 0.3, 192, 4)
    model = _patched(tables, "t5", name)
    _perturb(model)
    for block in ("self_attn", "ffn"):
        _check(model, "t5", block, gate, cfg.get("gate_op", "mul"), cfg["scale"], cfg["heads"], _inputs("t5"))


# ---- every shipped rule set loads and plans ------------------------------------------------------------------

def test_every_shipped_rule_set_is_tested():
    names = set(shipped_rule_names())
    assert {"vlpet_small_t5", "vlpet_middlex_t5", "vlpet_middley_t5", "vlpet_large_t5"} <= names
    assert names == {p.stem for p in (_rules_dir()).glob("*.yaml")}


def _rules_dir():
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "rules"


@pytest.fixture(scope="module")
def vl_models():
    """The built-in VL-T5 / VL-BART at the paper's base shapes, on the meta device (planning needs only shapes)."""
    out = {}
    for f in ("t5", "bart"):
        model = build_model(f"vl-{f}", "base", device="meta")
        out[f] = (model, vlpet_fx.discover(model))
    return out


@pytest.mark.parametrize("name", sorted(p.stem for p in _rules_dir().glob("*.yaml")))
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_every_shipped_rule_set_loads_and_plans(vl_models, family, name):
    """Each shipped file loads by name and plans on a VL model; its methods reach the placements as written."""
    model, table = vl_models[family]
    doc = _shipped(name)
    rs = vlpet_fx.load_rules(name)
    assert rs.name == doc["name"] == name
    plan = vlpet_fx.plan(model, rs, table=table)
    cfg = model.text.config
    n_enc, n_dec = (cfg.num_layers, cfg.num_decoder_layers) if family == "t5" else (cfg.encoder_layers, cfg.decoder_layers)
    rules = doc.get("rules") or []
    if "encoder_pet" in (doc.get("methods") or {}):  # the paper's encoder-decoder sets (vlpet_causal_lm: tests/test_causal_lm.py)
        assert len(plan.placements) == 2 * n_enc + n_dec
        for pl in plan.placements:
            want = doc["methods"]["encoder_pet" if pl.site.stack == "encoder" else "decoder_value"]
            got = vars(pl.config)
            # a width written relative to the site ('1/8') is recorded resolved (tests/test_widths.py checks it)
            relative = {k for k, v in want.items() if k in ("dim", "gate_dim", "rank") and isinstance(v, (str, dict))}
            assert all(got[k] == v for k, v in want.items() if k != "type" and k not in relative), \
                (name, pl.site, want, got)
            assert all(type(got[k]) is int for k in relative)
    if not rules:
        assert plan.placements == []
    assert 0 < plan.trainable_params <= plan.patched_total
    if doc.get("train_all"):
        assert plan.trainable_params == plan.total_params == sum(p.numel() for p in model.parameters())
    if name == "projector_only":
        assert plan.trainable_params == sum(p.numel() for p in model.visual_projection.parameters())


@pytest.mark.parametrize("gate,start", [("large", 0.9), ("middleX", 0.95), ("middleY", 1.5), ("small", 0.8)])
def test_gate_start(tables, gate, start):
    """gate_start sets where G begins (the ablation of the gate's start): with the modification zero at init,
    the sub-layer output is X + s·G·h with G = gate_start for every token and channel."""
    s = SETTINGS["t5"]
    model = _patched(tables, "t5", _rules(gate, "mul", s["scale"], s["init"], zero_up=True, zero_gate=True,
                                          start=start))
    taps = Taps(model, WHERE[("t5", "ffn")])
    with torch.no_grad():
        model(**_inputs("t5"))
    x, h, out = taps.seen["x"], taps.seen["h"], taps.seen["out"]
    torch.testing.assert_close(out, x + s["scale"] * start * h, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gate,start", [("large", 1.0), ("large", 0.0), ("small", float("nan")),
                                        ("middleY", 4.5), ("none", 0.5)])
def test_gate_start_refused(gate, start):
    from vlpet_fx.modules.base import MethodConfigError
    from vlpet_fx.modules.vlpet import VlPet, VlpetConfig

    with pytest.raises(MethodConfigError, match="gate_start"):
        VlPet.check_config(VlpetConfig(gate=gate, gate_start=start))
