"""The command line says what it does: every option has help, no help text loses characters to markup, no flag
is silently ignored, --format json where results are printed (field names: docs/CLI.md), plain progress lines
in a log, and importing the library changes no process-wide setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from vlpet_fx.cli.main import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _commands():
    group = typer.main.get_command(app)
    return {name: group.get_command(None, name) for name in group.list_commands(None)}


def test_every_option_and_argument_has_help():
    missing = [f"{name} {p.opts[0] if p.opts else p.name}" for name, cmd in _commands().items()
               for p in cmd.params if not (getattr(p, "help", None) or "").strip() and p.name != "help"]
    assert not missing, missing
    assert {"predict", "evaluate", "serve", "train", "report", "export", "patch", "inspect"} <= set(_commands())


def test_help_text_is_printed_as_written():
    res = run("train", "--help")
    assert res.exit_code == 0
    flat = " ".join(res.output.replace("│", " ").split())
    assert "ARCH[@local-checkpoint]" in flat
    assert "0 turns it off" in flat and "0 turns checkpoints off" in flat


def test_error_messages_keep_their_brackets(tmp_path):
    res = run("report", tmp_path / "[bold]run[/]")
    assert res.exit_code == 2
    assert "[bold]run[/]" in res.output


def test_inspect_json_with_rules_has_the_hits_and_out_writes_it(tmp_path):
    res = run("inspect", "t5", "--format", "json", "--rules", "vlpet_large")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert set(doc) == {"model", "base_params", "sites", "hits", "unmatched"}
    plan = json.loads(run("patch", "t5", "--rules", "vlpet_large", "--dry-run", "--format", "json").stdout)
    assert doc["hits"] == plan["placements"] and doc["base_params"] == plan["base_params"]
    assert doc["unmatched"] == plan["unmatched"]
    res = run("inspect", "t5", "--format", "json", "--out", tmp_path / "t.json")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "t.json").read_text())["base_params"] == doc["base_params"]
    res = run("inspect", "t5", "--out", tmp_path / "tree.txt")
    assert res.exit_code == 2 and "--format" in res.output and not (tmp_path / "tree.txt").exists()


def test_patch_json_without_dry_run_says_what_was_written(tmp_path):
    res = run("patch", "t5", "--rules", "vlpet_large", "--out", tmp_path / "p", "--format", "json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["out"] == str(tmp_path / "p") and (tmp_path / "p" / "vlpet.json").is_file()
    import vlpet_fx

    s = vlpet_fx.summary(vlpet_fx.load(tmp_path / "p"))
    assert (doc["trainable_params"], doc["patched_params"]) == (s.trainable, s.total)
    assert doc["patched_params"] == doc["base_params"] + doc["pet_params"]


def test_train_json_summary_and_plain_progress_lines(tmp_path):
    out = tmp_path / "r"
    res = subprocess.run([sys.executable, "-m", "vlpet_fx.cli.main", "train", "--out", str(out), "--steps", "5",
                          "--save-every", "0", "--eval-every", "0", "--source", "digits", "--task", "vqa",
                          "--train-per-task", "16", "--eval-per-task", "2", "--batch-size", "8", "--log-every", "2",
                          "--format", "json"], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout) == json.loads((out / "report.json").read_text())
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("train step ")]
    assert [ln.split()[2] for ln in lines] == ["2/5", "4/5", "5/5"]
    rep = run("report", out, "--format", "json")
    assert rep.exit_code == 0, rep.output
    row = json.loads(rep.stdout)["runs"][0]
    assert row["main"] == json.loads(res.stdout)["main"] and row["run"] == str(out)


def test_importing_and_building_changes_no_process_setting(tmp_path):
    code = """
import logging, os, warnings
os.environ.pop("HF_HUB_OFFLINE", None)
level = logging.getLogger().level
import vlpet_fx, vlpet_fx.cli.main
from vlpet_fx.zoo import build_model, load_model
build_model("clip-rn50", "small")
import transformers as tf
m = tf.T5ForConditionalGeneration(tf.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=64))
m.save_pretrained(r"%s")
load_model(r"%s")
assert logging.getLogger().level == level, logging.getLogger().level
assert "HF_HUB_OFFLINE" not in os.environ
print("ok")
""" % (tmp_path / "t5", tmp_path / "t5")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


IGNORED = [
    # train: the built-in task options mean nothing with --data, the data-file options nothing without it
    (["train", "--data", "{d}", "--task", "vqa"], "--task has no effect with --data"),
    (["train", "--data", "{d}", "--source", "digits", "--train-per-task", "3"],
     "--source --train-per-task have no effect with --data"),
    (["train", "--data", "{d}", "--eval-per-task", "3"], "--eval-per-task has no effect with --data"),
    (["train", "--eval-data", "{d}"], "--eval-data has no effect without --data"),
    (["train", "--on-bad-rows", "skip"], "--on-bad-rows has no effect without --data"),
    (["train", "--epochs", "2", "--steps", "3"], "--steps has no effect with --epochs"),
    (["train", "--init-from", "{t}/backbone", "--text", "bart"], "--text has no effect with --init-from"),
    (["train", "--init-from", "{t}/backbone", "--tokens-per-image", "1"], "--tokens-per-image has no effect with"),
    (["train", "--trust-factory"], "--trust-factory has no effect without --init-from"),
    (["evaluate", "{t}/run", "--data", "{d}", "--split", "val"], "--split has no effect with --data"),
    (["evaluate", "{t}/run", "--data", "{d}", "--n", "3", "--seed", "1"], "--n --seed have no effect with --data"),
    (["evaluate", "{t}/run", "--task", "vqa", "--on-bad-rows", "skip"], "--on-bad-rows has no effect without"),
    (["predict", "{t}/run", "--prompt", "vqa: what?", "--image", "{d}", "--batch-size", "2"],
     "--batch-size has no effect without --data"),
]


@pytest.mark.parametrize("args, phrase", IGNORED, ids=[" ".join(a) for a, _ in IGNORED])
def test_an_option_the_mode_does_not_read_is_refused(tmp_path, args, phrase):
    """No flag is silently ignored: one line naming it and the fix, exit 2, nothing written."""
    d = tmp_path / "d.jsonl"
    d.write_text('{"images": ["a.png"], "input": "x", "target": "y", "task": "mine"}\n')
    argv = [a.replace("{d}", str(d)).replace("{t}", str(tmp_path)) for a in args]
    if argv[0] == "train":
        argv += ["--out", str(tmp_path / "out")]
    res = run(*argv)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert phrase in lines[0] and (": drop" in lines[0] or ": give" in lines[0]), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]
