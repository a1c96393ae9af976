"""A small hand-written encoder-decoder with no HF or torch.nn.Transformer names in it.

Attention is written as matmul -> softmax -> matmul (no SDPA), projections have unusual names, and the FFN
uses SiLU: discovery must find everything from the dataflow alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Mixer(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.wq = nn.Linear(d, d)
        self.wk = nn.Linear(d, d)
        self.wv = nn.Linear(d, d)
        self.proj = nn.Linear(d, d)

    def forward(self, x, mem):
        b, n, d = x.shape
        h = self.heads

        def split(t):
            return t.view(b, -1, h, d // h).transpose(1, 2)

        q, k, v = split(self.wq(x)), split(self.wk(mem)), split(self.wv(mem))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, n, d))


class Cell(nn.Module):
    def __init__(self, d: int, heads: int, cross: bool):
        super().__init__()
        self.n1 = nn.LayerNorm(d)
        self.mix = Mixer(d, heads)
        self.look = Mixer(d, heads) if cross else None
        self.n2 = nn.LayerNorm(d)
        self.n3 = nn.LayerNorm(d)
        self.widen = nn.Linear(d, 3 * d)
        self.narrow = nn.Linear(3 * d, d)

    def forward(self, x, mem=None):
        y = self.n1(x)
        x = x + self.mix(y, y)
        if self.look is not None:
            x = x + self.look(self.n3(x), mem)
        return x + self.narrow(nn.functional.silu(self.widen(self.n2(x))))


class ToySeq2Seq(nn.Module):
    def __init__(self, vocab: int = 50, d: int = 32, heads: int = 4, n_enc: int = 3, n_dec: int = 2):
        super().__init__()
        self.table = nn.Embedding(vocab, d)
        self.reader = nn.ModuleList(Cell(d, heads, cross=False) for _ in range(n_enc))
        self.writer = nn.ModuleList(Cell(d, heads, cross=True) for _ in range(n_dec))
        self.head = nn.Linear(d, vocab)

    def forward(self, src, tgt):
        mem = self.table(src)
        for cell in self.reader:
            mem = cell(mem)
        x = self.table(tgt)
        for cell in self.writer:
            x = cell(x, mem)
        return self.head(x)

    @staticmethod
    def example_inputs():
        g = torch.Generator().manual_seed(0)
        return (torch.randint(0, 50, (2, 7), generator=g), torch.randint(0, 50, (2, 5), generator=g))


def build_toy() -> nn.Module:
    """Factory for `package.module:factory` tests."""
    torch.manual_seed(0)
    return ToySeq2Seq().eval()
