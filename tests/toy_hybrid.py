"""Hand-written toy hybrid language models (no HF names in them): layers of several classes in one list, a gate
computed inside a norm, and a shared sub-layer whose output is fed to the next sub-layer instead of added back.

* :class:`HybridLM` -- token embedding → ``nn.ModuleList`` of :class:`AttnLayer` and :class:`MixerLayer` (two
  classes, e.g. ``"AMAM"``) → norm → logits. Each layer is ``x + mix(n1(x))`` then ``x + ffn(n2(x))``; with
  ``gated_norm=True`` the attention layer's ``n1`` is :class:`GatedNorm`: ``y * sigmoid(gate(y))``,
  ``y = rmsnorm(x)``, ``gate = up(silu(down(y)))`` (a lift → act → back map that no residual add merges back).
* :class:`SharedLM` -- a mixer layer, then :class:`SharedLayer`\\ s that each call one shared transformer block
  on ``norm(cat(h, emb))`` (attention ``2d → d``, then ``ffn(norm(attn))``, no residual add inside), map its
  output by a per-layer linear and add it to the mixer's input: ``h + mix(norm(h + lin(block(h, emb))))``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from toy_lm import TokenLM


class RMSNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w


class GateMLP(nn.Module):
    def __init__(self, d: int, r: int):
        super().__init__()
        self.down = nn.Linear(d, r, bias=False)
        self.up = nn.Linear(r, d, bias=False)

    def forward(self, y):
        return self.up(F.silu(self.down(y)))


class GatedNorm(nn.Module):
    def __init__(self, d: int, r: int = 8):
        super().__init__()
        self.norm = RMSNorm(d)
        self.gate = GateMLP(d, r)

    def forward(self, x):
        y = self.norm(x)
        return y * torch.sigmoid(self.gate(y))


class Attention(nn.Module):
    def __init__(self, d_in: int, d: int, heads: int = 4):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v = (nn.Linear(d_in, d, bias=False) for _ in range(3))
        self.o = nn.Linear(d, d, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (m(x).view(b, t, self.h, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class Mixer(nn.Module):
    """in-projection, a depthwise causal convolution over the tokens, a gate, out-projection."""

    def __init__(self, d: int, kernel: int = 3):
        super().__init__()
        self.inp = nn.Linear(d, 2 * d, bias=False)
        self.conv = nn.Conv1d(d, d, kernel, groups=d, padding=kernel - 1)
        self.outp = nn.Linear(d, d, bias=False)

    def forward(self, x):
        h, gate = self.inp(x).chunk(2, dim=-1)
        h = self.conv(h.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)
        return self.outp(h * F.silu(gate))


class MLP(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate, self.upp = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.upp(x))


class AttnLayer(nn.Module):
    def __init__(self, d: int, f: int, gated_norm: bool = False):
        super().__init__()
        self.n1 = GatedNorm(d) if gated_norm else RMSNorm(d)
        self.attn, self.n2, self.ffn = Attention(d, d), RMSNorm(d), MLP(d, f)

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.ffn(self.n2(x))


class MixerLayer(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.n1, self.mix, self.n2, self.ffn = RMSNorm(d), Mixer(d), RMSNorm(d), MLP(d, f)

    def forward(self, x):
        x = x + self.mix(self.n1(x))
        return x + self.ffn(self.n2(x))


class HybridLM(TokenLM):
    def __init__(self, kinds: str = "AMAM", d: int = 32, f: int = 48, vocab: int = 50, gated_norm: bool = False):
        super().__init__((AttnLayer(d, f, gated_norm) if k == "A" else MixerLayer(d, f) for k in kinds), d, vocab,
                         RMSNorm)


class SharedBlock(nn.Module):
    """attention on ``norm(cat(h, emb))`` (2d wide) to d, then an FFN on its normalised output; no residual."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.n1, self.attn = RMSNorm(2 * d), Attention(2 * d, d)
        self.n2, self.ffn = RMSNorm(d), MLP(d, f)

    def forward(self, h, emb):
        return self.ffn(self.n2(self.attn(self.n1(torch.cat([h, emb], dim=-1)))))


class MixerPart(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.n1, self.mix = RMSNorm(d), Mixer(d)

    def forward(self, h, t):
        return h + self.mix(self.n1(h + t))


class SharedLayer(nn.Module):
    def __init__(self, shared: SharedBlock, d: int):
        super().__init__()
        self.shared = shared
        self.lin = nn.Linear(d, d, bias=False)
        self.part = MixerPart(d)

    def forward(self, h, emb):
        return self.part(h, self.lin(self.shared(h, emb)))


class FirstLayer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.part = MixerPart(d)

    def forward(self, h, emb):
        return self.part(h, torch.zeros_like(h))


class SharedLM(nn.Module):
    def __init__(self, depth: int = 3, d: int = 32, f: int = 48, vocab: int = 50):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        shared = SharedBlock(d, f)
        self.layers = nn.ModuleList([FirstLayer(d)] + [SharedLayer(shared, d) for _ in range(depth - 1)])
        self.norm = RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        emb = h = self.embed(ids)
        for layer in self.layers:
            h = layer(h, emb)
        return self.head(self.norm(h))

    def example_inputs(self):
        return (torch.randint(0, self.embed.num_embeddings, (2, 7)),)


def build(cls=HybridLM, **kw) -> nn.Module:
    torch.manual_seed(0)
    return cls(**kw).eval()
