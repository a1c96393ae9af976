"""Checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint holds only what trains (the trainable parameters), the optimizer and scheduler state and the RNG
state, so a killed run resumes to the same weights as an uninterrupted one.

Reading trusts nothing: every file is checked (kind, size), the JSON document against the structure of the
optimizer and scheduler it is loaded into, every tensor against the parameter it belongs to (name, shape,
finiteness; no missing or extra tensor). A damaged checkpoint is a :class:`CheckpointError` (one line), and
nothing of the model, optimizer or scheduler is changed before the whole checkpoint has been checked.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..export.atomic import atomic_dir
from .config import TrainError

_STEP = re.compile(r"^step-(\d{1,12})$")
FILES = ("trainable.safetensors", "state.safetensors", "state.json")
MAX_STATE_JSON = 64 * 2**20
# hidden names of the temporary files and directories atomic writes make in a run directory
_TEMPORARIES = (".run.json.", ".metrics.jsonl.", ".predictions.jsonl.", ".report.json.", ".model.", ".probe-",
                ".checkpoints.")


class CheckpointError(TrainError):
    """A checkpoint is damaged or does not fit the model being trained."""


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
    """Inverse of :func:`_split`; raises ``ValueError`` on any structure :func:`_split` does not write."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            if obj["__tensor__"] not in tensors:
                raise ValueError(f"tensor {str(obj['__tensor__'])[:80]!r} is missing")
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__dict__"} and isinstance(obj["__dict__"], list):
            out = {}
            for pair in obj["__dict__"]:
                if not isinstance(pair, list) or len(pair) != 2:
                    raise ValueError("a dict entry is not a [key, value] pair")
                key = _join(pair[0], tensors)
                if not isinstance(key, (str, int, float, bool)) and key is not None:
                    raise ValueError("a dict key is not a plain value")
                out[key] = _join(pair[1], tensors)
            return out
        if set(obj) == {"__list__", "tuple"} and isinstance(obj["__list__"], list):
            items = [_join(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj["tuple"] is True else items
        raise ValueError("unexpected object in the optimizer state")
    if isinstance(obj, list):
        raise ValueError("unexpected list in the optimizer state")
    return obj


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer, scheduler, keep: int = 2, *,
                    weights: dict[str, torch.Tensor] | None = None, optimizer_state: dict | None = None) -> Path:
    """Write checkpoint ``step``. ``weights`` / ``optimizer_state``: the trainable parameters by name and the
    optimizer's state dict as whole tensors, when the model's are sharded (:func:`vlpet_fx.train.sharded.
    gather_state`); by default they are read from ``model`` and ``optimizer``."""
    ckpts = run_dir / "checkpoints"
    tensors: dict[str, torch.Tensor] = {}
    if weights is None:
        weights = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    weights = {n: t.contiguous() for n, t in weights.items()}
    doc = {
        "step": step,
        "optimizer": _split(optimizer.state_dict() if optimizer_state is None else optimizer_state, "opt", tensors),
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
    for old in sorted(complete_steps(run_dir))[:-keep]:
        shutil.rmtree(ckpts / f"step-{old}", ignore_errors=True)
    return target


def complete_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints in ``run_dir/checkpoints`` that hold all their files, ascending."""
    ckpts = run_dir / "checkpoints"
    if not ckpts.is_dir():
        return []
    out = []
    for p in ckpts.iterdir():
        m = _STEP.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and all((p / f).is_file() for f in FILES):
            out.append(int(m.group(1)))
    return sorted(out)


def latest_checkpoint(run_dir: Path) -> Path | None:
    steps = complete_steps(run_dir)
    return run_dir / "checkpoints" / f"step-{steps[-1]}" if steps else None


def remove_partial_checkpoints(run_dir: Path) -> list[str]:
    """Remove what a killed writer left: hidden temporaries of atomic writes in the run directory and in
    ``checkpoints/``, and ``step-N`` directories that miss a file. Returns the names removed."""
    ckpts = run_dir / "checkpoints"
    removed = []
    if run_dir.is_dir():  # temporaries of atomic writes in the run directory itself
        for p in sorted(run_dir.iterdir()):
            if p.name.startswith(_TEMPORARIES):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p.name)
    if not ckpts.is_dir():
        return removed
    for p in sorted(ckpts.iterdir()):
        partial = p.name.startswith(".step-") or (
            _STEP.match(p.name) is not None and p.is_dir() and not all((p / f).is_file() for f in FILES))
        if partial:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


# --------------------------------------------------------------------------------------------------- loading
def _same_structure(saved, current, where: str) -> None:
    """``saved`` has the keys, lengths and value kinds of ``current`` (tensors: checked by the caller)."""
    if isinstance(current, dict):
        if not isinstance(saved, dict) or set(saved) != set(current):
            raise ValueError(f"{where} has other keys than this run's")
        for k in current:
            _same_structure(saved[k], current[k], f"{where}.{k}")
    elif isinstance(current, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(current):
            raise ValueError(f"{where} has another length than this run's")
        for i, (a, b) in enumerate(zip(saved, current)):
            _same_structure(a, b, f"{where}[{i}]")
    elif isinstance(current, torch.Tensor):
        if not isinstance(saved, torch.Tensor):
            raise ValueError(f"{where} is not a tensor")
    elif isinstance(current, bool) or current is None:
        if type(saved) is not type(current) and not (current is None and saved is None):
            raise ValueError(f"{where} is {saved!r}, expected {current!r}")
    elif isinstance(current, (int, float)):
        if isinstance(saved, bool) or not isinstance(saved, (int, float)) or not math.isfinite(saved):
            raise ValueError(f"{where} is {saved!r}, not a finite number")
    elif type(saved) is not type(current):
        raise ValueError(f"{where} is of type {type(saved).__name__}, expected {type(current).__name__}")


def _check_optimizer(saved, optimizer) -> None:
    current = optimizer.state_dict()
    if not isinstance(saved, dict) or set(saved) != {"state", "param_groups"}:
        raise ValueError("the optimizer state lacks 'state' or 'param_groups'")
    groups = saved["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(current["param_groups"]):
        raise ValueError("the optimizer has another number of parameter groups")
    for i, (g, c) in enumerate(zip(groups, current["param_groups"])):
        if not isinstance(g, dict) or set(g) != set(c) or g.get("params") != c["params"]:
            raise ValueError(f"optimizer parameter group {i} does not match this run's parameters")
        _same_structure({k: v for k, v in g.items() if k != "params"},
                        {k: v for k, v in c.items() if k != "params"}, f"param_groups[{i}]")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = saved["state"]
    if not isinstance(state, dict):
        raise ValueError("the optimizer 'state' is not a mapping")
    for key, entry in state.items():
        if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < len(params):
            raise ValueError(f"the optimizer state names parameter {key!r}, which this run does not have")
        if not isinstance(entry, dict):
            raise ValueError(f"the optimizer state of parameter {key} is not a mapping")
        for name, value in entry.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"optimizer state {key}.{name} is not a tensor")
            if value.dim() and value.shape != params[key].shape:
                raise ValueError(f"optimizer state {key}.{name} has shape {tuple(value.shape)}, the parameter "
                                 f"{tuple(params[key].shape)}")
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(f"optimizer state {key}.{name} holds non-finite values")


def _read(path: Path):
    for f in FILES:
        p = path / f
        if not p.is_file():
            raise ValueError(f"{f} is missing")
    if (path / "state.json").stat().st_size > MAX_STATE_JSON:
        raise ValueError("state.json is too large")
    weights = load_file(str(path / "trainable.safetensors"))
    tensors = load_file(str(path / "state.safetensors"))
    doc = json.loads((path / "state.json").read_text(encoding="utf-8"))
    return weights, tensors, doc


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler) -> int:
    """Load ``path`` into the model, optimizer and scheduler and return its step; :class:`CheckpointError` if
    anything in it is damaged or does not fit — then nothing has been changed."""
    try:
        weights, tensors, doc = _read(path)
    except (OSError, ValueError, RecursionError, UnicodeDecodeError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({_one_line(exc)})") from None
    except Exception as exc:  # safetensors' own error type for a damaged file
        if type(exc).__name__ != "SafetensorError":
            raise
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({_one_line(exc)})") from None
    try:
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        missing = sorted(set(named) - set(weights))
        extra = sorted(set(weights) - set(named))
        if missing:
            raise ValueError(f"no tensor for the trainable parameter '{missing[0]}'")
        if extra:
            raise ValueError(f"an extra tensor '{extra[0]}' that this model does not train")
        for n, t in weights.items():
            if t.shape != named[n].shape:
                raise ValueError(f"'{n}' has shape {tuple(t.shape)}, the model {tuple(named[n].shape)}")
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise ValueError(f"'{n}' is not a finite floating-point tensor")
        if not isinstance(doc, dict) or set(doc) != {"step", "optimizer", "scheduler"}:
            raise ValueError("state.json must hold exactly 'step', 'optimizer' and 'scheduler'")
        step = doc["step"]
        m = _STEP.match(path.name)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0 or (m and int(m.group(1)) != step):
            raise ValueError(f"state.json says step {step!r}")
        opt_state = _join(doc["optimizer"], tensors)
        _check_optimizer(opt_state, optimizer)
        _same_structure(doc["scheduler"], scheduler.state_dict(), "scheduler")
        rng = tensors.get("rng.cpu")
        if rng is None or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
            raise ValueError("the random generator state is missing or of another size")
        cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                           key=lambda k: int(k.rsplit(".", 1)[1]) if k.rsplit(".", 1)[1].isdigit()
                                           else -1)]
        optimizer.load_state_dict(opt_state)
    except (ValueError, TypeError, KeyError, RuntimeError, RecursionError) as exc:
        raise CheckpointError(f"checkpoint '{path}' is damaged or does not fit this run ({_one_line(exc)})") from None
    from .sharded import place, shard_optimizer_state

    shard_optimizer_state(optimizer)  # whole moments → the shards of sharded (FSDP) parameters
    scheduler.load_state_dict(doc["scheduler"])
    with torch.no_grad():
        for n, t in weights.items():
            named[n].copy_(place(named[n], t))
    torch.set_rng_state(rng)
    if torch.cuda.is_available() and cuda:
        try:
            torch.cuda.set_rng_state_all(cuda)
        except (RuntimeError, ValueError):
            pass  # another number of GPUs: the run goes on with fresh CUDA generators
    return step


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(exc).__name__)
