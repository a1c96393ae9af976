"""VL-PET (Hu et al., ICCV 2023): a multi-head modular modification with a granularity-controlled gate.

On a sub-layer with input X and output H (before dropout and the residual add):

    ΔH  = multi-head modification of H   (heads on the down projection, the up projection, both, or in pairs)
    H'' = s · (G ⊙ (H + ΔH))             (``gate_op: add`` gives s · ((H + ΔH) + G), the paper's ablation)

with the gate G at one of four granularities:

    large   G = sigmoid(W_u φ(W_d X + b_d) + b_u)      per token and channel, low rank r_g    (N×d)
    middleX G = sigmoid(w · (X + H + ΔH) + b)          per token                              (N×1)
    middleY G = 1 + g,  g ∈ R^d                        per channel, input independent        (1×d)
    small   G = mean_t sigmoid(w · [X_t ; (H+ΔH)_t] + b)   one scalar per example             (1×1)

``gate: none`` with a ``parallel`` placement is the decoder's cross-attention value adapter:
V = W_v E + ΔV(E). The multi-head down/up/down-up variants are, as linear maps, one down and one up
projection (concatenated heads of a shared input); they are stored as single matrices, which is exact and
fast. ``down-up-pair`` has a block-diagonal up projection and is computed per head.

Initialisation follows the two code bases the paper ran: ``init: torch`` (PyTorch's default, the T5 runs)
or ``init: normal`` (N(0, 0.02) weights, zero biases, as BART's ``_init_weights`` does); ``zero_init_up``
zeroes the up projection (ΔH = 0 at the start) and ``zero_init_gate`` the gate generator's last layer
(G = 0.5 for the sigmoid gates, G = 1 for middleY).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .base import (ACTIVATIONS, MethodConfig, MethodConfigError, PetModule, RelativeWidth, Width, activation,
                   bottleneck, check_positive, check_reduction, register_pet, resolve_width)



@dataclass
class VlpetConfig(MethodConfig):
    dim: Width | None = None  # r (adapter_down_dim), absolute or relative to the site; if unset, features / reduction
    reduction: float = 8.0
    heads: int = 4  # N_h
    head_mode: Literal["down", "up", "down-up", "down-up-pair"] = "down"
    activation: str = "gelu_new"
    gate: Literal["large", "middleX", "middleY", "small", "none"] = "large"
    gate_dim: Width | None = None  # r_g of the large gate's generator, absolute or relative to d (default: r)
    gate_op: Literal["mul", "add"] = "mul"
    scale: float = 1.0  # the T5 runs' encoder_gating_scaling_factor (0.3)
    init: Literal["torch", "normal"] = "torch"
    zero_init_up: bool = True
    zero_init_gate: bool = False
    # where the gate starts: G = gate_start exactly at init (sigmoid gates: generator's last layer zero, bias
    # logit(gate_start); middleY: g = gate_start - 1). None keeps the initialisation above. In (0, 1) for the
    # sigmoid gates; (0, 4] for middleY.
    gate_start: float | None = None


def _normal_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class _PairUp(nn.Module):
    """Block-diagonal up projection: head i maps its r/N_h slice to its d/N_h slice of the output."""

    def __init__(self, heads: int, r: int, d: int):
        super().__init__()
        self.heads = heads
        self.weight = nn.Parameter(torch.empty(heads, r // heads, d // heads))
        self.bias = nn.Parameter(torch.empty(d))
        bound = (heads / r) ** 0.5  # PyTorch's default for an nn.Linear(r/N_h, d/N_h) per head
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        zh = z.unflatten(-1, (self.heads, -1))
        return torch.einsum("...hr,hro->...ho", zh, self.weight).flatten(-2) + self.bias


class GateLarge(nn.Module):
    needs_x = True

    def __init__(self, d: int, r_g: int, act: nn.Module):
        super().__init__()
        self.down = nn.Linear(d, r_g)
        self.act = act
        self.up = nn.Linear(r_g, d)

    def forward(self, x, h):
        return torch.sigmoid(self.up(self.act(self.down(x))))

    def zero_(self):
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def start_(self, g: float):
        self.zero_()
        nn.init.constant_(self.up.bias, math.log(g / (1.0 - g)))


class GateMiddleX(nn.Module):
    needs_x = True

    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Linear(d, 1)

    def forward(self, x, h):
        return torch.sigmoid(self.proj(x + h))

    def zero_(self):
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def start_(self, g: float):
        self.zero_()
        nn.init.constant_(self.proj.bias, math.log(g / (1.0 - g)))


class GateMiddleY(nn.Module):
    needs_x = False

    def __init__(self, d: int):
        super().__init__()
        self.g = nn.Parameter(torch.empty(d))
        nn.init.normal_(self.g, std=0.02)

    def forward(self, x, h):
        return 1.0 + self.g

    def zero_(self):
        nn.init.zeros_(self.g)

    def start_(self, g: float):
        nn.init.constant_(self.g, g - 1.0)


class GateSmall(nn.Module):
    needs_x = True

    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Linear(2 * d, 1)

    def forward(self, x, h):
        # per-token scores, averaged over the sequence (unmasked, as in the paper's code): [B, 1, 1]
        return torch.sigmoid(self.proj(torch.cat([x, h], dim=-1))).mean(dim=-2, keepdim=True)

    def zero_(self):
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def start_(self, g: float):
        self.zero_()
        nn.init.constant_(self.proj.bias, math.log(g / (1.0 - g)))


# granularity level -> gate builder (d, r_g, activation name); `none` is the ungated value adapter
GATE_BUILDERS = {
    "large": lambda d, r_g, act: GateLarge(d, r_g, activation(act)),
    "middleX": lambda d, r_g, act: GateMiddleX(d),
    "middleY": lambda d, r_g, act: GateMiddleY(d),
    "small": lambda d, r_g, act: GateSmall(d),
    "none": lambda d, r_g, act: None,
}


def _mul(g, h):
    return g * h


def _add(g, h):
    return h + g


def _unscaled(h):
    return h


@register_pet("vlpet")
class VlPet(PetModule):
    config_class = VlpetConfig

    def __init__(self, in_features, out_features, config: VlpetConfig, placement="after"):
        super().__init__(in_features, out_features, config, placement)
        config = self.config  # widths resolved for this site
        d_in, d = self.read_features, out_features
        r = config.dim
        act = activation(config.activation)
        self.act = act
        self.down = nn.Linear(d_in, r)  # heads on the down projection: concatenated, one matrix
        self.up = _PairUp(config.heads, r, d) if config.head_mode == "down-up-pair" else nn.Linear(r, d)
        self.scale = float(config.scale)
        self.gate = GATE_BUILDERS[config.gate](d, config.gate_dim or r, config.activation)
        self.needs_block_input = bool(self.gate is not None and self.gate.needs_x and placement == "after")
        self._combine = _mul if config.gate_op == "mul" else _add
        # s = 1 (the BART runs) costs no kernel: the scaling is chosen once here, like the forward below
        self._scaled = _unscaled if self.scale == 1.0 else self._times_scale
        if config.init == "normal":
            _normal_init(self)
        if config.zero_init_up:
            for p in self.up.parameters():
                nn.init.zeros_(p)
        if config.zero_init_gate and self.gate is not None:
            self.gate.zero_()
        if config.gate_start is not None and self.gate is not None:
            self.gate.start_(config.gate_start)
        # the forward used for `after` placements, chosen once here (no branching in forward)
        if self.gate is None:
            self.after = self._after_plain
        elif self.gate.needs_x:
            self.after = self._after_needs_input
        else:
            self.after = self._after_gated
        self.block_input: torch.Tensor | None = None  # set by the patcher's pre-hook when the gate reads X

    def delta(self, h):
        return self.up(self.act(self.down(h)))

    def gated(self, x, h):
        """H'' = s · combine(G(x, H + ΔH), H + ΔH)."""
        h = h + self.delta(h)
        return self._scaled(self._combine(self.gate(x, h), h))

    def _times_scale(self, h):
        return h * self.scale

    def _after_plain(self, y):
        return self._scaled(y + self.delta(y))

    def _after_gated(self, y):
        return self.gated(y, y)

    def _after_needs_input(self, y):
        return self.gated(self.block_input, y)

    def parallel(self, x, y):
        return y + self._scaled(self.delta(x))

    @classmethod
    def resolve(cls, in_features, out_features, placement, config: VlpetConfig) -> VlpetConfig:
        """r relative to the features the module reads, rounded to a multiple of N_h (an absolute r must
        divide by N_h: check_shape); r_g relative to the gate's d (the output), defaulting to r."""
        read = out_features if placement == "after" else in_features
        heads = config.heads if config.heads >= 1 else 1  # heads < 1 is refused by check_config
        r = bottleneck(read, config.dim, config.reduction, "vlpet", multiple=heads)
        gate_dim = config.gate_dim
        if config.gate == "large":
            gate_dim = resolve_width(r if gate_dim is None else gate_dim, out_features, "vlpet: gate width (gate_dim)")
        elif isinstance(gate_dim, RelativeWidth):  # unused by the other gates; recorded as a number all the same
            gate_dim = resolve_width(gate_dim, out_features, "vlpet: gate width (gate_dim)")
        return dataclasses.replace(config, dim=r, gate_dim=gate_dim)

    @classmethod
    def check_config(cls, config: VlpetConfig):
        check_positive("vlpet", dim=config.dim, reduction=config.reduction, heads=config.heads,
                       gate_dim=config.gate_dim)
        check_reduction("vlpet", config.reduction)
        if config.activation not in ACTIVATIONS:
            raise MethodConfigError(f"vlpet: unknown activation: choose one of {', '.join(ACTIVATIONS)}")
        if config.gate == "none" and config.gate_op != "mul":
            raise MethodConfigError("vlpet: gate_op needs a gate")
        if config.gate_start is not None:
            g = config.gate_start
            if config.gate == "none":
                raise MethodConfigError("vlpet: gate_start needs a gate")
            high = 4.0 if config.gate == "middleY" else 1.0
            if not (math.isfinite(g) and 0.0 < g and (g <= high if config.gate == "middleY" else g < high)):
                raise MethodConfigError(f"vlpet: gate_start must be in (0, {high:g}{']' if high > 1 else ')'} "
                                        f"for gate {config.gate}, got {g}")

    @classmethod
    def check_shape(cls, read_features, out_features, config: VlpetConfig):
        r = bottleneck(read_features, config.dim, config.reduction, "vlpet", multiple=max(1, config.heads))
        if config.gate in ("large",):
            resolve_width(config.gate_dim or r, out_features, "vlpet: gate width (gate_dim)")
        if config.heads < 1 or r % config.heads:
            raise MethodConfigError(f"vlpet: bottleneck width {r} is not divisible by heads={config.heads}")
        if config.head_mode in ("up", "down-up", "down-up-pair") and out_features % config.heads:
            raise MethodConfigError(f"vlpet: {out_features} output features are not divisible by heads={config.heads}")
        if config.gate == "none" and config.gate_op != "mul":
            raise MethodConfigError("vlpet: gate_op needs a gate")
