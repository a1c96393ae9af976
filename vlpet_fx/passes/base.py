"""Pass contract, after torch.fx's ``PassBase``/``PassResult``: ``requires`` checks the input, ``call``
does the work and returns a ``PassResult(module, modified)``, ``ensures`` checks the output."""

from __future__ import annotations

import zlib
from contextlib import contextmanager

import torch
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult

from ..modules.base import get_method
from ..planner.plan import Placement


class ModulePass:
    """A pass over an ``nn.Module`` (eager back end) with torch.fx's pass contract."""

    def requires(self, module: nn.Module) -> None:  # pragma: no cover - default: nothing to check
        pass

    def ensures(self, module: nn.Module) -> None:  # pragma: no cover
        pass

    def call(self, module: nn.Module) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, module: nn.Module) -> PassResult:
        self.requires(module)
        result = self.call(module)
        self.ensures(result.graph_module)
        return result


@contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_pet(p: Placement, *, seed: int = 0, device=None, dtype=None) -> nn.Module:
    """Instantiate the PET module of a placement. Its initial weights depend only on (seed, site, placement),
    so the eager and the graph back ends build identical modules."""
    cls = get_method(p.method).module
    # the site's key (with ':' for '.', which keeps the seeds of the unqualified keys of earlier versions)
    key = f"{seed}:{p.site.key.replace('.', ':')}:{p.placement}"
    with _seeded(zlib.crc32(key.encode())):
        mod = cls(p.site.in_features, p.site.out_features, p.config, placement=p.placement)
    if device is not None or dtype is not None:
        mod = mod.to(device=device, dtype=dtype)
    return mod


def site_device_dtype(module: nn.Module):
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return None, None


# -- sites that are a slice of a packed projection's output --------------------------------------------------

def take_slice(y: torch.Tensor, out_slice: tuple[int, ...]) -> torch.Tensor:
    """The channels ``out_slice`` names (last axis of ``y``), in order."""
    a, b = out_slice[0], out_slice[1]
    if len(out_slice) == 2:
        return y.narrow(-1, a, b - a)
    period, count = out_slice[2], out_slice[3]
    return y.unflatten(-1, (count, period)).narrow(-1, a, b - a).flatten(-2)


def put_slice(y: torch.Tensor, out_slice: tuple[int, ...], v: torch.Tensor) -> torch.Tensor:
    """``y`` with the channels ``out_slice`` names replaced by ``v`` (out of place: autograd sees both)."""
    a, b = out_slice[0], out_slice[1]
    if len(out_slice) == 2:
        return torch.cat([y.narrow(-1, 0, a), v, y.narrow(-1, b, y.shape[-1] - b)], dim=-1)
    period, count = out_slice[2], out_slice[3]
    yb = y.unflatten(-1, (count, period))
    vb = v.unflatten(-1, (count, b - a))
    return torch.cat([yb.narrow(-1, 0, a), vb, yb.narrow(-1, b, period - b)], dim=-1).flatten(-2)


class SiteApply:
    """How a placement changes its site's value ``y`` (the whole output of the site's op or module):
    ``pet.<method>(*extra, y)``, or for a slice site ``put(y, pet.<method>(*extra, take(y)))``. Both back ends
    use it, so they compute the same thing. The choice is made here, once (no branching per call)."""

    def __init__(self, pet: nn.Module, method: str, out_slice: tuple[int, ...] | None):
        self.fn = getattr(pet, method)
        self.out_slice = tuple(out_slice) if out_slice else None
        self.apply = self._whole if self.out_slice is None else self._sliced

    def _whole(self, *tensors):
        return self.fn(*tensors)

    def _sliced(self, *tensors):
        *extra, y = tensors
        return put_slice(y, self.out_slice, self.fn(*extra, take_slice(y, self.out_slice)))


def gated_on_block_input(apply, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``apply(x, y)`` for a method that reads the block input ``x``; where the site's value ``y`` has its token
    axes flattened (a mixture of experts or HF ``Conv1D`` working on ``(tokens, d)``) it is viewed with ``x``'s
    leading shape for the call and flattened back."""
    if x.shape[:-1] == y.shape[:-1]:
        return apply(x, y)
    out = apply(x, y.reshape(*x.shape[:-1], y.shape[-1]))
    return out.reshape(y.shape[:-1] + out.shape[-1:])
