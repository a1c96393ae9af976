"""Vision-and-language models: image encoder → visual projector → text encoder-decoder."""

from .build import build_vl, list_image_encoders, register_image_encoder
from .cache import FeatureCache
from .model import VLModel, to_pixels

__all__ = ["build_vl", "list_image_encoders", "register_image_encoder", "FeatureCache", "VLModel", "to_pixels"]
