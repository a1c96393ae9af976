"""Export formats: a small registry ``name -> writer(patched model, manifest, out dir)``."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Callable

from torch import nn

from ..errors import ExportError
from .atomic import atomic_dir, check_out_dir
from .merged import write_merged
from .patched_dir import load, read_manifest, save_patched
from .peft_format import write_peft
from .pt2 import write_pt2

Writer = Callable[[nn.Module, dict, Path], None]
_FORMATS: dict[str, Writer] = {}


def register_format(name: str) -> Callable[[Writer], Writer]:
    def deco(fn: Writer) -> Writer:
        _FORMATS[name] = fn
        return fn

    return deco


def list_formats() -> list[str]:
    return sorted(_FORMATS)


@register_format("adapters")
def _write_adapters(model: nn.Module, manifest: dict, out: Path) -> None:
    save_patched(model, out, manifest["base"], fingerprint_of=manifest["fingerprint"])


register_format("merged")(write_merged)
register_format("pt2")(write_pt2)
register_format("peft")(write_peft)


def export(src: str | Path, fmt: str, out: str | Path, *, force: bool = False, trust_code: bool = False) -> Path:
    """Write the patched model in ``src`` (a ``patch --out`` directory, or a ``train`` run: its ``model/``) as
    ``fmt`` into ``out``. The tokenizer next to ``src`` (a run's ``tokenizer/``) is copied into ``out/tokenizer``,
    so ``vlpet-fx predict OUT`` works from any export. All of it is written at once.

    ``trust_code=True`` lets a ``module:factory`` base named in ``src``'s manifest be imported and called."""
    from ..infer.loading import model_dir_of, tokenizer_dir_of

    if fmt not in _FORMATS:
        raise ExportError(f"unknown export format '{fmt}': choose one of {', '.join(list_formats())}")
    check_out_dir(out)
    model_dir = model_dir_of(src)
    manifest = read_manifest(model_dir)
    # the warnings of loading (re-capturing the base model) are shown once the export worked: when it fails, its
    # one-line error says why (a pt2 export that fails on a module capture kept opaque names that module)
    with warnings.catch_warnings(record=True) as held:
        model = load(model_dir, force=force, trust_code=trust_code)
        tok = tokenizer_dir_of(src)
        with atomic_dir(out) as tmp:
            payload = tmp / "payload"
            _FORMATS[fmt](model, manifest, payload)
            for p in payload.iterdir():
                os.replace(p, tmp / p.name)
            payload.rmdir()
            if tok is not None and not (tmp / "tokenizer").exists():
                shutil.copytree(tok, tmp / "tokenizer")
    for w in held:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return Path(out)
