"""The frame the hand-written toy language models share: token embedding → ``layers`` → norm → logits."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


class TokenLM(nn.Module):
    """``head(norm(layer_n(...layer_1(embed(ids)))))``; each layer maps the stream to the stream.

    ``layers`` is iterated after the embedding is made and ``norm(d)`` after the layers, so a model built under
    one seed draws its weights in the order embed, layers, head (a generator keeps it)."""

    def __init__(self, layers: Iterable[nn.Module], d: int, vocab: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(layers)
        self.norm = norm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))

    def example_inputs(self):
        return (torch.randint(0, self.embed.num_embeddings, (2, 7)),)
