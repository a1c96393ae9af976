"""The hand-written reference of bench/step.py: VL-PET and VL-Adapter written into T5 and BART by hand.

Nothing here calls the compiler (no discovery, planning, module builder or pass of vlpet_fx): the modules are
this file's own classes, and they are wired in the way one would patch the two model families by hand — by
the module paths and layer classes this file knows (Hugging Face T5 and BART), with the layer's own forward
rewritten to call the PET module where the paper puts it:

    VL-PET (encoder self-attention and FFN):  H'' = s · combine(G(X, H1), H1),  H1 = h + W_up φ(W_down h)
        X: the sub-layer's input (T5: the residual stream before the layer norm; BART: the layer input /
        the FFN input), h: the sub-layer's output; out = X + dropout(H'')
    VL-PET decoder value adapter (cross-attention v):  V = W_v E + W_up φ(W_down E)
    VL-Adapter (after every attention and FFN sub-layer):  h -> h + W_up φ(W_down h)

The method settings come from the shipped rule file itself (YAML, read here), and only the shapes of the
shipped VL-PET and VL-Adapter rule sets are supported. Parameter names inside each PET module (``down``,
``up``, ``gate.*``) follow the compiler's, so the test and --check can copy weights between the two.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from torch import nn
from torch.nn import functional as F

RULES_DIR = Path(__file__).resolve().parents[1] / "rules"


def gelu_new(x):
    return F.gelu(x, approximate="tanh")


ACTS = {"gelu_new": gelu_new, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def _init_linear(m: nn.Linear, how: str, zero: bool) -> None:
    if zero:
        nn.init.zeros_(m.weight)
        nn.init.zeros_(m.bias)
    elif how == "normal":
        nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)


# ---- the modules -------------------------------------------------------------------------------------------

class LargeGate(nn.Module):
    def __init__(self, d, r_g, act):
        super().__init__()
        self.down, self.up, self.act = nn.Linear(d, r_g), nn.Linear(r_g, d), act

    def forward(self, x, h1):
        return torch.sigmoid(self.up(self.act(self.down(x))))


class MiddleXGate(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, 1)

    def forward(self, x, h1):
        return torch.sigmoid(self.proj(x + h1))


class MiddleYGate(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.g = nn.Parameter(torch.randn(d) * 0.02)

    def forward(self, x, h1):
        return self.g + 1.0


class SmallGate(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(2 * d, 1)

    def forward(self, x, h1):
        return torch.sigmoid(self.proj(torch.cat([x, h1], dim=-1))).mean(dim=1, keepdim=True)


class HandVlPet(nn.Module):
    """The encoder's VL-PET module: forward(X, h) -> H''. The N_h down-projection heads, concatenated, are one
    Linear(d, r)."""

    def __init__(self, d, cfg):
        super().__init__()
        r = cfg["dim"]
        self.act = ACTS[cfg.get("activation", "gelu_new")]
        self.down, self.up = nn.Linear(d, r), nn.Linear(r, d)
        kind = cfg["gate"]
        self.gate = {"large": lambda: LargeGate(d, cfg.get("gate_dim") or r, self.act), "middleX": lambda: MiddleXGate(d),
                     "middleY": lambda: MiddleYGate(d), "small": lambda: SmallGate(d)}[kind]()
        self.add = cfg.get("gate_op", "mul") == "add"
        self.scale = float(cfg.get("scale", 1.0))
        how = cfg.get("init", "torch")
        _init_linear(self.down, how, False)
        _init_linear(self.up, how, cfg.get("zero_init_up", True))
        for m in self.gate.modules():
            if isinstance(m, nn.Linear):
                last = m is getattr(self.gate, "up", None) or m is getattr(self.gate, "proj", None)
                _init_linear(m, how, bool(cfg.get("zero_init_gate", False)) and last)
        if kind == "middleY" and cfg.get("zero_init_gate", False):
            nn.init.zeros_(self.gate.g)

    def forward(self, x, h):
        h1 = h + self.up(self.act(self.down(h)))
        g = self.gate(x, h1)
        out = h1 + g if self.add else h1 * g
        return out * self.scale if self.scale != 1.0 else out


class HandAdapter(nn.Module):
    """A bottleneck adapter: h -> h + W_up φ(W_down h) (sequential), or v + W_up φ(W_down e) (parallel)."""

    def __init__(self, d_in, d_out, r, cfg):
        super().__init__()
        self.act = ACTS[cfg.get("activation", "gelu_new")]
        self.down, self.up = nn.Linear(d_in, r), nn.Linear(r, d_out)
        how = cfg.get("init", "torch")
        _init_linear(self.down, how, False)
        _init_linear(self.up, how, cfg.get("zero_init_up", True))

    def delta(self, x):
        return self.up(self.act(self.down(x)))


# ---- T5: the layers' forwards with the PET modules written in ------------------------------------------------

def _swap(module: nn.Module, cls: type, **children) -> None:
    """Give `module` the forward of `cls` (a subclass of its own class) and the PET modules as children."""
    module.__class__ = cls
    for name, child in children.items():
        module.add_module(name, child)


def _t5_classes():
    from transformers.models.t5 import modeling_t5 as t5

    class SelfAttn(t5.T5LayerSelfAttention):  # .vlpet(X, h) and/or .adapter(h) on the attention output
        def forward(self, hidden_states, attention_mask=None, position_bias=None, cache=None, **kwargs):
            a, position_bias, w = self.SelfAttention(self.layer_norm(hidden_states), mask=attention_mask,
                                                     position_bias=position_bias, cache=cache, **kwargs)
            if hasattr(self, "adapter"):
                a = a + self.adapter.delta(a)
            if hasattr(self, "vlpet"):
                a = self.vlpet(hidden_states, a)
            return hidden_states + self.dropout(a), position_bias, w

    class CrossAttn(t5.T5LayerCrossAttention):
        def forward(self, hidden_states, key_value_states, attention_mask=None, position_bias=None, cache=None,
                    **kwargs):
            a, position_bias, w = self.EncDecAttention(self.layer_norm(hidden_states), mask=attention_mask,
                                                       key_value_states=key_value_states,
                                                       position_bias=position_bias, cache=cache, **kwargs)
            a = a + self.adapter.delta(a)
            return hidden_states + self.dropout(a), position_bias, w

    class FF(t5.T5LayerFF):
        def forward(self, hidden_states):
            f = self.DenseReluDense(self.layer_norm(hidden_states))
            if hasattr(self, "adapter"):
                f = f + self.adapter.delta(f)
            if hasattr(self, "vlpet"):
                f = self.vlpet(hidden_states, f)
            return hidden_states + self.dropout(f)

    return SelfAttn, CrossAttn, FF


class ParallelLinear(nn.Linear):
    """A Linear with a parallel adapter on its input: W x + b + adapter.delta(x)."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.adapter.delta(x)


def _t5(model, method, enc, dec):
    SelfAttn, CrossAttn, FF = _t5_classes()
    d = model.config.d_model
    pets = []
    for blk in model.encoder.block:
        for layer, cls in ((blk.layer[0], SelfAttn), (blk.layer[-1], FF)):
            pets.append(_attach(layer, cls, method, enc, d))
    for blk in model.decoder.block:
        if method == "vlpet":
            v = blk.layer[1].EncDecAttention.v
            _swap(v, ParallelLinear, adapter=HandAdapter(v.in_features, v.out_features, dec["dim"], dec))
        else:
            for layer, cls in ((blk.layer[0], SelfAttn), (blk.layer[1], CrossAttn), (blk.layer[2], FF)):
                pets.append(_attach(layer, cls, method, dec, d))
    norms = [m for n, m in model.named_modules() if n.startswith("encoder.") and n.endswith("layer_norm")]
    if method == "adapter":
        norms += [m for n, m in model.named_modules() if n.startswith("decoder.") and n.endswith("layer_norm")]
    return norms


def _attach(layer, cls, method, cfg, d):
    if method == "vlpet":
        _swap(layer, cls, vlpet=HandVlPet(d, cfg))
    else:
        _swap(layer, cls, adapter=HandAdapter(d, d, cfg.get("dim") or int(d // cfg.get("reduction", 8)), cfg))


# ---- BART -------------------------------------------------------------------------------------------------

def _bart_classes():
    from transformers.models.bart import modeling_bart as bart

    class EncoderLayer(bart.BartEncoderLayer):  # .vlpet_attn(X, h) and .vlpet_ffn(X, h), or adapters
        def forward(self, hidden_states, attention_mask, **kwargs):
            x = hidden_states
            h, _ = self.self_attn(hidden_states, attention_mask=attention_mask, **kwargs)
            h = self._pet_attn(x, h)
            h = F.dropout(h, p=self.dropout, training=self.training)
            x = self.self_attn_layer_norm(x + h)
            h = F.dropout(self.activation_fn(self.fc1(x)), p=self.activation_dropout, training=self.training)
            h = self._pet_ffn(x, self.fc2(h))
            h = F.dropout(h, p=self.dropout, training=self.training)
            return self.final_layer_norm(x + h)

        def _pet_attn(self, x, h):
            return self.vlpet_attn(x, h) if hasattr(self, "vlpet_attn") else h + self.adapter_attn.delta(h)

        def _pet_ffn(self, x, h):
            return self.vlpet_ffn(x, h) if hasattr(self, "vlpet_ffn") else h + self.adapter_ffn.delta(h)

    class AttnAdapter(bart.BartAttention):  # decoder attentions under VL-Adapter: an adapter on the output
        def forward(self, *args, **kwargs):
            out, w = super().forward(*args, **kwargs)
            return out + self.adapter.delta(out), w

    class Fc2Adapter(nn.Linear):
        def forward(self, x):
            y = F.linear(x, self.weight, self.bias)
            return y + self.adapter.delta(y)

    return EncoderLayer, AttnAdapter, Fc2Adapter


def _bart(model, method, enc, dec):
    EncoderLayer, AttnAdapter, Fc2Adapter = _bart_classes()
    d = model.config.d_model
    inner = model.model
    for layer in inner.encoder.layers:
        if method == "vlpet":
            _swap(layer, EncoderLayer, vlpet_attn=HandVlPet(d, enc), vlpet_ffn=HandVlPet(d, enc))
        else:
            r = enc.get("dim") or int(d // enc.get("reduction", 8))
            _swap(layer, EncoderLayer, adapter_attn=HandAdapter(d, d, r, enc), adapter_ffn=HandAdapter(d, d, r, enc))
    for layer in inner.decoder.layers:
        if method == "vlpet":
            v = layer.encoder_attn.v_proj
            _swap(v, ParallelLinear, adapter=HandAdapter(v.in_features, v.out_features, dec["dim"], dec))
        else:
            r = dec.get("dim") or int(d // dec.get("reduction", 8))
            _swap(layer.self_attn, AttnAdapter, adapter=HandAdapter(d, d, r, dec))
            _swap(layer.encoder_attn, AttnAdapter, adapter=HandAdapter(d, d, r, dec))
            _swap(layer.fc2, Fc2Adapter, adapter=HandAdapter(d, d, r, dec))
    stacks = ("model.encoder.",) + (("model.decoder.",) if method == "adapter" else ())
    return [m for n, m in model.named_modules() if n.startswith(stacks) and isinstance(m, nn.LayerNorm)]


# ---- entry point ---------------------------------------------------------------------------------------------

def read_rules(name: str) -> tuple[str, dict, dict]:
    """(method type, encoder config, decoder config) of a shipped VL-PET or VL-Adapter rule file."""
    path = RULES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"hand/{name}: the hand-written reference knows the shipped rule files only ({RULES_DIR})")
    doc = yaml.safe_load(path.read_text())
    methods = doc.get("methods") or {}
    if set(methods) == {"encoder_pet", "decoder_value"} and methods["encoder_pet"].get("type") == "vlpet":
        enc, dec = methods["encoder_pet"], methods["decoder_value"]
        if enc.get("head_mode", "down") != "down" or dec.get("heads", 1) != 1 or dec.get("gate", "none") != "none":
            raise SystemExit(f"hand/{name}: only heads on the down projection and an ungated value adapter are written")
        return "vlpet", enc, dec
    if set(methods) == {"adapter"} and methods["adapter"].get("type") == "adapter":
        return "adapter", methods["adapter"], methods["adapter"]
    raise SystemExit(f"hand/{name}: the hand-written reference covers the VL-PET and VL-Adapter rule sets only")


def hand_reference(base: nn.Module, rules: str, seed: int = 0) -> nn.Module:
    """A copy of `base` with rule set `rules` written in by hand; only the PET modules and the rule set's layer
    norms (and a visual projector, if any — none in these text models) train."""
    import copy

    method, enc, dec = read_rules(rules)
    model = copy.deepcopy(base)
    model.requires_grad_(False)
    torch.manual_seed(seed)
    family = model.config.model_type
    if family in ("t5", "mt5"):
        norms = _t5(model, method, enc, dec)
    elif family == "bart":
        norms = _bart(model, method, enc, dec)
    else:
        raise SystemExit(f"hand/{rules}: the hand-written reference knows T5 and BART, not {family}")
    for m in norms:
        m.requires_grad_(True)
    for name, p in model.named_parameters():
        if any(k in name for k in (".vlpet", ".adapter")):
            p.requires_grad_(True)
    return model


def pet_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The hand model's PET weights keyed by the compiler's module paths (for copying into an eager patch)."""
    family = model.config.model_type
    subs = T5_NAMES if family in ("t5", "mt5") else BART_NAMES
    out = {}
    for name, t in model.named_parameters():
        hits = [(a, b) for stack, a, b in subs if name.startswith(stack) and a in name]
        if len(hits) > 1:
            raise SystemExit(f"hand reference: {name} matches two renamings {hits}")
        if hits:
            out[name.replace(*hits[0])] = t
    return out


# (stack prefix, this file's module path piece, the compiler's): T5 layer 1 is the FFN in the encoder and the
# cross-attention in the decoder
T5_NAMES = [("encoder.", ".layer.0.vlpet.", ".layer.0.SelfAttention.pet_output_after."),
            ("encoder.", ".layer.1.vlpet.", ".layer.1.DenseReluDense.pet_output_after."),
            ("", ".layer.0.adapter.", ".layer.0.SelfAttention.pet_output_after."),
            ("encoder.", ".layer.1.adapter.", ".layer.1.DenseReluDense.pet_output_after."),
            ("decoder.", ".layer.1.adapter.", ".layer.1.EncDecAttention.pet_output_after."),
            ("decoder.", ".layer.2.adapter.", ".layer.2.DenseReluDense.pet_output_after."),
            ("decoder.", ".EncDecAttention.v.adapter.", ".EncDecAttention.v.pet_v_parallel.")]
BART_NAMES = [("", ".vlpet_attn.", ".self_attn.pet_output_after."), ("", ".vlpet_ffn.", ".fc2.pet_output_after."),
              ("", ".adapter_attn.", ".self_attn.pet_output_after."), ("", ".adapter_ffn.", ".fc2.pet_output_after."),
              ("", ".v_proj.adapter.", ".v_proj.pet_v_parallel."),
              ("", ".self_attn.adapter.", ".self_attn.pet_output_after."),
              ("", ".encoder_attn.adapter.", ".encoder_attn.pet_output_after."),
              ("", ".fc2.adapter.", ".fc2.pet_output_after.")]

