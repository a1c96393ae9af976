"""Issue 11, classes 1, 2 (and the manifest/factory lines of 7, 8): nothing a file names is imported, called or
unpickled, and every damaged manifest, weights file or .pt2 archive ends in one line.

One table, one row per bad input: how to damage a copy of a good patched directory (or .pt2 file, or factory
module), what to run (the real CLI in a subprocess, or the Python API), the phrase the one-line error must hold;
every row also checks that nothing was written and that no marker file (written by code that must never run)
appeared.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import vlpet_fx
from vlpet_fx.errors import VlpetError
from vlpet_fx.export import load_pt2, save_patched
from vlpet_fx.export.manifest import MAX_INIT_FROM_DEPTH, sha256_text
from vlpet_fx.zoo import base_reference, build_model

MANIFEST = "vlpet.json"

# a module placed next to a manifest: importing it writes the marker file named by $VLPET_TEST_MARKER
EVIL_MODULE = """
import os
open(os.environ.get("VLPET_TEST_MARKER", "marker-imported"), "w").write("imported")
def make():
    open(os.environ.get("VLPET_TEST_MARKER", "marker-imported") + ".called", "w").write("called")
    raise RuntimeError("the factory ran")
"""

USER_FACTORIES = """
import torch
def boom():
    raise RuntimeError("no GPU here")
def needs(d, heads):
    return torch.nn.Linear(d, d)
def notmodule():
    return 3
"""


class Evil:
    """Unpickling this creates the marker file (pickle calls ``open(marker, "w")``)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---- shared, built once ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A genuine patched directory (t5 tiny + VL-PET), laid out as a training run: run/model/{vlpet.json,...}."""
    root = tmp_path_factory.mktemp("good")
    m = build_model("t5", "tiny")
    vlpet_fx.patch(m, "vlpet_large")
    save_patched(m, root / "run" / "model", base_reference("t5", "tiny", 0))
    (root / "run" / "tokenizer").mkdir()
    return root / "run"


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)

    def forward(self, x):
        return self.lin(x) * 2


@pytest.fixture(scope="module")
def good_pt2(tmp_path_factory) -> Path:
    """A genuine .pt2 (dynamic batch, so its program holds shape expressions)."""
    f = tmp_path_factory.mktemp("pt2") / "model.pt2"
    ep = torch.export.export(Tiny(), (torch.randn(2, 3),),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    torch.export.save(ep, str(f))
    return f


# ---- damage helpers -------------------------------------------------------------------------------------------

def edit(fn):
    """Damage: load the manifest, let ``fn(doc, run)`` change it, write it back (rules sha kept consistent only
    where fn says so)."""

    def damage(run: Path, marker: Path) -> None:
        f = run / "model" / MANIFEST
        doc = json.loads(f.read_text())
        out = fn(doc, run)
        f.write_text(json.dumps(doc if out is None else out))

    return damage


def write(text: str | bytes):
    def damage(run: Path, marker: Path) -> None:
        f = run / "model" / MANIFEST
        f.write_bytes(text if isinstance(text, bytes) else text.encode())

    return damage


def drop(*path):
    def fn(doc, run):
        d = doc
        for p in path[:-1]:
            d = d[p]
        del d[path[-1]]

    return edit(fn)


def put(value, *path):
    def fn(doc, run):
        d = doc
        for p in path[:-1]:
            d = d[p]
        d[path[-1]] = value(run) if callable(value) else value

    return edit(fn)


def base(b):
    return put(lambda run: b(run) if callable(b) else b, "base")


def vl_base(**over):
    def make(run):
        doc = {"kind": "vl", "spec": "vl", "text": "t5", "size": "tiny", "visual": "clip-vit-b-32",
               "visual_size": "tiny", "vocab_size": 64, "seed": 0, "tokens_per_image": None, "init_from": None}
        doc.update({k: (v(run) if callable(v) else v) for k, v in over.items()})
        return doc

    return base(make)


def evil_module_next_to_manifest(b):
    def damage(run, marker):
        (run / "model" / "evilmod.py").write_text(EVIL_MODULE)
        base(b)(run, marker)

    return damage


def replace_manifest(kind):
    def damage(run, marker):
        f = run / "model" / MANIFEST
        f.unlink()
        if kind == "dir":
            f.mkdir()
        elif kind == "fifo":
            os.mkfifo(f)
        elif kind == "loop":
            f.symlink_to(MANIFEST)
        elif kind == "huge":
            with open(f, "wb") as fh:
                fh.truncate(33 << 20)  # sparse: big on paper, nothing on disk

    return damage


def weights(kind):
    def damage(run, marker):
        w = run / "model" / "pet.safetensors"
        data = w.read_bytes()
        w.unlink()
        if kind == "truncated":
            w.write_bytes(data[: len(data) // 2])
        elif kind == "dir":
            w.mkdir()
        elif kind == "fifo":
            os.mkfifo(w)
        elif kind == "garbage-with-matching-checksum":
            junk = b"\xff" * 64
            w.write_bytes(junk)
            put(__import__("hashlib").sha256(junk).hexdigest(), "weights_sha256")(run, marker)
        elif kind == "pickle-with-matching-checksum":
            blob = pickle.dumps(Evil(str(marker)))
            w.write_bytes(blob)
            put(__import__("hashlib").sha256(blob).hexdigest(), "weights_sha256")(run, marker)

    return damage


def chain(n):
    """n copies of the run, each initialised from the next (a chain deeper than allowed)."""

    def damage(run, marker):
        runs = [run] + [run.parent / f"r{i}" for i in range(1, n)]
        for r in runs[1:]:
            shutil.copytree(run, r)
        for r, nxt in zip(runs, runs[1:] + [run.parent / "r-end"]):
            vl_base(init_from=str(nxt))(r, marker)

    return damage


def two_cycle(run, marker):
    other = run.parent / "other"
    shutil.copytree(run, other)
    vl_base(init_from=str(other))(run, marker)
    vl_base(init_from=str(run))(other, marker)


def hex64(c="a"):
    return c * 64


# ---- rows: (id, damage, how to run it, expected phrase in the one-line error) ---------------------------------
# how: "cli-export" runs `vlpet-fx export run/model --format adapters --out out` in a subprocess (cwd and
# PYTHONPATH = the model directory, so a module placed there WOULD be importable); "cli-train" runs
# `vlpet-fx train --init-from run --out out` the same way; "load" calls vlpet_fx.load(run/model); "backbone"
# the training loop's --init-from loader.

ROWS = [
    # class 1: a directory must not run code
    ("factory-os-abort", base({"kind": "factory", "spec": "os:abort"}), "cli-export", "never imports code"),
    ("factory-sys-exit", base({"kind": "factory", "spec": "sys:exit"}), "cli-export", "never imports code"),
    ("factory-module-next-to-manifest", evil_module_next_to_manifest({"kind": "factory", "spec": "evilmod:make"}),
     "cli-export", "never imports code"),
    ("factory-module-next-to-manifest-api", evil_module_next_to_manifest({"kind": "factory", "spec": "evilmod:make"}),
     "load", "never imports code"),
    ("vl-text-factory", evil_module_next_to_manifest({"kind": "vl", "spec": "vl", "text": "evilmod:make",
                                                      "size": "tiny", "visual": "clip-vit-b-32",
                                                      "visual_size": "tiny", "vocab_size": 64}),
     "load", "text-model factory"),
    ("vl-text-factory-backbone", evil_module_next_to_manifest({"kind": "vl", "spec": "vl", "text": "evilmod:make",
                                                               "size": "tiny", "visual": "clip-vit-b-32",
                                                               "visual_size": "tiny", "vocab_size": 64}),
     "backbone", "text-model factory"),
    ("factory-via-train-init-from-cli", evil_module_next_to_manifest({"kind": "factory", "spec": "evilmod:make"}),
     "cli-train", "never imports code"),
    ("factory-via-init-from-backbone", evil_module_next_to_manifest({"kind": "factory", "spec": "evilmod:make"}),
     "backbone", "never imports code"),
    ("builtin-kind-naming-code", base({"kind": "builtin", "spec": "os:abort", "size": "tiny", "seed": 0}),
     "load", "not a built-in model"),
    ("directory-kind-naming-code", base({"kind": "directory", "spec": "evilmod:make"}), "load", "does not exist"),
    ("factory-spec-not-a-module-path", base({"kind": "factory", "spec": "__import__('os').system('x'):f"}),
     "load", "base.spec"),
    ("vl-unknown-visual", vl_base(visual="evilmod:make"), "load", "not a known image encoder"),
    ("vl-text-neither", vl_base(text="no-such-model"), "load", "neither a built-in"),
    # init_from chains
    ("init-from-self", vl_base(init_from=lambda run: str(run)), "load", "cycle"),
    ("init-from-self-cli", vl_base(init_from=lambda run: str(run)), "cli-export", "cycle"),
    ("init-from-self-backbone", vl_base(init_from=lambda run: str(run)), "backbone", "cycle"),
    ("init-from-two-cycle", two_cycle, "load", "cycle"),
    ("init-from-too-deep", chain(MAX_INIT_FROM_DEPTH + 2), "load", f"more than {MAX_INIT_FROM_DEPTH} runs"),
    ("init-from-missing", vl_base(init_from="/nonexistent/run"), "load", "not a training run directory"),
    ("init-from-a-file", vl_base(init_from=lambda run: str(run / "model" / MANIFEST)), "load",
     "not a training run directory"),
    # every field missing
    *[(f"missing-{'.'.join(p)}", drop(*p), "load", f"'{'.'.join(p)}' is missing") for p in [
        ("base",), ("fingerprint",), ("rules",), ("methods",), ("plan",), ("versions",), ("weights_sha256",),
        ("base", "kind"), ("base", "spec"), ("rules", "text"), ("rules", "sha256"), ("rules", "name"),
        ("fingerprint", "config_sha256"), ("fingerprint", "frozen_weights_sha256"), ("versions", "torch")]],
    ("missing-format", drop("format"), "load", "'format' is missing"),
    # wrong types (strict: no coercion) and out of bounds
    ("format-int", put(1, "format"), "load", "has format 1"),
    ("format-unknown", put("vlpet-fx/adapters@9", "format"), "cli-export", "has format 'vlpet-fx/adapters@9'"),
    ("base-string", put("t5", "base"), "load", "'base' is invalid"),
    ("base-kind-unknown", put("pickle", "base", "kind"), "load", "known kinds are builtin, directory, factory, vl"),
    ("base-seed-string", put("3", "base", "seed"), "load", "'base.seed' is invalid"),
    ("base-seed-negative", put(-1, "base", "seed"), "load", "'base.seed' is invalid"),
    ("base-seed-huge", put(2**40, "base", "seed"), "load", "'base.seed' is invalid"),
    ("base-seed-float", put(1.5, "base", "seed"), "load", "'base.seed' is invalid"),
    ("base-size-unknown", put("huge", "base", "size"), "load", "'base.size' is invalid"),
    ("base-spec-empty", put("", "base", "spec"), "load", "'base.spec' is invalid"),
    ("base-extra-field", put("os:abort", "base", "factory"), "load", "'base.factory' is not part of the format"),
    ("top-extra-field", put({"x": 1}, "hooks"), "load", "'hooks' is not part of the format"),
    ("vl-vocab-zero", vl_base(vocab_size=0), "load", "'base.vocab_size' is invalid"),
    ("vl-vocab-huge", vl_base(vocab_size=10**12), "load", "'base.vocab_size' is invalid"),
    ("vl-tokens-negative", vl_base(tokens_per_image=-1), "load", "'base.tokens_per_image' is invalid"),
    ("vl-vocab-bool", vl_base(vocab_size=True), "load", "'base.vocab_size' is invalid"),
    ("fingerprint-not-hex", put("xyz", "fingerprint", "config_sha256"), "load", "'fingerprint.config_sha256'"),
    ("rules-text-int", put(42, "rules", "text"), "load", "'rules.text' is invalid"),
    ("rules-text-too-long", put("#" * ((1 << 20) + 1), "rules", "text"), "load", "'rules.text' is invalid"),
    ("methods-list", put([], "methods"), "load", "'methods' is invalid"),
    ("plan-list", put([], "plan"), "load", "'plan' is invalid"),
    ("versions-int", put(1, "versions", "torch"), "load", "'versions.torch' is invalid"),
    ("weights-sha-null", put(None, "weights_sha256"), "load", "'weights_sha256' is invalid"),
    # class 8: edited rules are reported as edited rules, not blamed on the base weights
    ("rules-edited", put(lambda run: json.loads((run / "model" / MANIFEST).read_text())["rules"]["text"]
                         + "\n# edited\n", "rules", "text"), "load", "rules text was edited"),
    ("rules-edited-backbone", put(lambda run: json.loads((run / "model" / MANIFEST).read_text())["rules"]["text"]
                             + "\n# edited\n", "rules", "text"), "backbone", "rules text was edited"),
    # not JSON, or JSON that is not a manifest
    ("damaged-json", write("{ damaged"), "cli-export", "the file is damaged"),
    ("json-array", write("[1, 2]"), "load", "holds a JSON list"),
    ("json-duplicate-key", write('{"format": "vlpet-fx/adapters@1", "format": "x"}'), "load", "duplicate key"),
    ("json-nan", write('{"format": NaN}'), "load", "NaN is not a JSON number"),
    ("json-deep", write("[" * 200_000), "load", "nested too deeply"),
    ("json-huge-int", write('{"plan": ' + "9" * 5000 + "}"), "load", "the file is damaged"),
    ("json-not-utf8", write(b"\xff\xfe{}"), "load", "the file is damaged"),
    ("manifest-huge", replace_manifest("huge"), "cli-export", "more than a manifest can be"),
    ("manifest-is-directory", replace_manifest("dir"), "load", "is a directory, not a manifest file"),
    ("manifest-is-fifo", replace_manifest("fifo"), "cli-export", "not a regular file"),
    ("manifest-symlink-loop", replace_manifest("loop"), "load", "symbolic links"),
    # damaged weights
    ("weights-truncated", weights("truncated"), "load", "does not match the checksum"),
    ("weights-directory", weights("dir"), "load", "is a directory"),
    ("weights-fifo", weights("fifo"), "load", "not a regular file"),
    ("weights-garbage", weights("garbage-with-matching-checksum"), "load", "the file is damaged"),
    ("weights-pickle", weights("pickle-with-matching-checksum"), "cli-export", "the file is damaged"),
]


def _cli(args, cwd, env_extra):
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-m", "vlpet_fx.cli.main", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("name, damage, how, phrase", ROWS, ids=[r[0] for r in ROWS])
def test_bad_manifest(tmp_path, monkeypatch, good, name, damage, how, phrase):
    run = tmp_path / "run"
    shutil.copytree(good, run)
    marker = tmp_path / "marker"
    monkeypatch.setenv("VLPET_TEST_MARKER", str(marker))
    damage(run, marker)
    before = _listing(tmp_path)
    model_dir = run / "model"
    if how.startswith("cli-"):
        out = tmp_path / "out"
        args = (["export", str(model_dir), "--format", "adapters", "--out", str(out)] if how == "cli-export" else
                ["train", "--init-from", str(run), "--out", str(out), "--steps", "1", "--task", "vqa",
                 "--train-per-task", "2", "--eval-per-task", "1"])
        res = _cli(args, cwd=model_dir, env_extra={"PYTHONPATH": str(model_dir), "VLPET_TEST_MARKER": str(marker)})
        assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
        message = lines[0]
        assert not out.exists()
    else:
        monkeypatch.syspath_prepend(str(model_dir))  # a module next to the manifest WOULD be importable
        monkeypatch.chdir(model_dir)
        with pytest.raises(VlpetError) as info:
            if how == "load":
                vlpet_fx.load(model_dir)
            else:
                from vlpet_fx.train.loop import load_backbone

                load_backbone(run, [])
        message = str(info.value)
        assert "\n" not in message
        sys.modules.pop("evilmod", None)
    assert phrase in message, message
    assert not marker.exists() and not Path(str(marker) + ".called").exists(), "code named by a file ran"
    assert _listing(tmp_path) == before, "something was written"


def test_trusted_factory_is_imported_only_on_opt_in(tmp_path, monkeypatch, good):
    """The opt-in works (so the rows above refuse because of the missing opt-in, not by accident), and a factory
    that raises still ends in one line."""
    run = tmp_path / "run"
    shutil.copytree(good, run)
    marker = tmp_path / "marker"
    monkeypatch.setenv("VLPET_TEST_MARKER", str(marker))
    evil_module_next_to_manifest({"kind": "factory", "spec": "evilmod:make"})(run, marker)
    monkeypatch.syspath_prepend(str(run / "model"))
    with pytest.raises(vlpet_fx.ExportError, match="never imports code"):
        vlpet_fx.load(run / "model")
    assert not marker.exists()
    # the caller passes the model: the factory named in the manifest is not needed, nothing is imported
    patched = vlpet_fx.load(build_model("t5", "tiny"), run / "model")
    assert patched.vlpet_patch.attached and not marker.exists()
    with pytest.raises(vlpet_fx.ModelSpecError, match="factory 'evilmod:make' raised RuntimeError: the factory ran"):
        vlpet_fx.load(run / "model", trust_code=True)
    sys.modules.pop("evilmod", None)
    assert marker.exists() and Path(str(marker) + ".called").exists()


def test_manifest_written_today_is_valid_and_carries_rules_sha(good):
    doc = json.loads((good / "model" / MANIFEST).read_text())
    assert doc["rules"]["sha256"] == sha256_text(doc["rules"]["text"])
    assert vlpet_fx.export.read_manifest(good / "model")["base"] == {"kind": "builtin", "spec": "t5", "size": "tiny",
                                                                      "seed": 0}


# ---- .pt2 archives --------------------------------------------------------------------------------------------

def _rewrite(src: Path, dst: Path, edit_entries, compress=zipfile.ZIP_STORED) -> None:
    zin = zipfile.ZipFile(src)
    entries = {i.filename: zin.read(i.filename) for i in zin.infolist()}
    root = next(iter(entries)).split("/")[0]
    entries = edit_entries(root, dict(entries))
    with zipfile.ZipFile(dst, "w", compress) as z:
        for n, d in (entries.items() if isinstance(entries, dict) else entries):
            z.writestr(n, d)


def _use_pickle(marker):
    def e(root, entries):
        cfg_name = f"{root}/data/weights/model_weights_config.json"
        cfg = json.loads(entries[cfg_name])
        fqn = next(iter(cfg["config"]))
        cfg["config"][fqn]["use_pickle"] = True
        entries[cfg_name] = json.dumps(cfg).encode()
        entries[f"{root}/data/weights/" + cfg["config"][fqn]["path_name"]] = pickle.dumps(Evil(marker))
        return entries

    return e


def _sample_inputs(marker):
    def e(root, entries):
        entries[f"{root}/data/sample_inputs/model.pt"] = pickle.dumps(Evil(marker))
        return entries

    return e


def _expr(marker):
    def e(root, entries):
        name = f"{root}/models/model.json"
        text = entries[name].decode()
        assert "Symbol('" in text
        i = text.index("Symbol('")
        entries[name] = (text[:i] + f"__import__('builtins').open('{marker}', 'w') and " + text[i:]).encode()
        return entries

    return e


def _guard(marker):
    def e(root, entries):
        name = f"{root}/models/model.json"
        doc = json.loads(entries[name])
        doc["guards_code"] = [f"__import__('builtins').open('{marker}', 'w') is not None"]
        entries[name] = json.dumps(doc).encode()
        return entries

    return e


def _attribute_name(marker):
    """A parameter name that fx writes, unescaped, into `getattr(self.lin, "...")` of the generated forward."""
    evil = 'x",None)or open(' + repr(marker) + ',"w")or getattr(self,"y'

    def e(root, entries):
        for n in list(entries):
            if n.endswith(".json"):
                entries[n] = entries[n].decode().replace('"lin.weight"', json.dumps("lin." + evil)).encode()
        return entries

    return e


def _add(rel, data_of):
    def make(marker):
        def e(root, entries):
            entries[f"{root}/{rel}"] = data_of(marker)
            return entries

        return e

    return make


def _constants_entry(prefix):
    def make(marker):
        def e(root, entries):
            cfg_name = f"{root}/data/constants/model_constants_config.json"
            cfg = json.loads(entries[cfg_name])
            cfg["config"]["c"] = {"path_name": f"{prefix}0", "is_param": False, "use_pickle": False,
                                  "tensor_meta": None}
            entries[cfg_name] = json.dumps(cfg).encode()
            entries[f"{root}/data/constants/{prefix}0"] = pickle.dumps(Evil(marker))
            return entries

        return e

    return make


def _int_as_string(marker):
    def e(root, entries):
        name = f"{root}/models/model.json"
        doc = json.loads(entries[name])
        doc["range_constraints"] = {k: {"min_val": f"__import__('builtins').open('{marker}','w')", "max_val": 64}
                                    for k in doc["range_constraints"]}
        entries[name] = json.dumps(doc).encode()
        return entries

    return e


def _duplicate(marker):
    def e(root, entries):
        items = list(entries.items())
        return items + [(f"{root}/data/sample_inputs/model.pt", pickle.dumps(Evil(marker)))]

    return e


def _opaque_call(marker):
    """A node calling vlpet-fx's opaque op (a slot naming a module of whichever process loads the file)."""
    def e(root, entries):
        name = f"{root}/models/model.json"
        text = entries[name].decode()
        assert '"torch.ops.aten.mul.Tensor"' in text
        entries[name] = text.replace('"torch.ops.aten.mul.Tensor"', '"torch.ops.vlpet_fx.opaque.default"').encode()
        return entries

    return e


def _target(target):
    """A node whose target is ``target``: torch resolves `torch.a.b` by getattr from the torch module, so
    `torch.os.system` is os.system (torch's verifier refuses it after resolving; the scan refuses it first)."""
    def make(marker):
        def e(root, entries):
            name = f"{root}/models/model.json"
            doc = json.loads(entries[name])
            doc["graph_module"]["graph"]["nodes"].insert(0, {
                "target": target, "inputs": [{"name": "", "arg": {"as_string": f"touch {marker}"}, "kind": 1}],
                "outputs": [{"as_none": True}], "metadata": {}, "is_hop_single_tensor_return": None, "name": "x"})
            entries[name] = json.dumps(doc).encode()
            return entries

        return e

    return make


PT2_ROWS = [
    ("use-pickle-weight", _use_pickle, "marks 'lin.weight' use_pickle"),
    ("sample-inputs-pickle", _sample_inputs, "names Python objects besides tensors"),
    ("expr-str-eval", _expr, "expr_str with \"__import__"),
    ("guards-code-exec", _guard, "more than a shape comparison"),
    ("parameter-name-code", _attribute_name, "is not a plain dotted name"),
    ("aotinductor-native-code", _add("data/aotinductor/model/model.so", lambda m: b"\x7fELF"), "native code"),
    ("legacy-pickled-weights", _add("data/weights/model.pt", lambda m: pickle.dumps(Evil(m))), "legacy pickled"),
    ("opaque-object-constant", _constants_entry("opaque_obj_"), "pickle.loads"),
    ("custom-object-constant", _constants_entry("custom_obj_"), "TorchScript pickle"),
    ("unknown-entry", _add("xl_model_weights/model_param_config", lambda m: b"{}"), "is not part of a torch.export"),
    ("number-as-code", _int_as_string, "wrong type at program.range_constraints"),
    ("duplicate-entry", _duplicate, "appears twice"),
    ("opaque-op-call", _opaque_call, "calls torch.ops.vlpet_fx.opaque.default: a module that capture kept"),
    ("torch-callable-target", _target("torch.os.system"), "names 'torch.os.system' as an operator, which is not"),
    ("ops-attribute-target", _target("torch.ops.load_library"), "names 'torch.ops.load_library' as an operator"),
    ("hop-attribute-target", _target("torch.ops.higher_order.cond.name"), "as an operator, which is not one"),
]


@pytest.mark.parametrize("name, damage, phrase", PT2_ROWS, ids=[r[0] for r in PT2_ROWS])
def test_malicious_pt2_is_refused_before_anything_runs(tmp_path, good_pt2, name, damage, phrase):
    marker = tmp_path / "marker"
    bad = tmp_path / "bad.pt2"
    _rewrite(good_pt2, bad, damage(str(marker)))
    before = _listing(tmp_path)
    with pytest.raises(vlpet_fx.ExportError) as info:
        load_pt2(bad).module()(torch.randn(2, 3))
    message = str(info.value)
    assert "\n" not in message and phrase in message, message
    assert "refusing" in message and "bad.pt2" in message
    assert not marker.exists(), "an entry of the .pt2 was unpickled or run"
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("name, make, phrase", [
    ("not-a-zip", lambda p, g: p.write_bytes(b"PK\x03\x04 not really"), "cannot load"),
    ("directory", lambda p, g: p.mkdir(), "is a directory"),
    ("fifo", lambda p, g: os.mkfifo(p), "not a regular file"),
    ("missing", lambda p, g: None, "does not exist"),
    ("compressed", lambda p, g: _rewrite(g, p, lambda r, e: e, zipfile.ZIP_DEFLATED), "is compressed"),
])
def test_damaged_pt2_files(tmp_path, good_pt2, name, make, phrase):
    bad = tmp_path / "bad.pt2"
    make(bad, good_pt2)
    with pytest.raises(vlpet_fx.ExportError, match=phrase):
        load_pt2(bad)


def test_genuine_pt2_still_loads_and_runs(good_pt2):
    ep = load_pt2(good_pt2)
    x = torch.randn(5, 3)  # another batch size than at export: the dynamic dimension survived
    ref = Tiny()
    ref.load_state_dict(dict(ep.state_dict))
    torch.testing.assert_close(ep.module()(x), ref(x))


def test_the_pt2_attacks_are_real_without_the_scan(tmp_path, good_pt2):
    """Plain torch.export.load in this torch does unpickle these entries: the refusals above are needed."""
    script = (
        "import sys, torch\n"
        "for f in sys.argv[1:]:\n"
        "    try:\n"
        "        torch.export.load(f).module()(torch.randn(2, 3))\n"
        "    except Exception:\n"
        "        pass\n"
    )
    attacks = (_use_pickle, _sample_inputs, _expr, _attribute_name)
    for damage in attacks:
        _rewrite(good_pt2, tmp_path / f"{damage.__name__}.pt2", damage(str(tmp_path / f"marker-{damage.__name__}")))
    subprocess.run([sys.executable, "-c", script, *(str(tmp_path / f"{d.__name__}.pt2") for d in attacks)],
                   capture_output=True, timeout=300)
    for damage in attacks:
        assert (tmp_path / f"marker-{damage.__name__}").exists(), f"{damage.__name__}: the payload did not run"


# ---- user factories typed on the command line: imported (the user typed them), but one line when they fail ----

@pytest.mark.parametrize("spec, how, phrase", [
    ("userfacs:boom", "cli", "factory 'userfacs:boom' raised RuntimeError: no GPU here"),
    ("userfacs:needs", "cli", "needs arguments (d, heads)"),
    ("sys:exit", "cli", "is a built-in function"),
    ("os:abort", "api", "is a built-in function"),
    ("userfacs:notmodule", "api", "returned int, not a torch.nn.Module"),
    ("userfacs:missing", "api", "has no attribute 'missing'"),
])
def test_user_factory_failures_are_one_line(tmp_path, monkeypatch, spec, how, phrase):
    (tmp_path / "userfacs.py").write_text(USER_FACTORIES)
    if how == "cli":
        res = _cli(["inspect", spec], cwd=tmp_path, env_extra={"PYTHONPATH": str(tmp_path)})
        assert res.returncode == 2, (res.stdout, res.stderr)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
        assert phrase in lines[0], lines[0]
    else:
        from vlpet_fx.zoo import load_model

        monkeypatch.syspath_prepend(str(tmp_path))
        with pytest.raises(vlpet_fx.ModelSpecError) as info:
            load_model(spec)
        assert phrase in str(info.value) and "\n" not in str(info.value)
        sys.modules.pop("userfacs", None)


# ---- Hugging Face directories: their code never runs, their pickles are never unpickled ------------------------

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hf") / "t5"
    build_model("t5", "tiny").save_pretrained(d)
    return d


def _remote_code(d: Path, marker: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evilcfg.EvilConfig", "AutoModel": "evilcfg.EvilModel",
                       "AutoModelForSeq2SeqLM": "evilcfg.EvilModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "evilcfg.py").write_text(f"open({str(marker)!r}, 'w')\nfrom transformers import T5Config\n"
                                  "class EvilConfig(T5Config):\n    pass\n")


def _pickled_weights(d: Path, marker: Path) -> None:
    (d / "model.safetensors").unlink()
    torch.save({"shared.weight": torch.zeros(2), "x": Evil(str(marker))}, d / "pytorch_model.bin")


@pytest.mark.parametrize("name, damage, how, phrase", [
    ("remote-code-is-not-run", _remote_code, "api", None),
    ("pickled-weights", _pickled_weights, "api", "never unpickles"),
    ("pickled-weights-cli", _pickled_weights, "cli", "never unpickles"),
])
def test_hf_directory_code_and_pickles(tmp_path, monkeypatch, hf_dir, name, damage, how, phrase):
    from vlpet_fx.zoo import load_model

    d = tmp_path / "hf"
    shutil.copytree(hf_dir, d)
    marker = tmp_path / "marker"
    damage(d, marker)
    monkeypatch.syspath_prepend(str(d))
    if how == "cli":
        res = _cli(["patch", str(d), "--rules", "vlpet_large", "--out", str(tmp_path / "out")], cwd=d,
                   env_extra={"PYTHONPATH": str(d)})
        assert not (tmp_path / "out").exists()
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
        assert phrase in lines[0] and "weights_only=False" not in lines[0], lines[0]
    elif phrase is None:  # loads as the plain model its model_type names; evilcfg.py is never imported
        model, _ = load_model(str(d))
        assert type(model).__module__.startswith("transformers.")
    else:
        with pytest.raises(vlpet_fx.ModelSpecError) as info:
            load_model(str(d))
        assert phrase in str(info.value) and "weights_only" not in str(info.value), str(info.value)
        assert "\n" not in str(info.value)
    assert not marker.exists()


# ---- open_clip checkpoints ------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, phrase", [
    ("evil-pickle", "holds pickled Python objects besides tensors, which vlpet-fx never unpickles"),
    ("garbage", "cannot be read as a tensor checkpoint"),
])
def test_bad_open_clip_checkpoint_is_one_clear_line(tmp_path, content, phrase):
    from vlpet_fx.vl.build import _any_open_clip

    marker = tmp_path / "marker"
    ckpt = tmp_path / "ckpt.pt"
    if content == "garbage":
        ckpt.write_bytes(b"garbage bytes, not a checkpoint")
    else:
        torch.save({"state_dict": {}, "extra": Evil(str(marker))}, ckpt)
    with pytest.raises(vlpet_fx.ModelSpecError) as info:
        _any_open_clip(f"RN50@{ckpt}")
    message = str(info.value)
    assert phrase in message and "safetensors" in message, message
    assert "weights_only" not in message and "\n" not in message
    assert not marker.exists()


# ---- the good path of init_from still works ---------------------------------------------------------------------

def test_init_from_chain_round_trip(tmp_path):
    """A run trained from another run's model (a ``vl`` base with ``init_from``) loads back exactly."""
    from vlpet_fx.vl import build_vl

    ref = {"kind": "vl", "spec": "vl", "text": "t5", "size": "tiny", "visual": "clip-vit-b-32", "visual_size": "tiny",
           "vocab_size": 64, "seed": 0, "tokens_per_image": None, "init_from": None}
    a = build_vl("t5", "tiny", vocab_size=64, seed=0)
    vlpet_fx.patch(a, "full_finetune", seed=0)
    with torch.no_grad():
        for p in a.parameters():
            if p.requires_grad:
                p.add_(0.01)  # as after training
    save_patched(a, tmp_path / "A" / "model", ref)
    b = vlpet_fx.load(tmp_path / "A" / "model")
    del b.vlpet_patch
    vlpet_fx.patch(b, "vlpet_large", seed=0)
    save_patched(b, tmp_path / "B" / "model", dict(ref, init_from=str(tmp_path / "A")))
    c = vlpet_fx.load(tmp_path / "B" / "model")
    want, got = b.state_dict(), c.state_dict()
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
