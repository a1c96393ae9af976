"""Back ends that write patched models to disk and read them back."""

from .patched_dir import load, read_manifest, save_patched, trainable_state

__all__ = ["load", "read_manifest", "save_patched", "trainable_state"]
