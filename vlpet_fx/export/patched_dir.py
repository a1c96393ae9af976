"""The patched-model / adapters directory, and ``load`` that re-applies it to a base model.

    vlpet.json         manifest: base model reference and fingerprint, rule set (its YAML text), method
                       configs, the resolved plan, library versions, the weights file's sha256
    pet.safetensors    the trainable weights (PET modules + existing parameters the rules made trainable)

``vlpet-fx patch --out`` and ``vlpet-fx export --format adapters`` both write it. The base model is referenced
(built-in name + size + seed, a local directory, or module:factory) and fingerprinted, never copied. Nothing is
unpickled: JSON and safetensors only; the manifest is checked by a strict schema (manifest.py) and a damaged or
edited file is refused with a one-line error. Nothing a manifest names is imported or called unless the caller
opts in (``trust_code=True``); see docs/SECURITY.md.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ExportError
from ..io import sha256_file
from .atomic import atomic_dir
from .fingerprint import describe_mismatch, fingerprint
from .manifest import (FORMAT, MANIFEST, MAX_INIT_FROM_DEPTH, BuiltinBase, DirectoryBase, FactoryBase, Manifest,
                       check_written, sha256_text, validate_manifest)

WEIGHTS = "pet.safetensors"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    seen: set[int] = set()
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[name] = p.detach().to("cpu").contiguous()
    return out


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
        "rules": {"name": plan.rules.name, "source": plan.rules.source, "text": plan.rules.text,
                  "sha256": sha256_text(plan.rules.text)},
        "methods": plan.rules.to_dict()["methods"],
        "plan": plan.to_full_dict(),
        "versions": {"vlpet_fx": vlpet_fx.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }
    with atomic_dir(out) as tmp:
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        manifest["weights_sha256"] = sha256_file(tmp / WEIGHTS)
        try:
            text = json.dumps(manifest, indent=1, allow_nan=False)
        except ValueError:
            raise ExportError(f"cannot write {MANIFEST}: a method setting or plan value is NaN or infinite") from None
        check_written(json.loads(text))  # what we write is exactly what `load` accepts
        (tmp / MANIFEST).write_text(text)
    return Path(out)


def read_manifest(src: str | Path) -> dict:
    """``src/vlpet.json``, validated by the strict schema (:mod:`vlpet_fx.export.manifest`), as a dict."""
    return validate_manifest(src).model_dump(mode="json")


def read_weights(src: str | Path, manifest: "dict | Manifest") -> dict[str, torch.Tensor]:
    path = Path(src) / WEIGHTS
    expected = manifest.weights_sha256 if isinstance(manifest, Manifest) else manifest.get("weights_sha256")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ExportError(f"'{path}' is missing: the directory is incomplete, write it again") from None
    except OSError as exc:
        raise ExportError(f"cannot read '{path}': {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise ExportError(f"'{path}' is {kind}: the weights must be a safetensors file; write the directory again")
    try:
        digest = sha256_file(path)
    except OSError as exc:
        raise ExportError(f"cannot read '{path}': {exc.strerror or exc}") from None
    if expected != digest:
        raise ExportError(f"'{path}' does not match the checksum in {MANIFEST}: the file was changed or truncated")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ExportError(f"cannot read '{path}': {exc}; the file is damaged, write it again") from None


def _refuse_factory(f: Path, what: str, spec: str) -> ExportError:
    return ExportError(
        f"'{f}' names {what} '{spec}': vlpet-fx never imports code named in a file it reads; pass the base model "
        "yourself (vlpet_fx.load(model, dir)), or, if you trust this directory, opt in with trust_code=True "
        "(--trust-factory on the command line)")


def load_base(manifest: "dict | Manifest", device: str | None = None, *, trust_code: bool = False,
              where: Path | None = None, _chain: tuple[Path, ...] = ()) -> nn.Module:
    """Rebuild the base model a manifest refers to. A ``factory`` base (or a ``vl`` base whose text model is a
    ``module:factory``) is imported and called only with ``trust_code=True``."""
    from ..zoo import list_models, load_model
    from ..zoo.resolve import load_factory

    if isinstance(manifest, Manifest):
        b = manifest.base
    else:  # a whole manifest, or just its base reference ({"base": ...}, as a merged export keeps it)
        from pydantic import TypeAdapter

        from .manifest import Base

        try:
            if isinstance(manifest, dict) and set(manifest) == {"base"}:
                b = TypeAdapter(Base).validate_python(manifest["base"])
            else:
                b = Manifest.model_validate(manifest).base
        except Exception as exc:
            raise ExportError(f"invalid manifest: {str(exc).splitlines()[0]}") from None
    f = (where or Path("<manifest>")) / MANIFEST
    builtins = set(m.name for m in list_models())
    if isinstance(b, BuiltinBase):
        if b.spec not in builtins:
            raise ExportError(f"'{f}': base.spec '{b.spec}' is not a built-in model ({', '.join(sorted(builtins))}); "
                              "pass the base model yourself: vlpet_fx.load(model, dir)")
        model, _ = load_model(b.spec, b.size, weights=True, device=device, seed=b.seed, allow_factory=False)
        return model
    if isinstance(b, DirectoryBase):
        if not Path(b.spec).is_dir():
            raise ExportError(f"'{f}': the base model directory '{b.spec}' does not exist (any more): pass the base "
                              "model yourself: vlpet_fx.load(model, dir)")
        model, _ = load_model(b.spec, weights=True, device=device, allow_factory=False)
        return model
    if isinstance(b, FactoryBase):
        if not trust_code:
            raise _refuse_factory(f, "a factory base", b.spec)
        model = load_factory(b.spec)
        return model.to(device) if device else model
    # a VL model: image encoder + text encoder-decoder
    from ..vl import build_vl, list_image_encoders

    if b.init_from:  # the backbone is the trained model of an earlier run
        run = Path(b.init_from)
        if not (run / "model").is_dir():
            raise ExportError(f"'{f}': base.init_from '{b.init_from}' is not a training run directory (no model/): "
                              "the run it was trained from is gone; write the directory again")
        backbone = load(run / "model", device=device, trust_code=trust_code, _chain=_chain)
        del backbone.vlpet_patch
        return backbone
    if b.visual not in list_image_encoders():
        raise ExportError(f"'{f}': base.visual '{b.visual}' is not a known image encoder "
                          f"({', '.join(list_image_encoders())}); write the directory again")
    text_is_factory = b.text not in builtins and not Path(b.text).is_dir()
    if text_is_factory:
        if ":" not in b.text:
            raise ExportError(f"'{f}': base.text '{b.text}' is neither a built-in model nor an existing directory; "
                              "pass the base model yourself: vlpet_fx.load(model, dir)")
        if not trust_code:
            raise _refuse_factory(f, "a text-model factory", b.text)
    if b.tokenizer == "checkpoint":  # trained with the text directory's own tokenizer: rebuilt the same way
        from ..data.tokenizer import checkpoint_tokenizer

        if not Path(b.text).is_dir():
            raise ExportError(f"'{f}': the text checkpoint directory '{b.text}' does not exist (any more): pass the "
                              "base model yourself: vlpet_fx.load(model, dir)")
        model = build_vl(b.text, b.size, visual=b.visual, visual_size=b.visual_size,
                         tokenizer=checkpoint_tokenizer(b.text), tokens_per_image=b.tokens_per_image, seed=b.seed,
                         allow_factory=False)
        rows = model.text.get_input_embeddings().num_embeddings
        if rows != b.vocab_size:
            raise ExportError(f"'{f}': the text checkpoint '{b.text}' now has {rows} token embeddings, the run was "
                              f"trained with {b.vocab_size}: it was changed since; pass the base model yourself")
        return model.to(device or "cpu")
    return build_vl(b.text, b.size, visual=b.visual, visual_size=b.visual_size, vocab_size=b.vocab_size,
                    tokens_per_image=b.tokens_per_image, seed=b.seed, allow_factory=trust_code).to(device or "cpu")


def load(base_model: "nn.Module | str | Path", src: str | Path | None = None, *, force: bool = False,
         device: str | None = None, trust_code: bool = False, _chain: tuple[Path, ...] = ()) -> nn.Module:
    """Re-apply a saved plan and its weights: ``load(base_model, dir)``, or ``load(dir)`` to rebuild the base
    model from the manifest's reference. The base model's fingerprint must match the saved one (config and
    frozen weights) unless ``force=True``. Returns the patched model.

    Nothing the directory names is imported or called: a ``module:factory`` base needs the model passed in
    (``load(model, dir)``) or ``trust_code=True`` (see docs/SECURITY.md)."""
    from ..api import patch
    from ..rules import parse_rules

    if src is None:
        src, base_model = base_model, None
    if not isinstance(src, (str, os.PathLike)):
        raise ExportError(f"give the directory to load as a path, not a {type(src).__name__}")
    here = Path(src).resolve()
    if here in _chain:
        raise ExportError(f"'{Path(src) / MANIFEST}': base.init_from leads back to '{here}' (a cycle of "
                          f"{len(_chain)} run(s)): a run cannot be initialised from itself; write the directory again")
    if len(_chain) >= MAX_INIT_FROM_DEPTH:
        raise ExportError(f"'{Path(src) / MANIFEST}': base.init_from chains more than {MAX_INIT_FROM_DEPTH} runs "
                          "deep: train from a run nearer the original base model")
    manifest = validate_manifest(src)
    weights = read_weights(src, manifest)
    if base_model is None:
        base_model = load_base(manifest, device, trust_code=trust_code, where=Path(src), _chain=(*_chain, here))
    elif not isinstance(base_model, nn.Module):
        raise ExportError(f"the base model must be a torch.nn.Module, not {type(base_model).__name__}")
    rules = parse_rules(manifest.rules.text, manifest.rules.source)
    model = patch(base_model, rules)
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    if not force:
        problem = describe_mismatch(manifest.fingerprint.model_dump(), model, trainable)
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
