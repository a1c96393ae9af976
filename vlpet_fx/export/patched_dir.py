"""The patched-model / adapters directory, and ``load`` that re-applies it to a base model.

    vlpet.json         manifest: base model reference and fingerprint, rule set (its YAML text), method
                       configs, the resolved plan, library versions, the weights file's sha256
    pet.safetensors    the trainable weights (PET modules + existing parameters the rules made trainable)

``vlpet-fx patch --out`` and ``vlpet-fx export --format adapters`` both write it. The base model is referenced
(built-in name + size + seed, a local directory, or module:factory) and fingerprinted, never copied. Nothing is
unpickled: JSON and safetensors only; a damaged or edited file is refused with a one-line error.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ExportError
from .atomic import atomic_dir
from .fingerprint import describe_mismatch, fingerprint

MANIFEST = "vlpet.json"
WEIGHTS = "pet.safetensors"
FORMAT = "vlpet-fx/adapters@1"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    seen: set[int] = set()
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[name] = p.detach().to("cpu").contiguous()
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def patch_state(model: nn.Module):
    state = getattr(model, "vlpet_patch", None)
    if state is None:
        raise ExportError("this model is not patched: run vlpet_fx.patch(model, rules) first")
    return state


def save_patched(model: nn.Module, out: str | Path, base: dict, *, fingerprint_of: dict | None = None) -> Path:
    """Write a patched model's trainable weights + manifest to ``out`` (atomically).

    ``fingerprint_of`` carries an existing fingerprint forward (re-export without recomputing it)."""
    import transformers

    import vlpet_fx

    state = patch_state(model)
    plan = state.plan
    weights = trainable_state(model)
    manifest = {
        "format": FORMAT,
        "base": base,
        "fingerprint": fingerprint_of or fingerprint(model, set(weights)),
        "rules": {"name": plan.rules.name, "source": plan.rules.source, "text": plan.rules.text},
        "methods": plan.rules.to_dict()["methods"],
        "plan": plan.to_full_dict(),
        "versions": {"vlpet_fx": vlpet_fx.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }
    with atomic_dir(out) as tmp:
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        manifest["weights_sha256"] = _sha256(tmp / WEIGHTS)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return Path(out)


def read_manifest(src: str | Path) -> dict:
    src = Path(src)
    f = src / MANIFEST
    if not f.is_file():
        raise ExportError(f"'{src}' is not a vlpet-fx directory (no {MANIFEST}): give a directory written by "
                          "`vlpet-fx patch --out` or `vlpet-fx export --format adapters`")
    try:
        manifest = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read '{f}': {exc}; the file is damaged, write it again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise ExportError(f"'{f}' has format {got!r}, expected {FORMAT!r}")
    return manifest


def read_weights(src: str | Path, manifest: dict) -> dict[str, torch.Tensor]:
    path = Path(src) / WEIGHTS
    if not path.is_file():
        raise ExportError(f"'{path}' is missing: the directory is incomplete, write it again")
    if manifest.get("weights_sha256") != _sha256(path):
        raise ExportError(f"'{path}' does not match the checksum in {MANIFEST}: the file was changed or truncated")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ExportError(f"cannot read '{path}': {exc}; the file is damaged, write it again") from None


def load_base(manifest: dict, device: str | None = None) -> nn.Module:
    from ..zoo import load_model

    b = manifest["base"]
    if b.get("kind") == "vl":
        from ..vl import build_vl

        if b.get("init_from"):  # the backbone is the trained model of an earlier run
            backbone = load(b["init_from"] + "/model", device=device)
            del backbone.vlpet_patch
            return backbone
        return build_vl(b["text"], b["size"], visual=b["visual"], visual_size=b["visual_size"],
                        vocab_size=b["vocab_size"], tokens_per_image=b.get("tokens_per_image"),
                        seed=b.get("seed", 0)).to(device or "cpu")
    model, _ = load_model(b["spec"], b.get("size", "tiny"), weights=True, device=device, seed=b.get("seed", 0))
    return model


def load(base_model: "nn.Module | str | Path", src: str | Path | None = None, *, force: bool = False,
         device: str | None = None) -> nn.Module:
    """Re-apply a saved plan and its weights: ``load(base_model, dir)``, or ``load(dir)`` to rebuild the base
    model from the manifest's reference. The base model's fingerprint must match the saved one (config and
    frozen weights) unless ``force=True``. Returns the patched model."""
    from ..api import patch
    from ..rules import parse_rules

    if src is None:
        src, base_model = base_model, None
    manifest = read_manifest(src)
    weights = read_weights(src, manifest)
    if base_model is None:
        base_model = load_base(manifest, device)
    rules = parse_rules(manifest["rules"]["text"], manifest["rules"]["source"])
    model = patch(base_model, rules)
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    if not force:
        problem = describe_mismatch(manifest.get("fingerprint", {}), fingerprint(model, trainable))
        if problem:
            raise ExportError(f"refusing to load '{src}': {problem}; pass force=True (--force) if you know better")
    missing = sorted(trainable - set(weights))
    unknown = sorted(set(weights) - set(named))
    if missing or unknown:
        raise ExportError(f"'{Path(src) / WEIGHTS}' does not fit the patched model: "
                          f"{'missing ' + missing[0] if missing else 'unexpected ' + unknown[0]}")
    with torch.no_grad():
        for name, t in weights.items():
            if named[name].shape != t.shape:
                raise ExportError(f"'{name}' has shape {tuple(t.shape)} in {WEIGHTS}, the model expects "
                                  f"{tuple(named[name].shape)}")
            named[name].copy_(t)
    return model
