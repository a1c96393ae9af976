"""The `vlpet-fx` command line: public JSON contract, pictures, model specs and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from vlpet_fx.cli.main import app

runner = CliRunner()
SITE_KEYS = {"key", "stack", "layer", "block", "role", "path", "in_features", "out_features", "out_slice"}


def run(*args):
    return runner.invoke(app, list(args))


def test_models_lists_builtins():
    res = run("models")
    assert res.exit_code == 0
    for name in ["t5", "bart", "mbart", "pegasus", "marian", "bert2bert", "clip-vit-b-32", "clip-rn50"]:
        assert name in res.output


def test_inspect_tree_has_total_line():
    res = run("inspect", "t5", "--size", "tiny")
    assert res.exit_code == 0, res.output
    assert "encoder" in res.output and "decoder" in res.output
    assert "total:" in res.output


@pytest.mark.parametrize("name", ["t5", "bart", "clip-vit-b-32"])
def test_inspect_json_contract(name):
    res = run("inspect", name, "--size", "tiny", "--format", "json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert set(doc) == {"model", "base_params", "sites"}
    assert isinstance(doc["base_params"], int) and doc["base_params"] > 0
    assert doc["sites"] and all(set(s) == SITE_KEYS for s in doc["sites"])
    assert all(s["stack"] in {"encoder", "decoder", "visual"} for s in doc["sites"])


@pytest.mark.parametrize("fmt", ["svg", "html"])
def test_inspect_picture(tmp_path, fmt):
    target = tmp_path / f"m.{fmt}"
    res = run("inspect", "bart", "--format", fmt, "--out", str(target))
    assert res.exit_code == 0, res.output
    text = target.read_text()
    assert "<svg" in text and "cross_attn" in text


def test_inspect_local_hf_directory(tmp_path):
    from vlpet_fx.zoo import build_model

    build_model("bart", "tiny").save_pretrained(tmp_path / "bart")
    res = run("inspect", str(tmp_path / "bart"), "--format", "json")
    assert res.exit_code == 0, res.output
    assert {s["stack"] for s in json.loads(res.stdout)["sites"]} == {"encoder", "decoder"}


def test_inspect_factory_spec():
    # tests/ is on sys.path through conftest.py, so `toy:build_toy` is importable
    res = run("inspect", "toy:build_toy", "--format", "json")
    # the toy says how to call it through its own `example_inputs()` method
    assert res.exit_code == 0, res.output
    sites = json.loads(res.stdout)["sites"]
    assert {s["path"] for s in sites if s["block"] == "cross_attn" and s["role"] == "v"} == {"writer.0.look.wv", "writer.1.look.wv"}


def test_inspect_factory_of_open_clip_tower(tmp_path, monkeypatch):
    (tmp_path / "mytowers.py").write_text(
        "from open_clip.transformer import VisionTransformer\n"
        "def make():\n"
        "    return VisionTransformer(image_size=32, patch_size=8, width=32, layers=3, heads=2, mlp_ratio=2.0, output_dim=16)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    res = run("inspect", "mytowers:make", "--format", "json")
    assert res.exit_code == 0, res.output
    sites = json.loads(res.stdout)["sites"]
    assert {s["layer"] for s in sites if s["stack"] == "visual"} == {0, 1, 2}


def _cli(*args):
    """Run the installed console script, to see exactly what a user sees (stderr, exit code)."""
    return subprocess.run([sys.executable, "-m", "vlpet_fx.cli.main", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["inspect", "no-such-model"], "unknown model"),
        (["inspect", "tests_bad_capture:noinputs"], "example_inputs"),
        (["inspect", "{tmp}"], "config.json"),
        (["inspect", "{tmp}/broken"], "config.json"),
        (["inspect", "no_such_pkg.mod:factory"], "no_such_pkg"),
        (["inspect", "tests_bad_capture:make"], "feed-forward blocks"),  # captured (branch fixed, a warning), no blocks
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, args, needle):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{ not json")
    (tmp_path / "tests_bad_capture.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "class Bad(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.lin = nn.Linear(4, 4)\n"
        "    def forward(self, x):\n"
        "        return self.lin(x) if x.sum() > 0 else x\n"
        "    def example_inputs(self):\n"
        "        return (torch.randn(2, 4),)\n"
        "def make():\n"
        "    return Bad()\n"
        "def noinputs():\n"
        "    return nn.Sequential(nn.Linear(2, 2))\n"
    )
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    import os

    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    res = subprocess.run([sys.executable, "-m", "vlpet_fx.cli.main", *args], capture_output=True, text=True, env=env)
    assert res.returncode == 2, (res.stdout, res.stderr)
    # one error line (a warning the library gave on the way is one line of its own)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("warning: ")]
    assert len(lines) == 1, res.stderr
    assert all(ln.startswith(("warning: ", "error: ")) for ln in res.stderr.splitlines() if ln.strip()), res.stderr
    assert "Traceback" not in res.stderr
    assert needle in lines[0].lower() or needle in lines[0]


# ---- patch ----------------------------------------------------------------------------------------------------

PLACEMENT_KEYS = {"rule", "method", "key", "stack", "layer", "block", "role", "path", "out_slice", "params"}


@pytest.mark.parametrize("rules", ["vlpet_large", "vl_adapter"])
def test_patch_dry_run_json_contract(rules):
    res = run("patch", "bart", "--rules", rules, "--dry-run", "--format", "json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert set(doc) == {"placements", "trainable_params", "pet_params", "base_params", "patched_params", "unmatched"}
    assert doc["placements"] and all(set(p) == PLACEMENT_KEYS for p in doc["placements"])
    assert sum(p["params"] for p in doc["placements"]) <= doc["trainable_params"] < doc["patched_params"]
    assert doc["patched_params"] == doc["base_params"] + doc["pet_params"]


def test_patch_dry_run_table():
    res = run("patch", "t5", "--rules", "vlpet_small", "--dry-run")
    assert res.exit_code == 0, res.output
    assert "encoder-self-attn" in res.output and "trainable" in res.output


def test_patch_out_writes_directory_and_load(tmp_path):
    res = run("patch", "t5", "--rules", "vlpet_large", "--out", str(tmp_path / "p"))
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["pet.safetensors", "vlpet.json"]
    import vlpet_fx

    m = vlpet_fx.load(tmp_path / "p")
    assert vlpet_fx.summary(m).trainable > 0


def test_inspect_marks_rule_hits(tmp_path):
    res = run("inspect", "bart", "--rules", "vlpet_large")
    assert res.exit_code == 0, res.output
    assert "●" in res.output
    res = run("inspect", "bart", "--rules", "vlpet_large", "--format", "svg", "--out", str(tmp_path / "x.svg"))
    assert res.exit_code == 0 and "selected by the rules" in (tmp_path / "x.svg").read_text()


@pytest.mark.parametrize("args, needle", [
    (["patch", "t5", "--rules", "missing/file.yaml", "--dry-run"], "does not exist"),
    (["patch", "t5", "--rules", "nope", "--dry-run"], "unknown rule set"),
    (["patch", "t5", "--rules", "lora", "--dry-run"], "does not fit"),  # rank 128 > d_model 64
    (["patch", "t5", "--rules", "{tmp}/bad.yaml", "--dry-run"], "unknown key"),
    (["patch", "t5", "--rules", "vlpet_large", "--out", "{tmp}/full"], "not empty"),
    (["patch", "t5", "--rules", "vlpet_large"], "--out"),
])
def test_patch_bad_input_one_line_exit_2(tmp_path, args, needle):
    (tmp_path / "bad.yaml").write_text("name: x\nrulez: []\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    res = subprocess.run([sys.executable, "-m", "vlpet_fx.cli.main", *args], capture_output=True, text=True)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert needle in lines[0]
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
