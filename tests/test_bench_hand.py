"""bench/step.py's hand-written reference (bench/hand.py) is the same model as the compiler's eager patch:
the same trainable count, the same outputs at the same weights, for every rule set it covers, on T5 and BART."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import vlpet_fx
from vlpet_fx.zoo import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import hand  # noqa: E402
import step  # noqa: E402

RULES = ["vlpet_large", "vlpet_middlex", "vlpet_middley", "vlpet_small", "vlpet_large_t5", "vlpet_small_t5",
         "vl_adapter"]


def _base(family):
    torch.manual_seed(0)
    return step.no_dropout(build_model(family, "tiny")).train()


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (2, 9), generator=g)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=ids[:, :4])


@pytest.mark.parametrize("rules", RULES)
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_hand_reference_equals_compiler(family, rules):
    base = _base(family)
    model = hand.hand_reference(base, rules)
    assert not any(".pet_" in n for n, _ in model.named_parameters())  # nothing from the compiler inside
    step.check_hand(model, base, rules, _inputs())  # raises SystemExit on any difference
    out = model(**_inputs()).logits
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_check_hand_catches_a_wiring_error():
    """Moving the gate's X to the wrong place (after the layer norm) is caught by the output comparison."""
    base = _base("t5")
    model = hand.hand_reference(base, "vlpet_large")
    layer = model.encoder.block[1].layer[0]
    pet = layer.vlpet
    layer.vlpet = torch.nn.Identity()  # rebuild the wiring: the gate reads the normed input instead of X
    del layer.vlpet

    class Wrong(type(layer)):
        def forward(self, hidden_states, attention_mask=None, position_bias=None, cache=None, **kwargs):
            normed = self.layer_norm(hidden_states)
            a, position_bias, w = self.SelfAttention(normed, mask=attention_mask, position_bias=position_bias,
                                                     cache=cache, **kwargs)
            return hidden_states + self.dropout(self.vlpet(normed, a)), position_bias, w

    layer.__class__ = Wrong
    layer.add_module("vlpet", pet)
    with pytest.raises(SystemExit, match="outputs differ"):
        step.check_hand(model, base, "vlpet_large", _inputs())


def test_trainable_count_mismatch_is_caught():
    base = _base("bart")
    model = hand.hand_reference(base, "vlpet_large")
    model.model.decoder.layers[0].fc1.weight.requires_grad_(True)
    with pytest.raises(SystemExit, match="trainable parameters"):
        step.check_hand(model, base, "vlpet_large", _inputs())
    assert vlpet_fx.plan(base, "vlpet_large").trainable_params == sum(
        p.numel() for p in hand.hand_reference(base, "vlpet_large").parameters() if p.requires_grad)


def test_step_inference_without_memory_of_is_refused_in_one_line(monkeypatch, capsys, tmp_path):
    """`bench/step.py --inference` only changes what --memory-of measures: alone it is refused, before any model
    is built, in one line (exit 2), and writes nothing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["step.py", "--inference", "--json", "out.json"])
    with pytest.raises(SystemExit) as exc:
        step.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--inference measures one variant's memory: give --memory-of VARIANT with it")
    assert "Traceback" not in "\n".join(err) and not any(tmp_path.iterdir())
