import pytest
import torch
from torch import nn

import vlpet_fx
from toy import ToySeq2Seq
from vlpet_fx.analysis.ops import LINEAR, is_kind
from vlpet_fx.zoo import build_model


def test_capture_maps_nodes_to_modules_and_parameters():
    model = build_model("t5", "tiny")
    cap = vlpet_fx.capture(model)
    assert isinstance(cap.graph_module, torch.fx.GraphModule)
    names = dict(model.named_parameters(remove_duplicate=False))  # lm_head.weight is tied to shared.weight
    linear_params = set()
    for node in cap.graph.nodes:
        if is_kind(node, LINEAR):
            p = cap.param_of(node.args[1])
            assert p in names, node
            linear_params.add(p)
            assert cap.module_path(node) is not None
    assert "encoder.block.0.layer.0.SelfAttention.q.weight" in linear_params
    assert "decoder.block.1.layer.1.EncDecAttention.v.weight" in linear_params


def test_capture_user_inputs():
    model = ToySeq2Seq()
    cap = vlpet_fx.capture(model, ToySeq2Seq.example_inputs())
    assert len(cap.user_input_nodes()) == 2


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Inner()

    def forward(self, x):
        return self.gate(x)


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        if y.sum() > 0:  # data-dependent control flow: cannot be captured
            return y
        return -y


def test_capture_error_names_the_module_and_a_fix():
    with pytest.raises(vlpet_fx.CaptureError) as info:
        vlpet_fx.capture(Branchy(), (torch.randn(2, 4),))
    msg = str(info.value)
    assert "module 'gate' (Inner)" in msg  # the module, by path and class
    assert "fix: remove data-dependent Python control flow from that forward (use torch.where / torch.cond)" in msg
    assert "\n" not in msg.strip()


def test_capture_needs_inputs_for_unknown_modules():
    with pytest.raises(vlpet_fx.CaptureError, match="example_inputs"):
        vlpet_fx.capture(nn.Sequential(nn.Linear(3, 3)))


def test_discovery_error_when_there_is_no_attention():
    with pytest.raises(vlpet_fx.DiscoveryError):
        vlpet_fx.discover(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)), (torch.randn(2, 3),))
