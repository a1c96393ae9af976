"""The graph back end is specialised to its example inputs (torch.export): it says so once at creation, refuses
another shape with one line, and a graph made for the second shape agrees with the eager back end there."""

from __future__ import annotations

import copy

import pytest
import torch

import vlpet_fx
from vlpet_fx.api import GraphShapeWarning
from vlpet_fx.zoo import build_model


@pytest.fixture(scope="module")
def base():
    m = build_model("t5", "tiny")
    for mod in m.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    return m


def _inputs(batch, src, tgt):
    g = torch.Generator().manual_seed(batch * 100 + src)
    ids = torch.randint(3, 100, (batch, src), generator=g)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                decoder_input_ids=torch.randint(3, 100, (batch, tgt), generator=g), use_cache=False)


def test_says_it_is_fixed_and_refuses_a_second_shape_with_one_line(base):
    with pytest.warns(GraphShapeWarning) as rec:
        gm = vlpet_fx.patch(copy.deepcopy(base), "vlpet_large", backend="graph")
    msg = str(rec[0].message)
    assert "\n" not in msg and "eval mode" in msg and "backend='eager'" in msg
    first = gm.vlpet_example_inputs
    assert isinstance(first["input_ids"], tuple)
    other = _inputs(first["input_ids"][0] + 1, first["input_ids"][1] + 3, first["decoder_input_ids"][1])
    with pytest.raises(vlpet_fx.PlanError, match="input_ids") as exc:
        gm(**other)
    assert "\n" not in str(exc.value)


def test_a_graph_made_for_the_second_shape_agrees_with_eager(base):
    x = _inputs(3, 11, 5)
    eager = vlpet_fx.patch(copy.deepcopy(base), "vlpet_large")
    with pytest.warns(GraphShapeWarning):
        gm = vlpet_fx.patch(copy.deepcopy(base), "vlpet_large", backend="graph", example_inputs=x)
    torch.testing.assert_close(gm(**x).logits, eager(**x).logits, rtol=1e-5, atol=1e-6)
