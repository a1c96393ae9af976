"""Skips inside a sub-layer are no sub-layers (issue 12: inkling2_text, inkling2_loop_text).

The toy model (tests/toy_skips.py) puts a short causal convolution with its own skip, ``(x + conv(x)) / sqrt(k +
1)``, on the keys' and values' projections (48 wide, the stream is 32) and after the attention's output, and its
first layer starts the stream with that attention's output (no residual add). Those skips are ``x + f(x)`` with a
weight in ``f``, but none of them adds a sub-layer's output into the residual stream: discovery must find the
attention and the FFN of every layer and no token mixer, every block output as wide as the stream. Its attention
has a sink logit computed per query; the attention over depth before the head (a learned query, no projection
of q, k or v) is no block and does not take the head for its output projection. Expectations
come from how the toy is written (two layers of attention q/k/v/o + output and FFN in/out/output), never from
running discovery; VL-PET's causal-LM rules fit, both back ends compute the same and it trains.
"""

from __future__ import annotations

import copy

import pytest
import torch

import vlpet_fx
from toy_skips import skip_lm

D, DEPTH, INNER = 32, 2, 48


@pytest.fixture(scope="module")
def discovered():
    model = skip_lm(d=D, depth=DEPTH)
    return model, vlpet_fx.discover(model, model.example_inputs())


def test_blocks_are_the_attention_and_the_ffn_of_each_layer(discovered):
    _, table = discovered
    expected = {(layer, "self_attn", role) for layer in range(DEPTH) for role in ("q", "k", "v", "o", "output")}
    expected |= {(layer, "ffn", role) for layer in range(DEPTH) for role in ("in", "out", "output")}
    found = [(s.layer, s.block, s.role) for s in table]
    assert sorted(found) == sorted(expected)  # no mixer for a convolution's skip, no site twice
    for s in table:
        assert s.stack == "decoder"
        if s.role == "output":  # a sub-layer's output is added into the stream: the stream's width
            assert (s.in_features, s.out_features) == (D, D), s.key
    widths = {(s.layer, s.role): (s.in_features, s.out_features) for s in table.where(block="self_attn")}
    for layer in range(DEPTH):
        assert widths[(layer, "k")] == widths[(layer, "v")] == (D, INNER)
        assert widths[(layer, "o")] == (INNER, D)


def test_vlpet_fits_and_back_ends_agree(discovered):
    model, table = discovered
    (ids,) = model.example_inputs()
    with torch.no_grad():
        reference = model(ids)
    plan = vlpet_fx.plan(model, "vlpet_causal_lm", table=table)
    placed = {(p.site.layer, p.site.block) for p in plan.placements}
    assert placed >= {(layer, b) for layer in range(DEPTH) for b in ("self_attn", "ffn")}, plan.placements
    eager = vlpet_fx.patch(copy.deepcopy(model), plan)
    out = eager(ids)
    assert not torch.allclose(out, reference)
    graph = vlpet_fx.patch(copy.deepcopy(model), plan, backend="graph", example_inputs=((ids,), {}))
    with torch.no_grad():
        torch.testing.assert_close(graph(ids), out.detach(), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    trainable = [p for p in eager.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
