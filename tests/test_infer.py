"""predict / evaluate from a `train` run: answers equal the training loop's own validation, scores are the
sequence log-probabilities computed token by token, batching and padding change nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import vlpet_fx
from vlpet_fx.errors import VlpetError
from vlpet_fx.infer import Predictor


@pytest.fixture(scope="module")
def run(vl_run):
    return vl_run


@pytest.fixture(scope="module")
def pred(run):
    return Predictor.from_dir(run)


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pngs")
    rng = np.random.RandomState(0)
    paths = []
    for i, shape in enumerate([(28, 28), (20, 24, 3), (8, 8)]):
        p = d / f"im{i}.png"
        Image.fromarray((rng.rand(*shape) * 255).astype("uint8")).save(p)
        paths.append(p)
    return paths


def test_evaluate_reproduces_the_training_loops_validation(run, pred):
    """The run's own val examples, greedy: the same predictions and scores as train's final evaluation."""
    res = vlpet_fx.evaluate(pred, tasks=["vqa", "nlvr"], n=4, split="val")
    saved = [json.loads(ln) for ln in (run / "predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in res["predictions"]] == [r["prediction"] for r in saved]
    assert [r["target"] for r in res["predictions"]] == [r["target"] for r in saved]
    report = json.loads((run / "report.json").read_text())
    assert res["scores"] == report["scores"]
    assert res["examples"] == 8


def test_logprob_is_the_token_by_token_sum(pred, pngs):
    """An independent computation: decode step by step from the model's forward, summing log-softmax."""
    a = vlpet_fx.predict(pred, "vqa: what is this?", [pngs[0]], max_new_tokens=5)
    model, tok = pred.model, pred.tok
    from vlpet_fx.infer.generate import pixel_inputs

    inputs = pixel_inputs(model, tok, ["vqa: what is this?"], [[vlpet_fx.infer.read_image(pngs[0])]], "cpu")
    dec = torch.zeros(1, 1, dtype=torch.long)
    total, n = 0.0, 0
    with torch.no_grad():
        for _ in range(5):
            logp = torch.log_softmax(model(**inputs, decoder_input_ids=dec).logits[0, -1].double(), -1)
            nxt = int(logp.argmax())
            total += float(logp[nxt])
            n += 1
            dec = torch.cat([dec, torch.tensor([[nxt]])], dim=1)
            if nxt == tok.eos_token_id:
                break
    assert a.tokens == n
    assert a.logprob == pytest.approx(total, abs=1e-4)
    assert a.answer == tok.decode(dec[0], skip_special_tokens=True)
    assert a.mean_logprob == pytest.approx(total / n, abs=1e-5)


def test_batch_of_jsonl_rows_equals_one_by_one(pred, pngs, tmp_path):
    """Prompts of one token length (text padding would move the visual tokens' relative positions in T5) and
    different image counts: the padded image slots are masked out exactly."""
    rows = [{"images": [str(pngs[0])], "input": "what is this?", "target": "one", "task": "vqa"},
            {"images": [str(pngs[1]), str(pngs[2])], "input": "the two match.", "target": "true",
             "task": "nlvr"},
            {"images": [str(pngs[2])], "input": "is this two?", "target": "no", "task": "vqa"}]
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    batch = vlpet_fx.predict(pred, data=f, batch_size=3, max_new_tokens=4)
    single = [vlpet_fx.predict(pred, f"{r['task']}: {r['input']}", r["images"], max_new_tokens=4) for r in rows]
    assert [b.answer for b in batch] == [s.answer for s in single]
    for b, s in zip(batch, single):
        assert b.logprob == pytest.approx(s.logprob, abs=1e-4)
    assert batch[1].prompt == "nlvr: the two match."
    assert len({len(pred.tok(b.prompt)["input_ids"]) for b in batch}) == 1


def test_beam_search_and_unknown_words(pred, pngs):
    a = vlpet_fx.predict(pred, "vqa: what zebra is this?", [pngs[0]], num_beams=3, max_new_tokens=4)
    assert a.unknown_words == ["zebra"]
    assert 1 <= a.tokens <= 4 and a.logprob < 0
    with pytest.raises(VlpetError, match="num_beams"):
        vlpet_fx.predict(pred, "vqa: what?", [pngs[0]], num_beams=0)


def test_evaluate_writes_predictions_and_scores_at_once(pred, tmp_path):
    out = tmp_path / "ev"
    res = vlpet_fx.evaluate(pred, tasks=["vqa"], n=3, out=out)
    assert sorted(p.name for p in out.iterdir()) == ["predictions.jsonl", "scores.json"]
    doc = json.loads((out / "scores.json").read_text())
    assert doc["scores"] == res["scores"] and doc["examples"] == 3
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 3
    # exact match recomputed from the written predictions
    rows = [json.loads(ln) for ln in lines]
    em = 100 * sum(r["prediction"].strip() == r["target"] for r in rows) / 3
    assert doc["scores"]["vqa"]["exact_match"] == pytest.approx(em)
    with pytest.raises(VlpetError, match="not empty"):
        vlpet_fx.evaluate(pred, tasks=["vqa"], n=3, out=out)


def test_adapters_export_of_a_run_carries_the_tokenizer_and_loads_with_a_base(run, pred, pngs, tmp_path):
    from vlpet_fx.export import export

    export(run, "adapters", tmp_path / "ad")
    assert (tmp_path / "ad" / "tokenizer" / "tokenizer.json").is_file()
    again = Predictor.from_dir(tmp_path / "ad")
    a = vlpet_fx.predict(again, "vqa: what is this?", [pngs[0]], max_new_tokens=4)
    b = vlpet_fx.predict(pred, "vqa: what is this?", [pngs[0]], max_new_tokens=4)
    assert (a.answer, a.logprob) == (b.answer, pytest.approx(b.logprob, abs=1e-5))
    # the base given explicitly (an nn.Module), instead of the manifest's reference
    from vlpet_fx.export.patched_dir import load_base, read_manifest

    base = load_base(read_manifest(tmp_path / "ad"))
    c = vlpet_fx.predict(Predictor.from_dir(tmp_path / "ad", base=base), "vqa: what is this?", [pngs[0]],
                         max_new_tokens=4)
    assert c.answer == b.answer


def test_a_base_with_other_weights_is_refused(run, pred):
    from vlpet_fx.vl import build_vl

    other = build_vl("t5", "tiny", vocab_size=len(pred.tok), seed=5)
    with pytest.raises(VlpetError, match="weights"):
        Predictor.from_dir(run, base=other)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "vlpet_fx.cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_cli_predict_and_evaluate(run, pngs, tmp_path):
    res = _cli("predict", run, "--image", pngs[0], "--image", pngs[1], "--prompt", "nlvr: the two are the same.",
               "--format", "json", "--max-new-tokens", "3")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert set(doc) == {"prompt", "answer", "logprob", "tokens", "mean_logprob", "unknown_words"}
    res = _cli("evaluate", run, "--task", "vqa", "--n", "2", "--format", "json", "--out", tmp_path / "e")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc == json.loads((tmp_path / "e" / "scores.json").read_text())
    # user errors: one line, exit 2, nothing written
    for args in [("predict", run, "--prompt", "vqa: what?"),
                 ("predict", run, "--prompt", "vqa: what?", "--image", tmp_path / "missing.png"),
                 ("predict", tmp_path, "--prompt", "vqa: what?", "--image", pngs[0]),
                 ("evaluate", run, "--task", "vqa", "--num-beams", "0", "--out", tmp_path / "never")]:
        res = _cli(*args)
        assert res.returncode == 2, (args, res.stderr)
        assert res.stderr.startswith("error:") and "Traceback" not in res.stderr
    assert not (tmp_path / "never").exists()


def test_a_base_that_carries_pet_modules_is_refused(run):
    from vlpet_fx.infer.loading import load_base_model

    with pytest.raises(VlpetError, match="carries PET modules"):
        load_base_model(run)
