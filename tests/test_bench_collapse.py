"""bench/collapse.py: the encoder-collapse and prompt-reading measurements, against a model made to collapse."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import collapse as c  # noqa: E402


def _model_and_tokenizer(examples):
    from vlpet_fx.data.tokenizer import build_tokenizer
    from vlpet_fx.train.batching import task_prompt
    from vlpet_fx.vl import build_vl

    texts = [task_prompt(e.task, e.input) for ex in examples.values() for e in ex] + \
        [e.target for ex in examples.values() for e in ex]
    tok = build_tokenizer(texts)
    return build_vl("bart", "tiny", vocab_size=len(tok), seed=0).eval(), tok


def test_a_collapsed_encoder_measures_one_and_a_healthy_one_less():
    examples = c.validation_examples(6, source="digits")
    model, tok = _model_and_tokenizer(examples)
    healthy = c.measure_model(model, tok, examples)
    assert -1.0 <= healthy["position_cos"] < 0.9
    assert set(healthy["tasks"]) == set(c.TASKS)
    assert all(0.0 <= t["off_task_mass"] <= 1.0 for t in healthy["tasks"].values())
    # the norm ending the encoder's last layer (BART is post-LN): gain 0, one bias -> every position gives the
    # same vector
    last = model.text.get_encoder().layers[-1].final_layer_norm
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.linspace(-1, 1, last.bias.numel()))
    collapsed = c.measure_model(model, tok, examples)
    assert collapsed["position_cos"] > 0.999


def test_off_task_mass_is_the_first_answer_tokens_of_the_other_tasks():
    """A decoder that always puts its first answer token on 'true' (NLVR's answer) has off-task mass ~1 on
    captioning and ~0 on NLVR."""
    examples = c.validation_examples(6, source="digits")
    model, tok = _model_and_tokenizer(examples)
    true_id = tok.convert_tokens_to_ids("true")
    head = model.text.get_output_embeddings()
    with torch.no_grad():
        head.weight.zero_()
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()
    bias = torch.full((head.weight.shape[0],), -30.0)
    bias[true_id] = 30.0
    hook = head.register_forward_hook(lambda mod, args, out: out + bias)
    try:
        m = c.measure_model(model, tok, examples)
    finally:
        hook.remove()
    assert m["tasks"]["caption"]["off_task_mass"] > 0.99
    assert m["tasks"]["nlvr"]["off_task_mass"] < 0.01


@pytest.mark.parametrize("args, phrase", [
    (["--n", "0"], "--n 0: give 1..10000 examples per task"),
    ([], "is not a finished training run"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, monkeypatch, capsys, args, phrase):
    (tmp_path / "not-a-run").mkdir()
    out = tmp_path / "m.json"
    monkeypatch.setattr(sys, "argv", ["collapse.py", str(tmp_path / "not-a-run"), "--json", str(out), *args])
    with pytest.raises(SystemExit) as exc:
        c.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert phrase in err[-1] and not any("Traceback" in line for line in err)
    assert not out.exists()
