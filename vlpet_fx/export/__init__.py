"""Back ends that write patched models to disk (adapters, merged, pt2, peft) and read them back."""

from .formats import export, list_formats, register_format
from .merged import merge
from .patched_dir import load, read_manifest, save_patched, trainable_state
from .pt2 import load_pt2

__all__ = ["export", "list_formats", "register_format", "merge", "load", "read_manifest", "save_patched",
           "trainable_state", "load_pt2"]
