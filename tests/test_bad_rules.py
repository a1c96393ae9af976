"""Bad rule files, one row each: refused with one line that names the problem (exit 2 on the command line),
nothing written; plus the patch's rollback and the plan-vs-model check.

Most rows run in-process through the same calls the CLI makes (``load_rules`` then ``plan`` on a shared tiny
T5); ``CLI_ROWS`` run the real ``vlpet-fx`` in a subprocess (``inspect --rules``, ``patch --dry-run`` and
``patch --out D``, after which D must not exist).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time

import pytest
import torch

import vlpet_fx
from vlpet_fx.errors import PlanError, RulesError, VlpetError
from vlpet_fx.rules import parse_rules
from vlpet_fx.zoo import build_model

GOOD = """name: t
methods:
  a: {type: adapter, reduction: 4}
  v: {type: vlpet, dim: 16, heads: 4, gate: large, gate_dim: 16}
  lo: {type: lora, rank: 4, alpha: 8, dropout: 0.1}
rules:
  - name: r
    select: {stack: encoder, role: output}
    insert: a
"""


def _sub(old: str, new: str) -> str:
    assert old in GOOD, old
    return GOOD.replace(old, new, 1)


def _laughs(levels: int = 9) -> str:
    """The billion-laughs document: 10**levels strings from ~1 KB of YAML."""
    lines = ['name: &a0 "lol"']
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


def _nested(depth: int) -> str:
    return "name: deep\ndescription: " + "[" * depth + "]" * depth + "\n"


LONG = "x" * 2000

# (id, rules file content or a special file "@...", expected phrase). Content rows are checked through
# load_rules + plan on t5 tiny (2 encoder and 2 decoder layers, width 64); the message must start with the file.
ROWS = [
    # files: kind and size before reading
    ("dev-zero", "@/dev/zero", "is a character device, not a regular file"),
    ("fifo", "@fifo", "is a named pipe (fifo), not a regular file"),
    ("directory", "@dir", "is a directory"),
    ("missing", "@missing", "does not exist"),
    ("symlink-to-dev-zero", "@link-zero", "character device"),
    ("two-mebibytes", "@big", "at most 1,048,576 bytes"),
    ("not-utf8", b"name: caf\xe9\n", "not UTF-8 text"),
    ("empty-file", "", "a rule set is a YAML mapping"),
    ("top-level-list", "- name: t\n", "a rule set is a YAML mapping"),
    # YAML: bounded while read, no tags built, no duplicate keys
    ("billion-laughs", _laughs(), "once its aliases are expanded"),
    ("recursive-alias", "name: t\ndescription: &d [1, *d]\n", "inside its own anchor"),
    ("deep-nesting", _nested(200), "nested more than 32 levels"),
    ("duplicate-top-key", GOOD + "name: again\n", "duplicate key 'name' (first on line 1)"),
    ("duplicate-param", _sub("reduction: 4}", "reduction: 4, reduction: 8}"), "duplicate key 'reduction'"),
    ("duplicate-select-key", _sub("role: output}", "role: output, role: q}"), "duplicate key 'role'"),
    ("python-object-tag", "!!python/object/apply:os.system ['true']\n", "could not determine a constructor"),
    ("python-name-tag", _sub("name: t\n", "name: !!python/name:os.system ''\n"), "could not determine a constructor"),
    ("huge-integer", _sub("reduction: 4", "dim: " + "9" * 400), "an integer of 400 digits"),
    ("not-yaml", "name: [unclosed\n", "not valid YAML"),
    ("nul-character", "name: a\x00b\n", "not valid YAML"),
    # schema: strict types, no coercion, no empty selectors, bounded strings
    ("unknown-top-key", GOOD + "colour: red\n", "unknown key 'colour'"),
    ("name-missing", GOOD.replace("name: t\n", ""), "name: Field required"),
    ("name-not-a-string", _sub("name: t\n", "name: 5\n"), "name: Input should be a valid string"),
    ("name-too-long", _sub("name: r\n", f"name: {'r' * 300}\n"), "at most 200 characters"),
    ("layer-true", _sub("role: output}", "role: output, layers: [true]}"), "not True"),
    ("layer-float", _sub("role: output}", "role: output, layers: [1.5]}"), "not 1.5"),
    ("layer-bad-range", _sub("role: output}", "role: output, layers: ['1-x']}"), "bad layer range"),
    ("layers-empty", _sub("role: output}", "role: output, layers: []}"), "empty `layers` list selects nothing"),
    ("role-empty", _sub("role: output}", "role: []}"), "empty `role` list selects nothing"),
    ("stack-misspelt", _sub("stack: encoder", "stack: encodr"), "rules[0].select.stack"),
    ("optional-string", _sub("    insert: a\n", "    insert: a\n    optional: 'yes'\n"), "valid boolean"),
    ("path-regex-empty", _sub("role: output}", "role: output, path_regex: ''}"), "empty pattern"),
    ("path-regex-invalid", _sub("role: output}", "role: output, path_regex: '(a'}"), "not a valid RE2"),
    ("path-regex-backref", _sub("role: output}", r"role: output, path_regex: '(a)\1'}"), "no backreferences"),
    ("path-regex-too-long", _sub("role: output}", f"role: output, path_regex: '{LONG}'}}"), "at most 1000"),
    ("module-type-invalid", _sub("role: output}", "role: output, module_type: '[z-a]'}"), "not a valid RE2"),
    ("insert-unknown", _sub("insert: a", "insert: zz"), "unknown method 'zz'"),
    ("insert-missing", _sub("    insert: a\n", "    placement: after\n"), "say what to insert"),
    ("placement-sideways", _sub("    insert: a\n", "    insert: a\n    placement: sideways\n"), "placement"),
    ("lora-after", _sub("insert: a", "insert: lo"), "cannot be placed 'after'"),
    # method parameters: strict, finite, in range
    ("dim-true", _sub("reduction: 4", "dim: true"), "'dim': Input should be a valid integer"),
    ("dim-string", _sub("reduction: 4", "dim: '96'"), "'dim': Input should be a valid integer"),
    ("dim-float", _sub("reduction: 4", "dim: 96.0"), "'dim': Input should be a valid integer"),
    ("reduction-nan", _sub("reduction: 4", "reduction: .nan"), "'reduction': Input should be a finite number"),
    ("scale-inf", _sub("gate_dim: 16}", "gate_dim: 16, scale: .inf}"), "'scale': Input should be a finite number"),
    ("alpha-minus-inf", _sub("alpha: 8", "alpha: -.inf"), "'alpha': Input should be a finite number"),
    ("override-nan", _sub("    insert: a\n", "    insert: a\n    with: {scale: .nan}\n"), "rules[0].with"),
    ("reduction-zero", _sub("reduction: 4", "reduction: 0"), "'reduction': must be > 0"),
    ("heads-zero", _sub("heads: 4", "heads: 0"), "'heads': must be > 0"),
    ("rank-zero", _sub("rank: 4", "rank: 0"), "'rank': must be > 0"),
    ("dropout-one-and-a-half", _sub("dropout: 0.1", "dropout: 1.5"), "must be in [0, 1)"),
    ("unknown-param", _sub("reduction: 4", "reduce: 4"), "has no parameter 'reduce'"),
    ("unknown-activation", _sub("reduction: 4", "reduction: 4, activation: bogus"), "unknown activation"),
    ("unknown-type", _sub("type: adapter", "type: magic"), "unknown PET method 'magic'"),
    # plan time: bounds relative to the site (t5 tiny: width 64, FFN 128; 2 + 2 layers)
    ("dim-4e9", _sub("reduction: 4", "dim: 4000000000"), "'dim': 4000000000 is out of range"),
    ("dim-2e9", _sub("reduction: 4", "dim: 2000000000"), "is too wide for a site of 64 features: at most 256"),
    ("dim-257", _sub("reduction: 4", "dim: 257"), "at most 256"),
    ("gate-dim-huge", _sub("gate_dim: 16}", "gate_dim: 100000}").replace("insert: a", "insert: v"), "gate width"),
    ("heads-not-dividing", _sub("heads: 4", "heads: 3").replace("insert: a", "insert: v"), "not divisible by heads=3"),
    ("lora-rank-too-big", _sub("rank: 4", "rank: 100000").replace(
        "insert: a", "insert: lo\n    placement: parallel").replace("role: output", "role: q"), "exceeds the site"),
    ("layer-out-of-range", _sub("role: output}", "role: output, layers: [7]}"),
     "layer 7 is out of range: the encoder has 2 layers"),
    ("negative-layer-out-of-range", _sub("role: output}", "role: output, layers: {encoder: [-3]}}"),
     "layer -3 is out of range: the encoder has 2 layers"),
    ("range-out-of-range", _sub("role: output}", "role: output, layers: ['0:9']}"), "reaches outside the stack"),
    ("matches-no-site", _sub("stack: encoder", "stack: visual"), "matches no site"),
    ("catastrophic-regex-no-match", _sub("role: output}", r"role: output, path_regex: '^(\w+\.?)*!$'}"),
     "matches no site"),
    ("trainable-selects-nothing", GOOD + "trainable: [{select: {path_regex: nothing_here}}]\n",
     "selects no parameters"),
]
ROW_IDS = [r[0] for r in ROWS]
assert len(set(ROW_IDS)) == len(ROWS)


def make_rules_file(tmp_path, spec) -> str:
    """Write a row's rules file (or make the special file it names); return its path."""
    if isinstance(spec, bytes):
        f = tmp_path / "rules.yaml"
        f.write_bytes(spec)
        return str(f)
    if not spec.startswith("@"):
        f = tmp_path / "rules.yaml"
        f.write_text(spec, encoding="utf-8")
        return str(f)
    what = spec[1:]
    if what.startswith("/"):
        return what
    f = tmp_path / f"rules-{what}.yaml"
    if what == "fifo":
        os.mkfifo(f)
    elif what == "dir":
        f.mkdir()
    elif what == "link-zero":
        f.symlink_to("/dev/zero")
    elif what == "big":
        f.write_text("# " + "x" * (2 << 20) + "\n" + GOOD)
    elif what != "missing":
        raise ValueError(what)
    return str(f)


@pytest.fixture(scope="module")
def t5():
    model = build_model("t5", "tiny")
    return model, vlpet_fx.discover(model, name="t5 (tiny)")


@pytest.mark.parametrize("spec, needle", [r[1:] for r in ROWS], ids=ROW_IDS)
def test_bad_rules_refused_with_one_line(tmp_path, t5, spec, needle):
    model, table = t5
    path = make_rules_file(tmp_path, spec)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    start = time.monotonic()
    with pytest.raises(VlpetError) as info:
        vlpet_fx.plan(model, vlpet_fx.load_rules(path), table=table)
    assert time.monotonic() - start < 5.0
    msg = str(info.value)
    assert isinstance(info.value, RulesError), msg
    assert "\n" not in msg and needle in msg, msg
    assert msg.startswith(path) or f"'{path}'" in msg, msg  # names the file (and, for content, the line)
    if isinstance(spec, str) and not spec.startswith("@") and spec:
        assert msg[len(path)] == ":" and msg[len(path) + 1].isdigit(), msg
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # planning changes nothing


# the same failures through the real command line: (row id, command, expected phrase)
CLI_ROWS = [
    ("dev-zero", "inspect", "character device"),
    ("fifo", "dry-run", "named pipe"),
    ("directory", "out", "is a directory"),
    ("two-mebibytes", "inspect", "at most 1,048,576 bytes"),
    ("billion-laughs", "dry-run", "once its aliases are expanded"),
    ("billion-laughs", "out", "once its aliases are expanded"),
    ("duplicate-top-key", "inspect", "duplicate key 'name'"),
    ("python-object-tag", "out", "could not determine a constructor"),
    ("layer-true", "dry-run", "not True"),
    ("reduction-nan", "out", "finite number"),
    ("path-regex-backref", "inspect", "no backreferences"),
    ("dim-4e9", "out", "is out of range"),
    ("dim-2e9", "dry-run", "is too wide"),
    ("dim-2e9", "out", "is too wide"),
    ("layer-out-of-range", "inspect", "the encoder has 2 layers"),
    ("catastrophic-regex-no-match", "out", "matches no site"),
    ("lora-rank-too-big", "dry-run", "exceeds the site"),
]

_BY_ID = {r[0]: r for r in ROWS}


@pytest.mark.slow
@pytest.mark.parametrize("row, command, needle", CLI_ROWS, ids=[f"{r}-{c}" for r, c, _ in CLI_ROWS])
def test_bad_rules_cli_exit_2_one_line_nothing_written(tmp_path, row, command, needle):
    rules_dir = tmp_path / "in"
    rules_dir.mkdir()
    path = make_rules_file(rules_dir, _BY_ID[row][1])
    out_dir = tmp_path / "out"
    args = {"inspect": ["inspect", "t5", "--rules", path],
            "dry-run": ["patch", "t5", "--rules", path, "--dry-run"],
            "out": ["patch", "t5", "--rules", path, "--out", str(out_dir)]}[command]
    res = subprocess.run([sys.executable, "-m", "vlpet_fx.cli.main", *args], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert needle in lines[0], lines[0]
    assert not out_dir.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no half-written or hidden temporary output


def test_billion_laughs_in_a_manifest_is_refused_fast():
    """A manifest's stored rules text goes through the same loader (vlpet_fx.load → parse_rules)."""
    start = time.monotonic()
    with pytest.raises(RulesError, match="once its aliases are expanded"):
        parse_rules(_laughs(12), "patched/vlpet.json rules")
    with pytest.raises(RulesError, match="larger than 1,048,576 bytes"):
        parse_rules("#" * (1 << 20) + "\nname: t\n", "patched/vlpet.json rules")
    with pytest.raises(RulesError, match="not YAML text"):
        parse_rules(["name: t"], "patched/vlpet.json rules")  # a manifest field of the wrong type
    assert time.monotonic() - start < 1.0


def test_billion_laughs_in_a_saved_manifest(tmp_path):
    import json

    from vlpet_fx.export import save_patched
    from vlpet_fx.zoo import base_reference

    model = build_model("t5", "tiny")
    vlpet_fx.patch(model, parse_rules(GOOD))
    save_patched(model, tmp_path / "p", base_reference("t5", "tiny", 0))
    f = tmp_path / "p" / "vlpet.json"
    manifest = json.loads(f.read_text())
    manifest["rules"]["text"] = _laughs(12)
    f.write_text(json.dumps(manifest))
    start = time.monotonic()
    with pytest.raises(VlpetError, match="aliases are expanded|rules") as info:
        vlpet_fx.load(build_model("t5", "tiny"), tmp_path / "p")
    assert time.monotonic() - start < 5.0 and "\n" not in str(info.value)


def test_catastrophic_path_regex_finishes_fast(t5):
    """`^(\\w+\\.?)*!$` backtracks exponentially in Python's `re` on a module path like
    'encoder.block.0.layer.1.DenseReluDense.wi' (minutes); RE2 matches in linear time."""
    model, table = t5
    text = GOOD + "trainable:\n  - {select: {path_regex: '^(\\w+\\.?)*!$'}, optional: true}\n"
    rs = parse_rules(text.replace("role: output}", "role: output, path_regex: '^(\\w+\\.?)*[a-z]$'}"))
    start = time.monotonic()
    p = vlpet_fx.plan(model, rs, table=table)  # every module path against both patterns
    assert time.monotonic() - start < 1.0
    assert {x.site.path for x in p.placements} == {s.path for s in table if s.stack == "encoder" and s.role == "output"}
    assert p.trainable == {}


def test_yaml_base60_is_a_range_not_an_integer(t5):
    model, table = t5
    p = vlpet_fx.plan(model, parse_rules(_sub("role: output}", "role: output, layers: 1:2}")), table=table)
    assert {x.site.layer for x in p.placements} == {1}


def test_aliases_within_bounds_still_work(t5):
    model, table = t5
    text = """name: shared
methods:
  a: &pet {type: adapter, dim: 8}
  b: *pet
rules:
  - {select: &enc {stack: encoder, role: [o, out]}, insert: a}
  - {select: *enc, insert: b, placement: parallel}
"""
    p = vlpet_fx.plan(model, parse_rules(text), table=table)
    assert len(p.placements) == 2 * 2 * 2  # 2 layers x (attention o, ffn out) x (after, parallel)


# ---- patching: all or nothing, and only with the plan's own model ------------------------------------------


def _snapshot(model):
    return {
        "modules": [n for n, _ in model.named_modules()],
        "state": list(model.state_dict()),
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": {n: (list(m._forward_hooks), list(m._forward_pre_hooks), list(m._forward_hooks_with_kwargs),
                      list(m._forward_pre_hooks_with_kwargs), list(m._backward_hooks))
                  for n, m in model.named_modules()},
        "patched": hasattr(model, "vlpet_patch"),
    }


def _out(model):
    ids = torch.arange(3, 11).reshape(2, 4)
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=ids[:, :3]).logits


RULES = """name: many
methods:
  v: {type: vlpet, dim: 16, heads: 4, gate: large, gate_dim: 16}
  lo: {type: lora, rank: 4}
rules:
  - {select: {stack: encoder, role: output}, insert: v}
  - {select: {block: self_attn, role: [q, v]}, insert: lo, placement: parallel}
trainable:
  - {select: {module_type: ".*LayerNorm.*"}}
"""


@pytest.fixture
def t5_fresh():
    torch.manual_seed(0)
    model = build_model("t5", "tiny").eval()
    model.shared.weight.requires_grad_(False)  # a mixed set of flags must come back as it was
    return model


@pytest.mark.parametrize("fail_at", ["build", "freeze"])
def test_failed_patch_leaves_the_model_exactly_as_it_was(t5_fresh, monkeypatch, fail_at):
    import vlpet_fx.passes.eager as eager
    from vlpet_fx.passes import Freeze

    model = t5_fresh
    plan = vlpet_fx.plan(model, parse_rules(RULES))
    assert len(plan.placements) > 4
    before, out_before = _snapshot(model), _out(model)
    if fail_at == "build":  # the fifth PET module fails to build: four are attached with their hooks by then
        real, calls = eager.build_pet, []

        def build_pet(*a, **k):
            calls.append(1)
            if len(calls) == 5:
                raise RuntimeError("out of memory (simulated)")
            return real(*a, **k)

        monkeypatch.setattr(eager, "build_pet", build_pet)
        with pytest.raises(RuntimeError, match="simulated"):
            vlpet_fx.patch(model, plan)
        assert len(calls) == 5
    else:  # every module attached, requires_grad flags already changed, then the freeze check fails
        def ensures(self, module):
            assert any(n.startswith("encoder.block.0.layer.0.SelfAttention.pet_") for n, _ in module.named_modules())
            raise PlanError("freeze failed (simulated)")

        monkeypatch.setattr(Freeze, "ensures", ensures)
        with pytest.raises(PlanError, match="simulated"):
            vlpet_fx.patch(model, plan)
    assert _snapshot(model) == before
    assert torch.equal(_out(model), out_before)
    monkeypatch.undo()
    vlpet_fx.patch(model, plan)  # and the model can still be patched
    assert len(model.vlpet_patch.attached) == len(plan.placements)


def test_plan_for_another_model_is_refused_and_the_model_untouched(t5_fresh):
    t5_plan = vlpet_fx.plan(build_model("t5", "tiny"), parse_rules(RULES))
    bart = build_model("bart", "tiny")
    before = _snapshot(bart)
    with pytest.raises(PlanError, match="this plan was made for another model") as info:
        vlpet_fx.patch(bart, t5_plan)
    assert "\n" not in str(info.value)
    assert _snapshot(bart) == before
    small = build_model("t5", "small")  # same names, other shapes
    with pytest.raises(PlanError, match="has shape"):
        vlpet_fx.patch(small, t5_plan)
    with pytest.raises(PlanError, match="made for another model"):
        vlpet_fx.patch(bart, t5_plan, backend="graph")
    with pytest.raises(PlanError, match="does not belong to this model"):
        vlpet_fx.plan(bart, parse_rules(RULES), table=t5_plan.table)
    # the same plan on an equal model (a copy) is fine
    twin = copy.deepcopy(t5_fresh)
    vlpet_fx.patch(twin, vlpet_fx.plan(t5_fresh, parse_rules(RULES)))
    assert twin.vlpet_patch.attached


def test_failed_graph_patch_leaves_the_shared_parameters_as_they_were(t5_fresh, monkeypatch):
    """The graph back end's GraphModule shares the model's parameters; a failed freeze restores their flags."""
    from vlpet_fx.passes import Freeze

    model = t5_fresh
    before = _snapshot(model)

    def ensures(self, module):
        raise PlanError("freeze failed (simulated)")

    monkeypatch.setattr(Freeze, "ensures", ensures)
    with pytest.raises(PlanError, match="simulated"):
        vlpet_fx.patch(model, parse_rules(RULES), backend="graph")
    assert _snapshot(model) == before
