"""Hand-written toy language models whose sub-layers are not ``linear → act → linear`` (no HF names in them).

* :class:`BatchedExperts`  -- a mixture of experts whose experts are one 3-D parameter per matrix (E, out, in),
  routed by a top-k over a softmax, computed densely with ``einsum`` (no data-dependent shapes); optionally a
  shared gated expert scaled by a sigmoid gate (``shared=True``)
* :class:`ShortConvMixer`  -- token mixing that is not softmax attention: in-projection, a depthwise causal
  convolution over the tokens, a cumulative sum (a scan), out-projection (``conv=False``: no convolution,
  ``scan=False``: no cumulative sum)
* :class:`WrittenOutMLP`   -- a plain MLP whose non-linearity is written out of primitives (xIELU-like:
  ``where``, ``expm1``, ``minimum``), so it has no activation op
* :class:`ToyLM`           -- token embedding → layers → norm → logits; a layer is ``x + mix(norm(x))`` then
  ``x + ffn(norm(x))``, or with ``parallel=True`` ``x + mix(norm(x)) + ffn(norm(x))``. ``mix`` is causal SDPA
  attention or the short-conv mixer; ``ffn`` the experts, a gated MLP or the written-out MLP.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from toy_lm import TokenLM


class Attention(nn.Module):
    def __init__(self, d: int, heads: int = 4):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (m(x).view(b, t, self.h, d // self.h).transpose(1, 2) for m in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class GatedExpert(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.wg = nn.Linear(d, f, bias=False)
        self.wu = nn.Linear(d, f, bias=False)
        self.wd = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.wd(F.silu(self.wg(x)) * self.wu(x))


class BatchedExperts(nn.Module):
    def __init__(self, d: int, f: int, experts: int = 4, top: int = 2, shared: bool = False):
        super().__init__()
        self.top = top
        self.router = nn.Linear(d, experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(experts, 2 * f, d) * d ** -0.5)   # gate and up of every expert
        self.w_out = nn.Parameter(torch.randn(experts, d, f) * f ** -0.5)
        self.shared = GatedExpert(d, f) if shared else None
        self.shared_gate = nn.Linear(d, 1, bias=False) if shared else None

    def forward(self, x):
        probs = torch.softmax(self.router(x), dim=-1)
        top, idx = probs.topk(self.top, dim=-1)
        weights = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        g, u = torch.einsum("btd,efd->btef", x, self.w_in).chunk(2, dim=-1)
        per_expert = torch.einsum("btef,edf->bted", F.silu(g) * u, self.w_out)
        y = (per_expert * weights.unsqueeze(-1)).sum(dim=2)
        if self.shared is not None:
            y = y + torch.sigmoid(self.shared_gate(x)) * self.shared(x)
        return y


class ShortConvMixer(nn.Module):
    def __init__(self, d: int, kernel: int = 4, conv: bool = True, scan: bool = True):
        super().__init__()
        self.kernel, self.use_conv, self.use_scan = kernel, conv, scan
        self.inp = nn.Linear(d, 2 * d, bias=False)
        self.conv = nn.Conv1d(d, d, kernel, groups=d, padding=kernel - 1)
        self.decay = nn.Parameter(torch.rand(d, d) * 0.1)   # a weight matrix on the branch even without conv
        self.outp = nn.Linear(d, d, bias=False)

    def forward(self, x):
        h, gate = self.inp(x).chunk(2, dim=-1)
        if self.use_conv:
            h = self.conv(h.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)
        else:
            h = h @ self.decay
        if self.use_scan:
            h = torch.cumsum(h, dim=1) / torch.arange(1, x.shape[1] + 1, dtype=h.dtype).view(1, -1, 1)
        return self.outp(h * F.silu(gate))


class WrittenOutMLP(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.up = nn.Linear(d, f, bias=False)
        self.down = nn.Linear(f, d, bias=False)
        self.alpha = nn.Parameter(torch.ones(1))

    def forward(self, x):
        h = self.up(x)
        h = torch.where(h > 0, self.alpha * h * h + 0.5 * h, torch.expm1(torch.minimum(h, torch.zeros(()))) + 0.5 * h)
        return self.down(h)


class Layer(nn.Module):
    def __init__(self, d: int, f: int, mix: str, ffn: str, parallel: bool, **kw):
        super().__init__()
        self.parallel = parallel
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mix = Attention(d) if mix == "attention" else ShortConvMixer(d, **kw)
        if ffn == "experts":
            self.ffn = BatchedExperts(d, f)
        elif ffn == "experts+shared":
            self.ffn = BatchedExperts(d, f, shared=True)
        elif ffn == "written":
            self.ffn = WrittenOutMLP(d, f)
        else:
            self.ffn = GatedExpert(d, f)

    def forward(self, x):
        if self.parallel:
            h = self.n1(x)
            return x + self.mix(h) + self.ffn(h)
        x = x + self.mix(self.n1(x))
        return x + self.ffn(self.n2(x))


class ToyLM(TokenLM):
    def __init__(self, mix: str = "attention", ffn: str = "experts", depth: int = 2, d: int = 32, f: int = 48,
                 vocab: int = 50, parallel: bool = False, **kw):
        super().__init__((Layer(d, f, mix, ffn, parallel, **kw) for _ in range(depth)), d, vocab, nn.LayerNorm)


def build(**kw) -> ToyLM:
    torch.manual_seed(0)
    return ToyLM(**kw).eval()
