"""bench/placement.py (the decoder-placement factor): a hybrid rule set keeps one method's placements and trainable
norms on the encoder and the other's on the decoder, checked by planning it on a small T5 against the two source
rule sets planned separately; the study run's command is reused with only --rules and --out changed."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest
import transformers as tf
import yaml

import vlpet_fx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import placement as pl  # noqa: E402
import quality as q  # noqa: E402


@pytest.fixture(scope="module")
def t5():
    return tf.T5ForConditionalGeneration(tf.T5Config(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2,
                                                     num_decoder_layers=2, vocab_size=64))


def _shipped(name: str) -> dict:
    return yaml.safe_load(vlpet_fx.load_rules(name).text)


def _by_stack(p) -> dict[str, set]:
    out: dict[str, set] = {"encoder": set(), "decoder": set()}
    for pl_ in p.placements:
        out[pl_.site.stack].add((pl_.site.key, pl_.placement, pl_.method, pl_.params))
    return out


def _norms(p, stack: str) -> set:
    return {n for n in p.trainable if f"{stack}." in n}


@pytest.mark.parametrize("enc, dec", [("vlpet_large_t5", "vl_adapter"), ("vl_adapter", "vlpet_large_t5")])
def test_hybrid_takes_each_side_from_its_source(t5, enc, dec):
    hybrid = pl.hybrid_rules(_shipped(enc), _shipped(dec), "hybrid")
    ruleset = vlpet_fx.rules.parse_rules(yaml.safe_dump(hybrid, sort_keys=False), "<hybrid>")
    table = vlpet_fx.discover(t5)
    got = vlpet_fx.plan(t5, ruleset, table=table)
    from_enc = vlpet_fx.plan(t5, enc, table=table)
    from_dec = vlpet_fx.plan(t5, dec, table=table)
    assert _by_stack(got)["encoder"] == _by_stack(from_enc)["encoder"] != set()
    assert _by_stack(got)["decoder"] == _by_stack(from_dec)["decoder"] != set()
    assert _norms(got, "encoder") == _norms(from_enc, "encoder")
    assert _norms(got, "decoder") == _norms(from_dec, "decoder")
    # the parameter count is the two halves' sum (the placements carry their own counts)
    assert sum(p.params for p in got.placements) == \
        sum(p.params for p in from_enc.placements if p.site.stack == "encoder") + \
        sum(p.params for p in from_dec.placements if p.site.stack == "decoder")


def test_the_two_hybrids_differ_in_the_decoder_only():
    a = pl.hybrid_rules(_shipped("vlpet_large_t5"), _shipped("vl_adapter"), "a")
    b = pl.hybrid_rules(_shipped("vlpet_large_t5"), _shipped("vlpet_large_t5"), "b")
    enc = [r for r in a["rules"] if r["select"]["stack"] == "encoder"]
    assert enc == [r for r in b["rules"] if r["select"]["stack"] == "encoder"]
    assert [r["select"]["stack"] for r in b["rules"]].count("decoder") == 1  # VL-PET's one value adapter


def test_command_is_the_study_runs_with_rules_and_out_replaced(tmp_path):
    run = tmp_path / "t5" / "vl_adapter" / "seed1"
    run.mkdir(parents=True)
    stored = ["/elsewhere/vlpet-fx", "train", "--out", str(run), "--init-from", "bb", "--rules", "old.yaml",
              "--seed", "1", "--lr", "0.0003", "--recipe", "paper", "--save-every", "250", "--resume"]
    (run / "command.txt").write_text(shlex.join(stored) + "\n")
    cmd = pl.command_for(run, Path("new.yaml"), tmp_path / "h")
    assert cmd[:len(q.cli())] == q.cli()
    assert q.train_args(cmd) == ["train", "--out", str(tmp_path / "h"), "--init-from", "bb", "--rules", "new.yaml",
                                 "--seed", "1", "--lr", "0.0003", "--recipe", "paper"]
    assert "--resume" not in cmd


def test_train_loss_is_the_mean_of_the_last_steps(tmp_path):
    rows = [{"step": s, "loss": float(s)} for s in range(1, 201)] + [{"step": 200, "eval": "vqa", "exact_match": 1}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(__import__("json").dumps, rows)) + "\n")
    assert pl.train_loss(tmp_path, last=100) == pytest.approx(sum(range(101, 201)) / 100)


def test_table_row_per_rule_set_with_its_seeds():
    r = {"seeds": [0, 1], "average": (40.0, 1.0), "tasks": {t: (40.0, 1.0) for t in q.TASKS},
         "train_loss_last100": (0.5, 0.01), "trainable_percent": 3.0}
    md = pl.markdown({"bart": {"vl_adapter": r, "vlpet_large": {**r, "seeds": [0], "train_loss_last100": (0.7, 0.0)}}})
    assert "| bart | vl_adapter | 2 | 3.00 | 40.0 ± 1.0 | 40.0 ± 1.0 | 40.0 ± 1.0 | 40.0 ± 1.0 | 40.0 ± 1.0 | " \
           "0.500 ± 0.010 |" in md
    assert "| bart | vlpet_large | 1 | 3.00 | 40.0 | 40.0 | 40.0 | 40.0 | 40.0 | 0.700 |" in md


@pytest.mark.parametrize("args, message", [
    (["--jobs", "0"], "--jobs 0: give at least 1"),
    (["--report-only"], "not a quality study (no rules/ inside); run bench/quality.py first"),
])
def test_bad_options_fail_in_one_line_and_write_nothing(tmp_path, monkeypatch, capsys, args, message):
    study = tmp_path / "no-study"
    monkeypatch.setattr(sys, "argv", ["placement.py", "--study", str(study), *args])
    with pytest.raises(SystemExit) as exc:
        pl.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(message) and "Traceback" not in "\n".join(err)
    assert not study.exists()


@pytest.mark.parametrize("stored, phrase", [
    (["vlpet-fx", "train", "--out", "o", "--rules", "r", "--trust-code"], "--trust-code is not what"),
    (["vlpet-fx", "train", "--out", "o", "--rules", "r", "--text", "elsewhere"], "--text is not what"),
    (["vlpet-fx", "export", "--out", "o", "--rules", "r"], "export is not what"),
    (["vlpet-fx", "train", "--out", "o"], "its form is not what"),
])
def test_a_stored_command_with_other_options_is_refused(tmp_path, stored, phrase):
    """Nothing read from a study's command.txt is passed on but the options bench/quality.py writes."""
    (tmp_path / "command.txt").write_text(shlex.join(stored) + "\n")
    with pytest.raises(SystemExit, match=phrase):
        pl.command_for(tmp_path, Path("new.yaml"), tmp_path / "h")


def test_an_unparsable_stored_command_is_refused(tmp_path):
    (tmp_path / "command.txt").write_text("vlpet-fx train --out 'unclosed\n")
    with pytest.raises(SystemExit, match="not a command"):
        pl.command_for(tmp_path, Path("new.yaml"), tmp_path / "h")


def test_a_damaged_study_rule_set_is_refused_in_one_line(tmp_path):
    bomb = "a: &a [x, x]\n" + "".join(f"{c}: &{c} [*{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    (tmp_path / "bad.yaml").write_text(bomb + "name: n\nmethods: {}\nrules: []\n")
    with pytest.raises(SystemExit, match="rerun bench/quality.py for that study"):
        pl.study_rules(tmp_path / "bad.yaml")
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(_shipped("vl_adapter")))
    assert pl.study_rules(tmp_path / "ok.yaml")["methods"]["adapter"]["reduction"] == 8


def _run(run_dir: Path, backbone: str) -> None:
    """A finished run as summarise reads it: report.json naming its backbone, and a training curve."""
    import json

    run_dir.mkdir(parents=True)
    (run_dir / "report.json").write_text(json.dumps({"main": {t: 50.0 for t in q.TASKS}, "trainable_percent": 3.0,
                                                     "backbone_sha256": backbone}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2)))


def test_hybrids_and_references_must_share_one_backbone(tmp_path):
    study, out = tmp_path / "study", tmp_path / "study" / "placement"
    for m in pl.REFERENCES:
        _run(study / "t5" / m / "seed0", "a" * 64)
    hybrid = next(iter(pl.HYBRIDS))
    _run(out / "t5" / hybrid / "seed0", "a" * 64)
    assert set(pl.summarise(study, out, ["t5"], [0])["t5"]) == {*pl.REFERENCES, hybrid}
    _run(out / "t5" / hybrid / "seed1", "b" * 64)  # a hybrid made after the backbone was trained again
    with pytest.raises(SystemExit, match=r"t5 \(references in .*study, hybrids in .*placement\): runs adapted from 2 "
                                         r"different backbones"):
        pl.summarise(study, out, ["t5"], [0, 1])
