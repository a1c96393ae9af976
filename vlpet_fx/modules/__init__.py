"""PET methods: a registry of modules, one file per method (``@register_pet``)."""

from . import adapter, full, lora, vlpet  # noqa: F401  (registration)
from .base import (MethodConfig, MethodConfigError, PetModule, get_method, list_methods, make_config,
                   register_pet)

__all__ = ["MethodConfig", "MethodConfigError", "PetModule", "get_method", "list_methods", "make_config",
           "register_pet"]
