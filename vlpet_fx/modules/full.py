"""``none``: no module is inserted; the site's own module becomes trainable (full fine-tuning of it)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import MethodConfig, PetModule, register_pet


@dataclass
class NoneConfig(MethodConfig):
    pass


@register_pet("none")
class FullFinetune(PetModule):
    config_class = NoneConfig
    inserts_module = False
