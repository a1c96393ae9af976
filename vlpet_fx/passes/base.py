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
    key = f"{seed}:{p.site.stack}:{p.site.layer}:{p.site.block}:{p.site.role}:{p.placement}"
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
