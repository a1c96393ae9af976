"""The directory `vlpet-fx patch --out` writes, and `load` reads back.

    vlpet.json         manifest: base model reference, rule set (its YAML text), the resolved plan, versions
    pet.safetensors    the trainable weights (PET modules + existing parameters the rules made trainable)

The base model is referenced (a built-in name + size + seed, a local directory, or module:factory), never
copied. Everything is written into a temporary sibling directory and renamed into place at the end, so an
interrupted write leaves nothing half-written. Nothing is unpickled: JSON and safetensors only.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ExportError

MANIFEST = "vlpet.json"
WEIGHTS = "pet.safetensors"
FORMAT = "vlpet-fx/patched@1"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    seen: set[int] = set()
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[name] = p.detach().to("cpu").contiguous()
    return out


def check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"output directory '{out}' exists and is not empty: choose a new directory or empty it")


def save_patched(model: nn.Module, out: str | Path, base: dict) -> Path:
    """Write a patched model's trainable weights + manifest to ``out`` (atomically)."""
    import transformers

    import vlpet_fx

    out = Path(out)
    check_out_dir(out)
    state = getattr(model, "vlpet_patch", None)
    if state is None:
        raise ExportError("this model is not patched: run vlpet_fx.patch(model, rules) first")
    plan = state.plan
    manifest = {
        "format": FORMAT,
        "base": base,
        "rules": {"name": plan.rules.name, "source": plan.rules.source, "text": plan.rules.text},
        "plan": plan.to_full_dict(),
        "versions": {"vlpet_fx": vlpet_fx.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(trainable_state(model), str(tmp / WEIGHTS), metadata={"format": FORMAT})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(src: str | Path) -> dict:
    src = Path(src)
    f = src / MANIFEST
    if not f.is_file():
        raise ExportError(f"'{src}' is not a patched-model directory (no {MANIFEST}): give a directory written by "
                          "`vlpet-fx patch --out` or `vlpet-fx train`")
    try:
        manifest = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read '{f}': {exc}; the file is damaged, write it again") from None
    if manifest.get("format") != FORMAT:
        raise ExportError(f"'{f}' has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def load(src: str | Path, base_model: nn.Module | None = None, *, device: str | None = None) -> nn.Module:
    """Rebuild a patched model from a directory: the base model (given, or from the manifest's reference),
    the rule set re-applied, and the saved trainable weights loaded. Returns the patched model."""
    from ..api import patch
    from ..rules import parse_rules
    from ..zoo import load_model

    src = Path(src)
    manifest = read_manifest(src)
    if base_model is None:
        b = manifest["base"]
        base_model, _ = load_model(b["spec"], b.get("size", "tiny"), weights=True, device=device, seed=b.get("seed", 0))
    rules = parse_rules(manifest["rules"]["text"], manifest["rules"]["source"])
    model = patch(base_model, rules)
    try:
        weights = load_file(str(src / WEIGHTS))
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
        raise ExportError(f"cannot read '{src / WEIGHTS}': {exc}; the file is damaged, write it again") from None
    named = dict(model.named_parameters())
    missing = sorted(set(n for n, p in named.items() if p.requires_grad) - set(weights))
    unknown = sorted(set(weights) - set(named))
    if missing or unknown:
        raise ExportError(f"'{src / WEIGHTS}' does not fit the patched model: "
                          f"{'missing ' + missing[0] if missing else 'unexpected ' + unknown[0]}")
    with torch.no_grad():
        for name, t in weights.items():
            if named[name].shape != t.shape:
                raise ExportError(f"'{name}' has shape {tuple(t.shape)} in {WEIGHTS}, the model expects "
                                  f"{tuple(named[name].shape)}")
            named[name].copy_(t)
    return model
