"""Offline data for vision-and-language PET experiments: real image sources (Fashion-MNIST, MNIST,
scikit-learn digits), templated VQA/GQA/NLVR/caption tasks built from their labels, users' JSONL data
and a small word-level tokenizer."""

from .errors import DataError
from .images import ImageSet, list_sources, load_source, register_source, split_indices
from .jsonl import load_jsonl
from .tasks import Example, build_task, list_tasks, register_task, text_only, tile
from .tokenizer import build_tokenizer

__all__ = [
    "DataError", "ImageSet", "list_sources", "load_source", "register_source", "split_indices", "load_jsonl",
    "Example", "build_task", "list_tasks", "register_task", "text_only", "tile", "build_tokenizer",
]
