"""Checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint holds only what trains (the trainable parameters), the optimizer and scheduler state and the RNG
state, so a killed run resumes to the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import VlpetError
from ..export.atomic import atomic_dir

_STEP = re.compile(r"^step-(\d+)$")


def _split(obj, prefix: str, tensors: dict):
    """Nested state → JSON-able structure, with tensors moved to ``tensors`` under path keys."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_split(k, f"{prefix}.k{i}", tensors), _split(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    return obj


def _join(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_join(k, tensors): _join(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            items = [_join(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
    return obj


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer, scheduler, keep: int = 2) -> Path:
    ckpts = run_dir / "checkpoints"
    tensors: dict[str, torch.Tensor] = {}
    weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    doc = {
        "step": step,
        "optimizer": _split(optimizer.state_dict(), "opt", tensors),
        "scheduler": scheduler.state_dict(),
    }
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    target = ckpts / f"step-{step}"
    if target.exists():
        shutil.rmtree(target)
    with atomic_dir(target) as tmp:
        save_file(weights, str(tmp / "trainable.safetensors"))
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(doc))
    for old in sorted(_steps(ckpts))[:-keep]:
        shutil.rmtree(ckpts / f"step-{old}", ignore_errors=True)
    return target


def _steps(ckpts: Path) -> list[int]:
    if not ckpts.is_dir():
        return []
    return [int(m.group(1)) for p in ckpts.iterdir() if (m := _STEP.match(p.name)) and (p / "state.json").is_file()]


def latest_checkpoint(run_dir: Path) -> Path | None:
    steps = _steps(run_dir / "checkpoints")
    return run_dir / "checkpoints" / f"step-{max(steps)}" if steps else None


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler) -> int:
    try:
        weights = load_file(str(path / "trainable.safetensors"))
        tensors = load_file(str(path / "state.safetensors"))
        doc = json.loads((path / "state.json").read_text())
    except Exception as exc:
        raise VlpetError(f"cannot read checkpoint '{path}': {exc}; delete it to resume from the one before") from None
    named = dict(model.named_parameters())
    missing = [n for n, p in named.items() if p.requires_grad and n not in weights]
    if missing:
        raise VlpetError(f"checkpoint '{path}' does not fit this model (no '{missing[0]}'): was the run's "
                         "configuration changed?")
    with torch.no_grad():
        for n, t in weights.items():
            named[n].copy_(t)
    optimizer.load_state_dict(_join(doc["optimizer"], tensors))
    scheduler.load_state_dict(doc["scheduler"])
    torch.set_rng_state(tensors["rng.cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if states:
            torch.cuda.set_rng_state_all(states)
    return int(doc["step"])
