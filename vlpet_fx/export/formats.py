"""Export formats: a small registry ``name -> writer(patched model, manifest, out dir)``."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from torch import nn

from ..errors import ExportError
from .atomic import check_out_dir
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
    """Write the patched model in ``src`` (from ``patch --out`` or ``train``) as ``fmt`` into ``out``.

    ``trust_code=True`` lets a ``module:factory`` base named in ``src``'s manifest be imported and called."""
    if fmt not in _FORMATS:
        raise ExportError(f"unknown export format '{fmt}': choose one of {', '.join(list_formats())}")
    check_out_dir(out)
    manifest = read_manifest(src)
    model = load(src, force=force, trust_code=trust_code)
    _FORMATS[fmt](model, manifest, Path(out))
    return Path(out)
