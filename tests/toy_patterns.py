"""Hand-written toy transformers, one per dataflow pattern, with no HF or torch.nn.Transformer names in them.

* :class:`EinsumEncoder`   -- attention written with ``torch.einsum`` (scores and values), einsum projections
* :class:`AlibiEncoder`    -- ``baddbmm`` scores with an additive (ALiBi-like) bias, ``bmm`` values
* :class:`FusedEncoder`    -- one ``nn.Linear`` makes q, k and v; split by reshape + unbind (timm-style)
* :class:`Conv1DEncoder`   -- one Conv1D-style module (``addmm`` with an (in, out) weight) makes q, k, v (split)
* :class:`InterleavedEncoder` -- fused q/k/v laid out per head ([q_h k_h v_h] for each head h)
* every block has a gated MLP (``down(act(gate(x)) * up(x))``), with ``gated=False`` a plain one, with
  ``mlp="fused"`` a gated one whose two halves come from one matrix
"""

from __future__ import annotations

import math

import torch
from torch import nn


class GatedMLP(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.lift = nn.Linear(d, f, bias=False)    # not passed through the activation: the `up` projection
        self.switch = nn.Linear(d, f, bias=False)  # passed through the activation: the `gate` projection
        self.drop = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.drop(self.lift(x) * nn.functional.silu(self.switch(x)))


class FusedGatedMLP(nn.Module):
    """One matrix makes both halves; the first half is `up`, the second passes the activation (`gate`)."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.both = nn.Linear(d, 2 * f, bias=False)
        self.drop = nn.Linear(f, d, bias=False)

    def forward(self, x):
        u, g = self.both(x).chunk(2, dim=-1)
        return self.drop(u * nn.functional.gelu(g))


class PlainMLP(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.a = nn.Linear(d, f)
        self.b = nn.Linear(f, d)

    def forward(self, x):
        return self.b(nn.functional.gelu(self.a(x)))


class Conv1DStyle(nn.Module):
    """y = x W + b with W stored (in, out), computed with addmm (as Hugging Face's Conv1D does)."""

    def __init__(self, nx: int, nf: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        shape = x.shape[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(shape)


def _heads(t, h):
    b, n, d = t.shape
    return t.view(b, n, h, d // h).transpose(1, 2)


def _merge(t):
    b, h, n, dh = t.shape
    return t.transpose(1, 2).reshape(b, n, h * dh)


class EinsumAttention(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.h = h
        self.wq = nn.Parameter(torch.randn(d, d) * d ** -0.5)
        self.wk = nn.Parameter(torch.randn(d, d) * d ** -0.5)
        self.wv = nn.Parameter(torch.randn(d, d) * d ** -0.5)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q = torch.einsum("bnd,ed->bne", x, self.wq).view(b, n, self.h, -1)
        k = torch.einsum("bnd,ed->bne", x, self.wk).view(b, n, self.h, -1)
        v = torch.einsum("bnd,ed->bne", x, self.wv).view(b, n, self.h, -1)
        # keys first in the score equation: the query is found from the equation, not the operand order
        s = torch.einsum("bkhe,bqhe->bhqk", k, q) / math.sqrt(d // self.h)
        a = torch.softmax(s, dim=-1)
        o = torch.einsum("bhqk,bkhe->bqhe", a, v).reshape(b, n, d)
        return self.out(o)


class AlibiAttention(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.h = h
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        h, dh = self.h, d // self.h
        q = _heads(self.q(x), h).reshape(b * h, n, dh)
        k = _heads(self.k(x), h).reshape(b * h, n, dh)
        v = _heads(self.v(x), h).reshape(b * h, n, dh)
        slopes = torch.tensor([2.0 ** -(i + 1) for i in range(h)], device=x.device)
        pos = torch.arange(n, device=x.device, dtype=x.dtype)
        bias = (slopes[:, None] * pos[None, :]).repeat(b, 1)[:, None, :].expand(b * h, n, n)
        s = torch.baddbmm(bias, q, k.transpose(1, 2), beta=1.0, alpha=dh ** -0.5)
        a = torch.softmax(s, dim=-1)
        o = torch.bmm(a, v).view(b, h, n, dh)
        return self.o(_merge(o))


class FusedAttention(nn.Module):
    """timm-style: one Linear to 3d, reshape (B, N, 3, H, dh), permute, unbind; SDPA."""

    def __init__(self, d: int, h: int, conv1d: bool = False):
        super().__init__()
        self.h = h
        self.qkv = Conv1DStyle(d, 3 * d) if conv1d else nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.conv1d = conv1d

    def forward(self, x):
        b, n, d = x.shape
        if self.conv1d:  # GPT-2 style: split on the feature axis
            q, k, v = self.qkv(x).split(d, dim=2)
            q, k, v = _heads(q, self.h), _heads(k, self.h), _heads(v, self.h)
        else:
            q, k, v = self.qkv(x).reshape(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4).unbind(0)
        o = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(_merge(o))


class InterleavedAttention(nn.Module):
    """GPT-NeoX/BLOOM-style packing: per head [q_h | k_h | v_h]; matmul attention."""

    def __init__(self, d: int, h: int):
        super().__init__()
        self.h = h
        self.packed = nn.Linear(d, 3 * d)
        self.dense = nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        dh = d // self.h
        t = self.packed(x).view(b, n, self.h, 3 * dh).transpose(1, 2)
        q, k, v = t[..., :dh], t[..., dh:2 * dh], t[..., 2 * dh:]
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)
        return self.dense(_merge(a @ v))


ATTENTION = {"einsum": EinsumAttention, "alibi": AlibiAttention, "fused": FusedAttention,
             "conv1d": lambda d, h: FusedAttention(d, h, conv1d=True), "interleaved": InterleavedAttention}


class WrittenGeluMLP(PlainMLP):
    """A plain MLP whose tanh-GELU is written out (GPT-2's gelu_new): ``h * (1 + tanh(...))`` is a product of the
    projection's output with an activation of itself, not a gate."""

    def forward(self, x):
        h = self.a(x)
        return self.b(0.5 * h * (1.0 + torch.tanh(0.7978845608 * (h + 0.044715 * torch.pow(h, 3.0)))))


MLP = {"gated": GatedMLP, "plain": PlainMLP, "fused": FusedGatedMLP, "written-gelu": WrittenGeluMLP}


class Layer(nn.Module):
    def __init__(self, kind: str, d: int, h: int, mlp: str):
        super().__init__()
        self.n1 = nn.LayerNorm(d)
        self.att = ATTENTION[kind](d, h)
        self.n2 = nn.LayerNorm(d)
        self.mlp = MLP[mlp](d, 2 * d)

    def forward(self, x):
        x = x + self.att(self.n1(x))
        return x + self.mlp(self.n2(x))


class PatternEncoder(nn.Module):
    """An encoder of ``depth`` layers whose attention is of one ``kind`` (see ATTENTION)."""

    def __init__(self, kind: str, d: int = 32, h: int = 4, depth: int = 2, vocab: int = 40, gated: bool = True,
                 mlp: str | None = None):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        mlp = mlp or ("gated" if gated else "plain")
        self.layers = nn.ModuleList(Layer(kind, d, h, mlp) for _ in range(depth))
        self.head = nn.Linear(d, vocab)
        self.vocab = vocab

    def forward(self, ids):
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)

    def example_inputs(self):
        g = torch.Generator().manual_seed(0)
        return (torch.randint(0, self.vocab, (2, 6), generator=g),)


def build(kind: str, **kw) -> PatternEncoder:
    torch.manual_seed(0)
    return PatternEncoder(kind, **kw).eval()
