"""Stack kinds and layer numbers of a vision tower whose pooling head cross-attends (SigLIP's head, as in Gemma 3's
tiny config): a learned probe, made of weights only, reads the patch tokens as keys and values.

The stream is fed by images only, so every block is ``visual`` (not a ``decoder``, which cross-attention alone
would make it), and the head, outside the tower's layer list, is a layer of its own after the tower's layers.
Expectations come from how the toy is written, never from running discovery.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import vlpet_fx
from toy import Cell, Mixer
from vlpet_fx.rules import parse_rules

D, HEADS, DEPTH, PATCH = 32, 4, 2, 4


class ToyTowerWithHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.patches = nn.Conv2d(3, D, kernel_size=PATCH, stride=PATCH)
        self.layers = nn.ModuleList(Cell(D, HEADS, cross=False) for _ in range(DEPTH))
        self.probe = nn.Parameter(torch.randn(1, 1, D))
        self.pool = Mixer(D, HEADS)
        self.norm = nn.LayerNorm(D)
        self.up = nn.Linear(D, 2 * D)
        self.down = nn.Linear(2 * D, D)

    def forward(self, pixels):
        x = self.patches(pixels).flatten(2).transpose(1, 2)
        for layer in self.layers:
            x = layer(x)
        h = self.pool(self.probe.expand(x.shape[0], -1, -1), x)  # queries from the probe, keys/values from x
        return h + self.down(nn.functional.gelu(self.up(self.norm(h))))

    def example_inputs(self):
        return (torch.randn(2, 3, 4 * PATCH, 4 * PATCH),)


def _built():
    torch.manual_seed(0)
    m = ToyTowerWithHead().eval()
    return m, vlpet_fx.discover(m, m.example_inputs())


def test_pooling_head_is_a_visual_layer_of_its_own():
    _, table = _built()
    assert table.num_layers() == {"visual": DEPTH + 1}
    for layer in range(DEPTH):
        assert {s.block for s in table.where(stack="visual", layer=layer)} == {"self_attn", "ffn"}
        assert {s.layer_path for s in table.where(stack="visual", layer=layer)} == {f"layers.{layer}"}
    head = table.where(stack="visual", layer=DEPTH)
    assert {s.block for s in head} == {"cross_attn", "ffn"}
    # the probe's query projection maps weights only (no activation): no site
    assert {s.role for s in head.where(block="cross_attn")} == {"k", "v", "o", "output"}
    assert {s.path for s in head.where(block="cross_attn", role="v")} == {"pool.wv"}
    assert {s.path for s in head.where(block="ffn", role="out")} == {"down"}


def test_lora_on_the_head_keeps_the_output_at_init_and_vlpet_changes_it():
    m, table = _built()
    (x,) = m.example_inputs()
    with torch.no_grad():
        reference = m(x)
    lora = copy.deepcopy(m)
    vlpet_fx.patch(lora, parse_rules("name: l\nmethods: {lora: {type: lora, rank: 4, alpha: 8}}\nrules: [{select: "
                                     "{stack: visual, role: [q, v]}, insert: lora, placement: parallel}]\n"),
                   table=table)
    with torch.no_grad():
        torch.testing.assert_close(lora(x), reference, rtol=1e-6, atol=1e-6)
    assert len(table.where(stack="visual", role=["q", "v"])) == 2 * DEPTH + 1
    pet = copy.deepcopy(m)
    vlpet_fx.patch(pet, parse_rules("name: a\nmethods: {adapter: {type: adapter, reduction: 4, zero_init_up: false}}\n"
                                    "rules: [{select: {stack: visual, role: output}, insert: adapter}]\n"), table=table)
    out = pet(x)
    assert not torch.allclose(out, reference)
    out.sum().backward()
    assert all(p.grad is not None for p in pet.parameters() if p.requires_grad)
