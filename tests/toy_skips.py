"""A toy causal LM with skips inside its sub-layers (the shape of Inkling2's layers, written by hand): a short
causal depthwise convolution with its own skip, ``(x + conv(x)) / sqrt(k + 1)``, on the keys' and values'
projections (a width other than the stream's) and on the attention's output; the attention has a sink logit
computed for each query (concatenated with the scores before the softmax, dropped after it); the first layer
starts the stream with its attention's output (no residual add there), the others add it back; before the head,
a learned query attends over the stacked embedding and last layer output (attention over depth)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from toy_lm import TokenLM


class ShortConv(nn.Module):
    """``(x + conv(x)) / sqrt(k + 1)``: a depthwise causal convolution over the tokens (padded on both sides, the
    first ``tokens`` outputs kept) with a skip."""

    def __init__(self, width: int, kernel: int = 3):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(width, width, kernel, groups=width, padding=kernel - 1, bias=False)

    def forward(self, x):
        y = self.conv(x.transpose(1, 2))[:, :, : x.shape[1]].transpose(1, 2)
        return (x + y) / math.sqrt(self.kernel + 1)


class ConvAttention(nn.Module):
    def __init__(self, d: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.q = nn.Linear(d, inner, bias=False)
        self.k = nn.Linear(d, inner, bias=False)
        self.v = nn.Linear(d, inner, bias=False)
        self.k_conv, self.v_conv = ShortConv(inner), ShortConv(inner)
        self.o = nn.Linear(inner, d, bias=False)
        self.sink = nn.Linear(d, heads, bias=False)  # one sink logit per head and query, computed from x

    def forward(self, x):
        b, t, _ = x.shape

        def heads(z):
            return z.view(b, t, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k_conv(self.k(x))), heads(self.v_conv(self.v(x)))
        scores = (q @ k.transpose(2, 3)) * self.head_dim**-0.5
        pos = torch.arange(t, device=x.device)
        scores = scores.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
        sinks = self.sink(x).transpose(1, 2).unsqueeze(-1)  # (b, heads, t, 1): absorbs probability mass
        probs = torch.cat([scores, sinks], dim=-1).softmax(-1)[..., :-1]
        return self.o((probs @ v).transpose(1, 2).reshape(b, t, -1))


class SkipLayer(nn.Module):
    """``h = post(attn(norm(x)))`` (first layer: the stream starts there) or ``h = x + post(attn(norm(x)))``, then
    ``h + ffn(norm(h))``."""

    def __init__(self, d: int, first: bool, heads: int = 4, head_dim: int = 12, hidden: int = 64):
        super().__init__()
        self.first = first
        self.attn_norm, self.ffn_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = ConvAttention(d, heads, head_dim)
        self.post = ShortConv(d)
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        a = self.post(self.attn(self.attn_norm(x)))
        h = a if self.first else x + a
        return h + self.down(F.gelu(self.up(self.ffn_norm(h))))


class DepthMix(nn.Module):
    """Attention over depth: a learned query weighs the stacked embedding and last layer output of each token
    (``softmax(q · norm(stack)) @ norm(stack)``); it projects none of q, k, v."""

    def __init__(self, d: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(d) / d**0.5)

    def forward(self, first, last):
        stack = F.rms_norm(torch.cat([first.unsqueeze(-2), last.unsqueeze(-2)], dim=-2), (first.shape[-1],))
        weights = (self.query.view(1, -1) @ stack.transpose(-1, -2)).softmax(-1)  # (b, t, 1, 2)
        return (weights @ stack).squeeze(-2)


class SkipLM(TokenLM):
    """``head(norm(mix(embed(ids), layers(embed(ids)))))``."""

    def __init__(self, layers, d: int, vocab: int):
        super().__init__(layers, d, vocab, nn.LayerNorm)
        self.mix = DepthMix(d)

    def forward(self, ids):
        x = first = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(self.mix(first, x)))


def skip_lm(d: int = 32, vocab: int = 50, depth: int = 2, seed: int = 0) -> TokenLM:
    torch.manual_seed(seed)
    return SkipLM([SkipLayer(d, first=i == 0) for i in range(depth)], d, vocab).eval()
