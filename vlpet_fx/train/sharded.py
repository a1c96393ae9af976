"""Training under FSDP (Accelerate's FSDP2 plugin: ``fully_shard``, parameters as DTensors keeping their names).

What the training loop needs beyond Accelerate:

* the wrapping policy: every layer class the text model declares unsplittable (Hugging Face ``_no_split_modules``:
  ``T5Block``, ``BartEncoderLayer``, ...) is its own shard unit, the rest (embeddings, visual projection, norms) the
  root's; frozen and trainable parameters share units (FSDP2 shards each parameter on its own);
* checkpoints in the usual format (whole tensors, :mod:`vlpet_fx.train.state`): every process gathers the sharded
  trainable parameters and optimizer state (collectives, same order everywhere) and the main process writes;
  reading places each whole tensor's shard back (no communication: every process reads the file);
* whole parameters for generation and for saving the model: :func:`unsharded` gathers every unit and keeps it
  gathered until the block ends (evaluation calls the model's ``generate``, which does not pass the root's forward).

Accelerate (1.15) sets FSDP only on accelerator devices: on a CPU-only machine ``accelerate launch --use_fsdp`` gives
DDP (``MULTI_CPU``). The training loop refuses that in one line rather than run DDP silently.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from ..errors import VlpetError


class ShardingError(VlpetError):
    """FSDP was asked for in a form the training loop does not run."""


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (``accelerate launch --use_fsdp`` / a config with ``distributed_type:
    FSDP`` sets ``ACCELERATE_USE_FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").strip().lower() in ("1", "true", "yes")


def check_distributed(acc) -> bool:
    """Whether ``acc`` (an Accelerator) runs FSDP; :class:`ShardingError` (one line) for what the loop does not run:
    DeepSpeed, FSDP version 1, and FSDP asked for but not set up by Accelerate (a CPU-only machine)."""
    kind = acc.distributed_type.name
    if kind == "DEEPSPEED":
        raise ShardingError("train runs on one process, DDP or FSDP (version 2), not DeepSpeed: launch with "
                            "torchrun or `accelerate launch` with --use_fsdp (see README)")
    if kind == "FSDP":
        version = getattr(acc.state.fsdp_plugin, "fsdp_version", 1)
        if version != 2:
            raise ShardingError(f"train runs FSDP version 2 (fully_shard), not version {version}: set fsdp_version: 2 "
                                "in the accelerate config, or --fsdp_version 2")
        return True
    if fsdp_requested():
        raise ShardingError(f"FSDP was asked for (ACCELERATE_USE_FSDP) but Accelerate set up {kind}: it runs FSDP on "
                            "GPUs (and other accelerators) only; on a CPU-only machine train with DDP (torchrun, or "
                            "`accelerate launch` without --use_fsdp)")
    return False


def wrap_classes(model: nn.Module) -> list[str]:
    """Class names of the modules that become their own FSDP units: the ``_no_split_modules`` that any submodule
    of ``model`` declares (Hugging Face's list of layers not to split), restricted to classes present in it."""
    declared: list[str] = []
    for m in model.modules():
        for name in getattr(m, "_no_split_modules", None) or ():
            if isinstance(name, str) and name not in declared:
                declared.append(name)
    present = {type(m).__name__ for m in model.modules()}
    return [n for n in declared if n in present]


def configure_plugin(plugin, model: nn.Module) -> None:
    """Give Accelerate's FSDP plugin a wrapping policy if the launch set none: :func:`wrap_classes`."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    if plugin.auto_wrap_policy is None:
        names = wrap_classes(model)
        if not names:
            return  # one unit: the whole model (correct, only less memory-saving)
        plugin.auto_wrap_policy = transformer_auto_wrap_policy
        plugin.transformer_cls_names_to_wrap = names
    elif plugin.auto_wrap_policy is transformer_auto_wrap_policy and not plugin.transformer_cls_names_to_wrap:
        plugin.transformer_cls_names_to_wrap = wrap_classes(model)


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) tensor, on the CPU; a collective for a DTensor."""
    if _is_dtensor(t):
        t = t.full_tensor()
    return t.detach().cpu()


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def gather_state(model: nn.Module, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Whole trainable parameters by name and the optimizer's state dict with whole tensors. Every process must
    call it (the same parameters in the same order)."""
    weights = {n: full(p) for n, p in model.named_parameters() if p.requires_grad}
    return weights, _map_tensors(optimizer.state_dict(), full)


def place(param: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``whole`` laid out like ``param``: its local shard for a DTensor (cut locally, no communication: every
    process holds ``whole``), else ``whole`` itself."""
    if not _is_dtensor(param):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)


def shard_optimizer_state(optimizer) -> None:
    """After ``optimizer.load_state_dict`` with whole tensors: lay out every per-element state tensor (Adam's
    moments) like its parameter (scalars such as ``step`` stay as they are)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not _is_dtensor(p):
                continue
            state = optimizer.state.get(p, {})
            for k, v in list(state.items()):
                if isinstance(v, torch.Tensor) and not _is_dtensor(v) and v.dim() and v.shape == p.shape:
                    state[k] = place(p, v)


def fsdp_units(model: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def unsharded(model: nn.Module, enabled: bool = True, *, reshard: bool = True):
    """Every FSDP unit of ``model`` gathered (whole parameters, under their names) until the block ends, and not
    re-sharded after each forward; every process must enter it. ``reshard=False`` leaves them gathered (at the
    end of a run: saving the model may share the gathered storage, which FSDP cannot free then). Without FSDP (or
    ``enabled=False``) it does nothing."""
    units = fsdp_units(model) if enabled else []
    if not units:
        yield
        return
    for u in units:
        u.unshard()
        u.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for u in units if reshard else ():
            u.set_reshard_after_forward(True, recurse=False)
            u.reshard()
