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


def test_capture_error_names_the_module_the_line_and_a_fix():
    # on the meta device there are no values to decide the branch with, so capture cannot fall back to the branch
    # the example inputs take: the error names the module, the source line and the fix for a branch on data
    with pytest.raises(vlpet_fx.CaptureError) as info:
        vlpet_fx.capture(Branchy().to("meta"), (torch.randn(2, 4, device="meta"),))
    msg = str(info.value)
    assert "module 'gate' (Inner)" in msg  # the module, by path and class
    assert "GuardOnDataDependentSymNode" in msg  # the exception's type and first line
    assert "test_capture.py:" in msg and "`if y.sum() > 0:`" in msg  # the model's own line
    assert "fix: that forward branches on tensor values" in msg and "torch.where / torch.cond" in msg
    assert "\n" not in msg.strip()


def test_a_branch_on_data_is_captured_as_the_example_inputs_take_it_and_asserted():
    torch.manual_seed(0)
    model = Branchy()
    x = torch.randn(2, 4)
    with pytest.warns(UserWarning, match="data-dependent branches fixed by the example inputs"):
        cap = vlpet_fx.capture(model, (x,))
    assert cap.specialised and "`if y.sum() > 0:`" in cap.specialised[0]
    gm = cap.exported.module()
    torch.testing.assert_close(gm(x), model(x))
    with torch.no_grad():
        w, b = model.gate.lin.weight, model.gate.lin.bias
        # an input on the other side of the branch: x + t * d moves sum(lin(.)) by t * sum(W d), past zero
        d = torch.ones(2, 4)
        t = -2 * float((model.gate.lin(x).sum()) / (w @ d[0]).sum() / 2)
        other = x + t * d
        assert (model.gate.lin(other).sum() > 0) != (model.gate.lin(x).sum() > 0)
    with pytest.raises(RuntimeError):  # the other branch is refused at run time, never computed as the captured one
        gm(other)


class ExpertLoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    def forward(self, x, picked):
        out = torch.zeros_like(x)
        for i in picked.unique():  # a loop over the experts a router picked
            out = out + self.experts[int(i)](x)
        return out


def test_a_loop_over_data_gets_the_fix_for_loops():
    model = ExpertLoop().to("meta")
    with pytest.raises(vlpet_fx.CaptureError) as info:
        vlpet_fx.capture(model, (torch.randn(2, 4, device="meta"), torch.tensor([0, 2], device="meta")))
    msg = str(info.value)
    assert "fix: that forward loops over values read from tensors" in msg, msg
    assert "\n" not in msg.strip()


class SelfConverting(nn.Module):
    """Converts its own layer in forward, as some MoE routers do (to the dtype it already has)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        self.lin = self.lin.to(torch.float32)
        return self.lin(x)


def test_a_module_converting_itself_to_its_own_dtype_is_captured():
    model = SelfConverting()
    x = torch.randn(2, 4)
    original = nn.Module.to
    cap = vlpet_fx.capture(model, (x,))
    assert not cap.specialised
    torch.testing.assert_close(cap.exported.module()(x), model(x))
    assert nn.Module.to is original  # torch's method is back after capture
    assert model.to(torch.float64).lin.weight.dtype == torch.float64


def test_captures_on_two_threads_leave_torchs_to_in_place_whichever_ends_first():
    import threading

    from vlpet_fx.capture.tracer import _no_op_conversions

    original = nn.Module.to
    entered, release = threading.Event(), threading.Event()
    seen = {}

    def second_capture():
        model = nn.Linear(2, 2)
        with _no_op_conversions(model):
            entered.set()
            release.wait(10)
            seen["no-op"] = model.to(torch.float32) is model
        seen["after"] = nn.Module.to

    t = threading.Thread(target=second_capture)
    with _no_op_conversions(nn.Linear(2, 2)):
        t.start()
        entered.wait(10)
    # this thread's capture ended first; the other is still running and keeps the swap
    assert nn.Module.to is not original
    outside = nn.Linear(2, 2)
    assert outside.to(torch.float64).weight.dtype == torch.float64  # other modules convert for real
    release.set()
    t.join()
    assert seen == {"no-op": True, "after": original}
    assert nn.Module.to is original  # restored when the last capture ended (a saved-and-restored swap leaks here)


def test_capture_needs_inputs_for_unknown_modules():
    with pytest.raises(vlpet_fx.CaptureError, match="example_inputs"):
        vlpet_fx.capture(nn.Sequential(nn.Linear(3, 3)))


def test_discovery_error_when_there_is_no_attention():
    with pytest.raises(vlpet_fx.DiscoveryError):
        vlpet_fx.discover(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)), (torch.randn(2, 3),))
