"""Capture around modules torch.export cannot trace (vlpet_fx/capture/opaque.py): a mixture of experts that loops
over the experts its router picked is kept as one opaque call, and the graph still computes the model."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import vlpet_fx
from toy_branches import Attention
from toy_lm import TokenLM
from vlpet_fx.analysis import ops
from vlpet_fx.capture import tracer
from vlpet_fx.errors import CaptureError
from vlpet_fx.rules import parse_rules

D, F_, E, VOCAB = 32, 48, 4, 50


class LoopExperts(nn.Module):
    """Experts called one by one on the tokens routed to them, for the experts hit only (as HF's eager MoE):
    the loop's length and the slices' sizes are tensor values."""

    def __init__(self):
        super().__init__()
        self.up = nn.ModuleList(nn.Linear(D, F_) for _ in range(E))
        self.down = nn.ModuleList(nn.Linear(F_, D) for _ in range(E))

    def forward(self, x, expert, weight):
        out = torch.zeros_like(x)
        for e in torch.unique(expert).tolist():
            rows = torch.where(expert == e)[0]
            y = self.down[e](F.gelu(self.up[e](x[rows])))
            out.index_add_(0, rows, y * weight[rows, None])
        return out


class LoopMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(D, E, bias=False)
        self.experts = LoopExperts()

    def forward(self, x):
        b, t, d = x.shape
        flat = x.reshape(-1, d)
        probs = torch.softmax(self.router(flat), dim=-1)
        weight, expert = probs.max(dim=-1)
        return self.experts(flat, expert, weight).reshape(b, t, d)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = Attention(D)
        self.moe = LoopMoE()

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.moe(self.n2(x))


class LoopLM(TokenLM):
    def __init__(self, depth=2):
        super().__init__((Layer() for _ in range(depth)), D, VOCAB, lambda d: nn.Identity())


def _ids(seed):
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def loop_lm():
    torch.manual_seed(0)
    return LoopLM().eval()


@pytest.fixture(scope="module", autouse=True)
def no_draft():
    """draft_export specialises this toy's loop to the example's routing (HF's loops defeat it, see the slow
    test); without it the capture keeps the experts opaque, the path tested here."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tracer, "_draft", lambda *a, **k: None)
        yield


@pytest.fixture(scope="module")
def captured(loop_lm):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cap = vlpet_fx.capture(loop_lm, (_ids(0),))
    return cap, [str(w.message) for w in seen]


def _opaque_nodes(cap):
    return [n for n in cap.graph.nodes if ops.is_kind(n, ops.OPAQUE)]


def test_plain_export_fails_on_the_loop(loop_lm):
    """The premise: torch.export alone cannot capture this model (else the opaque path is never taken)."""
    with pytest.raises(Exception) as err, tracer._capture_mode(loop_lm, False):
        torch.export.export(loop_lm, (_ids(0),), strict=False)
    assert tracer.data_dependent(err.value)


def test_every_experts_module_is_one_opaque_call(loop_lm, captured):
    cap, messages = captured
    assert cap.opaque == ("layers.0.moe.experts", "layers.1.moe.experts")
    nodes = _opaque_nodes(cap)
    assert [cap.module_path(n) for n in nodes] == ["layers.0.moe.experts", "layers.1.moe.experts"]
    # the call reads the experts' weights: every parameter of the module is an input of its node
    state = {cap.param_of(a) for a in nodes[0].args[2]}
    assert state == {f"layers.0.moe.experts.{n}" for n, _ in loop_lm.layers[0].moe.experts.named_parameters()}
    assert any("kept as one opaque call" in m and "LoopExperts" in m for m in messages)
    assert not cap.specialised


def test_graph_computes_the_model_on_other_values(loop_lm, captured):
    """Not specialised to the example's routing: other token ids route to other experts, the graph follows."""
    cap, _ = captured
    gm = cap.exported.module()
    routed = []  # how many tokens each expert of the first layer got, per input
    hook = loop_lm.layers[0].moe.experts.register_forward_pre_hook(
        lambda _m, args: routed.append(tuple(torch.bincount(args[1], minlength=E).tolist())))
    try:
        for seed in (0, 1, 2):
            ids = _ids(seed)
            with torch.no_grad():
                torch.testing.assert_close(gm(ids), loop_lm(ids), rtol=0, atol=0)
    finally:
        hook.remove()
    assert len(set(routed)) >= 2  # the inputs did route differently (sizes a specialised graph would assert)


def test_gradients_through_the_opaque_call_equal_eager(loop_lm, captured):
    cap, _ = captured
    gm = cap.exported.module()
    ids = _ids(3)
    params = dict(loop_lm.named_parameters())
    loop_lm.zero_grad()
    loop_lm(ids).square().mean().backward()
    eager = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    loop_lm.zero_grad()
    graph_params = dict(gm.named_parameters())
    gm(ids).square().mean().backward()
    got = {n: p.grad.clone() for n, p in graph_params.items() if p.grad is not None}
    loop_lm.zero_grad()
    gm.zero_grad()
    expert_grads = [n for n in eager if ".experts." in n]
    assert expert_grads and set(expert_grads) <= set(got)
    for n in eager:
        torch.testing.assert_close(got[n], eager[n], rtol=1e-5, atol=1e-6)


def test_discovery_keeps_the_sites_around_the_opaque_call(loop_lm):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = vlpet_fx.discover(loop_lm, (_ids(0),), fast=False)
    assert table.num_layers() == {"decoder": 2}
    roles = {(s.layer, s.block, s.role): s.path for s in table}
    for layer in (0, 1):
        for role in ("q", "k", "v", "o"):
            assert roles[(layer, "self_attn", role)] == f"layers.{layer}.attn.{role}"
        # the mixture of experts is the layer's feed-forward branch; nothing inside the experts is a site
        assert roles[(layer, "ffn", "output")] == f"layers.{layer}.moe"
    assert not [s for s in table if s.path and ".experts" in s.path]


LORA = parse_rules(
    "name: lora-r4\n"
    "methods: {lora: {type: lora, rank: 4, alpha: 8, dropout: 0.0}}\n"
    "rules: [{name: qv, select: {block: self_attn, role: [q, v]}, insert: lora, placement: parallel}]\n",
    source="lora-r4")


def test_graph_back_end_patches_and_trains_around_it(loop_lm):
    base = LoopLM().eval()
    base.load_state_dict(loop_lm.state_dict())
    ids = _ids(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = vlpet_fx.patch_graph(base, LORA, example_inputs=(ids,))
    with torch.no_grad():  # LoRA's B is zero at init: the patched graph computes the model
        torch.testing.assert_close(gm(ids), loop_lm(ids), rtol=1e-5, atol=1e-6)
    gm(ids).square().mean().backward()
    trainable = [p for p in gm.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)


class DataSized(nn.Module):
    """Returns the rows whose first channel is positive: its output *shape* is a tensor value."""

    def forward(self, x):
        rows = [x[i] for i in (x[:, 0] > 0).nonzero()[:, 0]]
        return torch.stack(rows) if rows else x[:0]


class SumsRows(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.pick = DataSized()

    def forward(self, x):
        return self.lin(x) + self.pick(x).sum(0)


def test_an_output_shape_that_depends_on_values_is_refused_when_the_graph_runs():
    torch.manual_seed(0)
    model = SumsRows().eval()
    x = torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0], [2.0, 1, 1, 1]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cap = vlpet_fx.capture(model, (x,))
    assert cap.opaque == ("pick",)
    gm = cap.exported.module()
    torch.testing.assert_close(gm(x), model(x))
    torch.testing.assert_close(gm(x.flip(0)), model(x.flip(0)))  # two positive rows again: the same shape
    with pytest.raises(CaptureError, match="returned .* where the capture recorded"):
        gm(x.abs())  # three positive rows


def test_meta_device_reports_the_export_failure():
    with torch.device("meta"):
        model = LoopLM().eval()
    with pytest.raises(CaptureError) as err:
        vlpet_fx.capture(model, (torch.zeros(2, 7, dtype=torch.long, device="meta"),))
    assert "\n" not in str(err.value) and "LoopExperts" in str(err.value)


@pytest.mark.slow
def test_switch_transformers_experts_are_kept_opaque():
    tf = pytest.importorskip("transformers")
    from vlpet_fx.capture.inputs import build_example_inputs
    from vlpet_fx.zoo.tiny import tiny_config

    torch.manual_seed(0)
    model = tf.AutoModelForSeq2SeqLM.from_config(tiny_config("switch_transformers")).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cap = vlpet_fx.capture(model)
    assert cap.opaque and all(type(model.get_submodule(p)).__name__ == "SwitchTransformersExperts"
                              for p in cap.opaque)
    _, args, kwargs = build_example_inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(cap.exported.module()(*args, **kwargs)["logits"], model(*args, **kwargs).logits)


class Positions(nn.Module):
    """Computes position ids from token *values* in Python (they restart after every token 0), which torch.export
    cannot trace, unless the caller gives them; ``scale_given`` makes given ids mean something else."""

    def __init__(self, scale_given=1):
        super().__init__()
        self.scale_given = scale_given
        self.embed = nn.Embedding(VOCAB, D)
        self.pos = nn.Embedding(8, D)
        self.body = Body()

    def forward(self, ids, position_ids=None):
        if position_ids is None:
            rows = []
            for row in ids.tolist():
                p, out = 0, []
                for t in row:
                    out.append(p)
                    p = 0 if t == 0 else p + 1
                rows.append(out)
            position_ids = torch.tensor(rows)
        else:
            position_ids = position_ids * self.scale_given
        return self.body(self.embed(ids), position_ids=position_ids)


class Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos = nn.Embedding(16, D)
        self.n1 = nn.LayerNorm(D)
        self.attn = Attention(D)
        self.head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, x, position_ids):
        x = x + self.pos(position_ids)
        return self.head(x + self.attn(self.n1(x)))


class PositionsLM(nn.Module):
    def __init__(self, scale_given=1):
        super().__init__()
        self.inner = Positions(scale_given)

    def forward(self, ids, position_ids=None):
        return self.inner(ids, position_ids=position_ids)


POS_IDS = torch.tensor([[3, 0, 5, 6, 0, 7, 8], [1, 2, 0, 4, 4, 0, 9]])
EXPECTED_POSITIONS = torch.tensor([[0, 1, 0, 1, 2, 0, 1], [0, 1, 2, 0, 1, 2, 0]])


def test_index_inputs_computed_from_values_are_passed_in():
    torch.manual_seed(0)
    model = PositionsLM().eval()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cap = vlpet_fx.capture(model, (POS_IDS,))
    assert cap.opaque == ()
    args, kwargs = cap.example_inputs
    assert torch.equal(kwargs["position_ids"], EXPECTED_POSITIONS)
    assert any("position_ids it computes from tensor values given as inputs" in str(w.message) for w in seen)
    with torch.no_grad():
        torch.testing.assert_close(cap.exported.module()(POS_IDS, position_ids=EXPECTED_POSITIONS), model(POS_IDS))
    table = vlpet_fx.discover(model, captured=cap)
    assert {s.role for s in table.where(block="self_attn")} >= {"q", "k", "v", "o"}


def test_index_inputs_that_change_the_outputs_are_not_passed_in():
    torch.manual_seed(0)
    model = PositionsLM(scale_given=2).eval()  # given ids are doubled: the recorded ones would change the output
    with pytest.raises(CaptureError, match="torch.export failed in module 'inner'"):
        vlpet_fx.capture(model, (POS_IDS,))


# ---- .pt2: a program cannot hold an opaque call ------------------------------------------------------------------

def test_a_saved_program_with_opaque_calls_is_refused_by_load_pt2(captured, tmp_path):
    """The call names a module of the capturing process by a slot number: no file holds it, and a file must not
    reach a module of the loading process. Refused in one line when loaded, even in the process that captured it."""
    from vlpet_fx.errors import ExportError
    from vlpet_fx.export import load_pt2

    cap, _ = captured
    f = tmp_path / "opaque.pt2"
    torch.export.save(cap.exported, str(f))
    assert torch.export.load(str(f)) is not None  # the premise: torch saves and loads it (the refusal is ours)
    with pytest.raises(ExportError) as err:
        load_pt2(f)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"refusing '{f}': its program (models/model.json) calls "
                                                      "torch.ops.vlpet_fx.opaque.default")
    assert "--format adapters" in message and "untrusted" not in message


@pytest.fixture(scope="module")
def switch():
    tf = pytest.importorskip("transformers")
    from vlpet_fx.zoo.tiny import tiny_config

    torch.manual_seed(0)
    return tf.AutoModelForSeq2SeqLM.from_config(tiny_config("switch_transformers")).eval()


def test_pt2_export_of_a_model_with_a_data_dependent_module_is_one_line(switch):
    """Switch Transformers' experts loop over the experts the router picked (capture keeps them opaque): pt2 cannot
    hold them, and the refusal names the module, the line of the loop and the format that works."""
    from vlpet_fx.errors import ExportError
    from vlpet_fx.export.pt2 import export_programs

    with pytest.raises(ExportError) as err:
        export_programs(switch)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("cannot export to .pt2: module 'encoder.block.")
    assert "(SwitchTransformersExperts) depends on tensor values" in message and "for expert_idx in" in message
    assert message.endswith("export with --format adapters instead")
    experts = {p for p, m in switch.named_modules() if type(m).__name__ == "SwitchTransformersExperts"}
    where = message.split("module '", 1)[1].split("'", 1)[0]
    assert where in experts


@pytest.mark.slow
def test_cli_export_pt2_of_a_patched_switch_model_is_refused_in_one_line(switch, tmp_path):
    """End to end in a real process: `patch` then `export --format pt2` exits 2 with one line on stderr (the
    load's capture warning is not printed over it) and writes nothing; `--format adapters` works."""
    from badinput import assert_refused, run_cli

    switch.save_pretrained(tmp_path / "switch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code, _, stderr = run_cli("patch", str(tmp_path / "switch"), "--rules", "vlpet_large", "--out",
                                  str(tmp_path / "p"))
    assert code == 0, stderr
    code, _, stderr = run_cli("export", str(tmp_path / "p"), "--format", "pt2", "--out", str(tmp_path / "x"),
                              subprocess_=True)
    assert_refused(code, stderr, "(SwitchTransformersExperts) depends on tensor values")
    assert not (tmp_path / "x").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code, _, stderr = run_cli("export", str(tmp_path / "p"), "--format", "adapters", "--out",
                                  str(tmp_path / "a"))
    assert code == 0 and (tmp_path / "a" / "vlpet.json").is_file(), stderr
