"""Built-in models and model specifications (name, local directory, ``module:factory``)."""

from . import hf, torch_models, vl_models  # noqa: F401  (registers the built-ins)
from .registry import SIZES, build_model, list_models, register_model
from .resolve import base_reference, load_model

__all__ = ["SIZES", "build_model", "list_models", "register_model", "load_model", "base_reference"]
