"""Optional rules that matched nothing are said, not skipped in silence: `patch` (dry run or not) and `inspect
--rules` print one line naming them on stderr, and their JSON carries them under `unmatched`.

The case that matters: a causal LM whose FFN is not found gets only the attention modules of vlpet_causal_lm (its
`decoder-ffn` rule is optional, for Mamba); the user must be told."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from badinput import run_cli
from toy_branches import Attention
from toy_lm import TokenLM

D, VOCAB = 32, 50


class AttentionOnlyLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.attn = Attention(D)

    def forward(self, x):
        return x + self.attn(self.norm(x))


class AttentionOnlyLM(TokenLM):
    """A causal LM whose layers have causal self-attention and no feed-forward sub-layer: no FFN site to find."""

    def __init__(self, depth: int = 2):
        super().__init__((AttentionOnlyLayer() for _ in range(depth)), D, VOCAB, lambda d: nn.Identity())

    def example_inputs(self):
        return (torch.arange(14).view(2, 7) % VOCAB,)


def attention_only_lm() -> AttentionOnlyLM:
    torch.manual_seed(0)
    return AttentionOnlyLM().eval()


NO_FFN = "test_unmatched:attention_only_lm"
WITH_FFN = "toy_branches:build"  # causal attention + a gated-MLP mixture of experts: every rule matches
LINE = "optional rule of vlpet_causal_lm matched no site of"


def _warnings(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip()]


def _the_line(stderr: str) -> str:
    lines = _warnings(stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith("warning: 1 " + LINE), lines[0]
    assert "'decoder-ffn'" in lines[0] and "placed nothing" in lines[0]
    return lines[0]


def test_the_premise_no_ffn_site_and_the_ffn_rule_is_optional():
    import vlpet_fx

    model = attention_only_lm()
    table = vlpet_fx.discover(model, model.example_inputs(), fast=False)
    assert table.num_layers() == {"decoder": 2} and not list(table.where(block="ffn"))
    plan = vlpet_fx.plan(model, "vlpet_causal_lm", table=table)
    assert plan.unmatched == ["decoder-ffn"]
    assert {(p.site.block, p.site.role) for p in plan.placements} == {("self_attn", "output"), ("self_attn", "v")}


@pytest.mark.parametrize("fmt", ["table", "json"])
def test_patch_dry_run_names_the_unmatched_rule(fmt):
    code, stdout, stderr = run_cli("patch", NO_FFN, "--rules", "vlpet_causal_lm", "--dry-run", "--format", fmt)
    assert code == 0, stderr
    _the_line(stderr)
    if fmt == "json":
        doc = json.loads(stdout)  # stdout is the JSON alone
        assert doc["unmatched"] == ["decoder-ffn"]
        assert {(p["block"], p["role"]) for p in doc["placements"]} == {("self_attn", "output"), ("self_attn", "v")}
    else:
        assert "matched no site" in stdout and "decoder-ffn" in stdout  # the plan table's own row


@pytest.mark.parametrize("fmt", ["table", "json"])
def test_patch_out_names_the_unmatched_rule(tmp_path, fmt):
    code, stdout, stderr = run_cli("patch", NO_FFN, "--rules", "vlpet_causal_lm", "--out", str(tmp_path / "p"),
                                   "--format", fmt)
    assert code == 0, stderr
    _the_line(stderr)
    if fmt == "json":
        doc = json.loads(stdout)
        assert doc["unmatched"] == ["decoder-ffn"] and doc["out"] == str(tmp_path / "p")
    else:
        assert stdout.startswith("wrote ")
    manifest = json.loads((tmp_path / "p" / "vlpet.json").read_text())
    assert manifest["plan"]["unmatched"] == ["decoder-ffn"]


@pytest.mark.parametrize("fmt", ["tree", "json"])
def test_inspect_with_rules_names_the_unmatched_rule(fmt):
    code, stdout, stderr = run_cli("inspect", NO_FFN, "--rules", "vlpet_causal_lm", "--full", "--format", fmt)
    assert code == 0, stderr
    _the_line(stderr)
    if fmt == "json":
        doc = json.loads(stdout)
        assert doc["unmatched"] == ["decoder-ffn"]
        assert {(h["block"], h["role"]) for h in doc["hits"]} == {("self_attn", "output"), ("self_attn", "v")}


def test_every_rule_matched_says_nothing():
    code, stdout, stderr = run_cli("patch", WITH_FFN, "--rules", "vlpet_causal_lm", "--dry-run", "--format", "json")
    assert code == 0, stderr
    assert _warnings(stderr) == []
    doc = json.loads(stdout)
    assert doc["unmatched"] == [] and ("ffn", "output") in {(p["block"], p["role"]) for p in doc["placements"]}
    code, stdout, stderr = run_cli("inspect", WITH_FFN, "--rules", "vlpet_causal_lm", "--format", "json")
    assert code == 0 and _warnings(stderr) == [] and json.loads(stdout)["unmatched"] == []


def test_several_unmatched_rules_are_all_named(tmp_path):
    rules = tmp_path / "r.yaml"
    rules.write_text(
        "name: many\n"
        "methods: {a: {type: adapter, dim: 8}}\n"
        "rules:\n"
        "  - {name: attn, select: {stack: decoder, block: self_attn, role: output}, insert: a, placement: after}\n"
        + "".join(f"  - {{name: cross-{i}, select: {{block: cross_attn, role: output}}, insert: a, "
                  f"placement: after, optional: true}}\n" for i in range(8)))
    code, stdout, stderr = run_cli("patch", NO_FFN, "--rules", str(rules), "--dry-run", "--format", "json")
    assert code == 0, stderr
    (line,) = _warnings(stderr)
    assert line.startswith("warning: 8 optional rules of many matched no site of")
    assert all(f"'cross-{i}'" in line for i in range(6)) and "'cross-6'" not in line and "and 2 more" in line
    assert json.loads(stdout)["unmatched"] == [f"cross-{i}" for i in range(8)]


def test_train_names_the_unmatched_rule(tmp_path):
    """`vlpet-fx train` says it too: the VL model's encoder-decoder has no token-mixing sub-layer, so an optional
    rule for one places nothing, and the run goes on with the rules that matched."""
    rules = tmp_path / "probe.yaml"
    rules.write_text(
        "name: probe\nmethods: {a: {type: adapter, reduction: 8}}\nrules:\n"
        "  - {name: ffn, select: {stack: encoder, block: ffn, role: output}, insert: a, placement: after}\n"
        "  - {name: mixers, select: {block: mixer, role: output}, insert: a, placement: after, optional: true}\n")
    code, stdout, stderr = run_cli("train", "--out", str(tmp_path / "run"), "--rules", str(rules), "--steps", "1",
                                   "--train-per-task", "4", "--eval-per-task", "2", "--task", "vqa", "--batch-size",
                                   "4", "--eval-every", "0", "--save-every", "0", "--source", "digits")
    assert code == 0, stderr
    (line,) = [ln for ln in (stdout + stderr).splitlines() if ln.startswith("warning:")]
    assert line.startswith("warning: 1 optional rule of probe matched no site of") and "'mixers'" in line
    plan = json.loads((tmp_path / "run" / "model" / "vlpet.json").read_text())["plan"]
    assert plan["unmatched"] == ["mixers"]
    assert {(p["stack"], p["block"]) for p in plan["placements"]} == {("encoder", "ffn")}  # the rule that matched
