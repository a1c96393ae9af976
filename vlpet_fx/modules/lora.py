"""LoRA (Hu et al. 2021): y + (alpha / rank) * B A dropout(x), placed in parallel to a linear site.

B starts at zero, so the patched model equals the base model at init. ``merge_into(weight)`` folds B A into
the base weight (used by the merged export).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from .base import (MethodConfig, MethodConfigError, PetModule, RelativeWidth, Width, check_positive, register_pet,
                   resolve_width)


@dataclass
class LoraConfig(MethodConfig):
    rank: Width = 8  # absolute, or relative to min(in, out) of the site
    alpha: float = 16.0
    dropout: float = 0.0


@register_pet("lora")
class Lora(PetModule):
    config_class = LoraConfig
    placements = ("parallel",)
    mergeable = True

    def __init__(self, in_features, out_features, config: LoraConfig, placement="parallel"):
        super().__init__(in_features, out_features, config, placement)
        config = self.config  # rank resolved for this site
        self.lora_A = nn.Linear(in_features, config.rank, bias=False)
        self.lora_B = nn.Linear(config.rank, out_features, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        self.scaling = config.alpha / config.rank
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta(self, x):
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The (out, in) matrix this module adds to the base linear weight."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @classmethod
    def resolve(cls, in_features, out_features, placement, config: LoraConfig) -> LoraConfig:
        if not isinstance(config.rank, RelativeWidth):
            return config  # an absolute rank is bounded by check_shape
        read = out_features if placement == "after" else in_features
        return dataclasses.replace(config, rank=resolve_width(config.rank, min(read, out_features), "lora: rank"))

    @classmethod
    def check_config(cls, config: LoraConfig):
        check_positive("lora", rank=config.rank)
        if not 0.0 <= config.dropout < 1.0:
            raise MethodConfigError(f"method 'lora' parameter 'dropout': must be in [0, 1), got {config.dropout}")

    @classmethod
    def check_shape(cls, read_features, out_features, config):
        rank = config.rank
        if isinstance(rank, RelativeWidth):
            rank = resolve_width(rank, min(read_features, out_features), "lora: rank")
        if rank < 1:
            raise MethodConfigError(f"lora: rank must be >= 1, got {rank}")
        if rank > min(read_features, out_features):
            raise MethodConfigError(
                f"lora: rank {rank} exceeds the site's shape {read_features}->{out_features}; lower `rank`"
            )
