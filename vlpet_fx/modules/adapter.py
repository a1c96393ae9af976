"""Bottleneck adapter (Houlsby et al. 2019; the VL-Adapter baseline): y + up(act(down(h))).

Placed ``after`` a sub-layer it reads the sub-layer's output (sequential adapter with its own residual);
placed ``parallel`` it reads the site's input (He et al.'s parallel adapter).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from .base import (ACTIVATIONS, MethodConfig, MethodConfigError, PetModule, Width, activation, bottleneck,
                   check_positive, check_reduction, register_pet)


@dataclass
class AdapterConfig(MethodConfig):
    dim: Width | None = None  # bottleneck width, absolute or relative to the site; if unset, features / reduction
    reduction: float = 8.0
    activation: str = "gelu_new"
    bias: bool = True
    zero_init_up: bool = True  # identity at init; False keeps nn.Linear's default init (as VL-PET's BART runs do)
    scale: float = 1.0


@register_pet("adapter")
class Adapter(PetModule):
    config_class = AdapterConfig

    def __init__(self, in_features, out_features, config: AdapterConfig, placement="after"):
        super().__init__(in_features, out_features, config, placement)
        config = self.config  # widths resolved for this site
        r = config.dim
        self.down = nn.Linear(self.read_features, r, bias=config.bias)
        self.act = activation(config.activation)
        self.up = nn.Linear(r, out_features, bias=config.bias)
        self.scale = config.scale
        if config.zero_init_up:
            nn.init.zeros_(self.up.weight)
            if self.up.bias is not None:
                nn.init.zeros_(self.up.bias)

    def delta(self, x):
        return self.up(self.act(self.down(x))) * self.scale

    @classmethod
    def resolve(cls, in_features, out_features, placement, config: AdapterConfig) -> AdapterConfig:
        read = out_features if placement == "after" else in_features
        return dataclasses.replace(config, dim=bottleneck(read, config.dim, config.reduction, "adapter"))

    @classmethod
    def check_config(cls, config: AdapterConfig):
        check_positive("adapter", dim=config.dim, reduction=config.reduction)
        check_reduction("adapter", config.reduction)
        if config.activation not in ACTIVATIONS:
            raise MethodConfigError(f"adapter: unknown activation: choose one of {', '.join(ACTIVATIONS)}")

    @classmethod
    def check_shape(cls, read_features, out_features, config):
        bottleneck(read_features, config.dim, config.reduction, "adapter")
