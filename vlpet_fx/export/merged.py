"""``merged``: fold linear re-parameterisations (LoRA) into the base weights; a plain model, no PET modules."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_model
from torch import nn

from ..analysis.sites import slice_channels
from ..errors import ExportError
from ..modules.base import get_method
from ..planner.plan import Placement
from .atomic import atomic_dir
from .patched_dir import patch_state


def unmergeable(model: nn.Module) -> list[str]:
    """One line per placement that cannot be folded into a weight."""
    out = []
    for p in patch_state(model).plan.placements:
        cls = get_method(p.method).module
        if cls.inserts_module and not cls.mergeable:
            out.append(f"{p.method} on {p.site}")
    return out


def detach_pets(model: nn.Module) -> list[tuple[Placement, nn.Module]]:
    """Remove the PET modules and their hooks from a patched model; return them with their placements."""
    state = patch_state(model)
    out = [(p, model.get_submodule(prefix)) for prefix, p in state.attached.items()]
    for h in state.handles:
        h.remove()
    for prefix in state.attached:
        owner_path, _, name = prefix.rpartition(".")
        delattr(model.get_submodule(owner_path) if owner_path else model, name)
    del model.vlpet_patch
    return out


def merge(model: nn.Module) -> nn.Module:
    """Fold every PET module into its site's linear weight, remove the modules and hooks; returns ``model``."""
    bad = unmergeable(model)
    if bad:
        methods = sorted({b.split(" on ")[0] for b in bad})
        raise ExportError(
            f"cannot merge {len(bad)} module(s) ({', '.join(methods)}; first: {bad[0]}): they are not a linear "
            "change of one weight (VL-PET's gate multiplies by an input-dependent G, adapters apply a "
            "non-linearity); export them with --format adapters or pt2"
        )
    for p in patch_state(model).plan.placements:
        target = model.get_submodule(p.site.path)
        if get_method(p.method).module.inserts_module and not isinstance(target, nn.Linear):
            raise ExportError(f"cannot merge into {p.site.path}: it is a {type(target).__name__}, not nn.Linear")
    with torch.no_grad():
        for p, pet in detach_pets(model):
            target = model.get_submodule(p.site.path)
            delta = pet.delta_weight().to(target.weight.dtype)
            if p.site.out_slice:  # a slice of a packed projection: only its rows of the weight change
                rows = torch.tensor(slice_channels(p.site.out_slice), device=target.weight.device)
                target.weight.index_add_(0, rows, delta)
            else:
                target.weight.add_(delta)
    return model


BASE_FILE = "vlpet-merged.json"


def write_merged(model: nn.Module, manifest: dict, out: str | Path) -> None:
    merge(model)
    with atomic_dir(out) as tmp:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp)
        else:  # not a Hugging Face model (e.g. a VL model): its weights (tied ones once) + the base reference
            save_model(model, str(tmp / "model.safetensors"))
            (tmp / BASE_FILE).write_text(json.dumps({"format": "vlpet-fx/merged@1", "base": manifest["base"]},
                                                    indent=1))


def load_merged(src: str | Path, device: str | None = None) -> nn.Module:
    """Read back a ``merged`` export of a model that is not a Hugging Face one: the architecture is rebuilt from
    the base reference in ``vlpet-merged.json``, the weights come from ``model.safetensors``."""
    from safetensors.torch import load_model

    from .patched_dir import load_base

    src = Path(src)
    try:
        doc = json.loads((src / BASE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"'{src}' is not a merged export of a non-Hugging-Face model ({BASE_FILE}: {exc}); "
                          "a Hugging Face one loads with from_pretrained") from None
    if not isinstance(doc, dict) or doc.get("format") != "vlpet-fx/merged@1" or not isinstance(doc.get("base"), dict):
        raise ExportError(f"'{src / BASE_FILE}' is not a vlpet-fx merged manifest")
    model = load_base({"base": doc["base"]}, device)
    try:
        missing, unexpected = load_model(model, str(src / "model.safetensors"), strict=False)
    except Exception as exc:  # safetensors' own error types for a damaged file
        raise ExportError(f"cannot read '{src / 'model.safetensors'}': {exc}") from None
    if missing or unexpected:
        raise ExportError(f"'{src / 'model.safetensors'}' does not fit the base model: "
                          f"{'missing ' + sorted(missing)[0] if missing else 'unexpected ' + sorted(unexpected)[0]}")
    return model
