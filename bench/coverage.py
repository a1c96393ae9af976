"""Coverage: every model type of transformers' causal-LM and seq2seq mappings (+ VLM and speech families),
built from a tiny config offline, through the whole compiler.

Per family: build (``vlpet_fx.zoo.tiny``: the config class's defaults, shrunk generically) and
``save_pretrained`` to a temporary directory, sites per stack/block/role, patch with a VL-PET rule set + forward + backward, LoRA
identical to the unpatched model at init, and for generative models ``generate()`` with the KV cache equal to
``generate()`` without it after patching. A family fails on the first step that fails, with one line; for a
failure, what ``vlpet-fx inspect DIR`` says about the saved directory is recorded too (one line or not). A family
is "not buildable" only when transformers' own default config fails to build too (tried on the meta device); a
tiny config that fails where the default builds is our failure at step ``build`` (a 2-layer tiny model that does
not build is tried once more with 4 layers, two of each kind).

    nice -n 10 .venv/bin/python bench/coverage.py                 # all (about an hour on 2 busy cores with --workers 3)
    .venv/bin/python bench/coverage.py --only llama gpt2 whisper  # a few

Families run in a worker process (restarted if it dies) with a per-family time limit; results are appended
to ``docs/bench/coverage/coverage.jsonl`` as they come (a re-run skips families already there unless
``--fresh``), then ``docs/bench/coverage/coverage.json`` and ``docs/COVERAGE.md`` are written.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "bench" / "coverage"
# the VLM and speech families of issue 12 (built with the image-text-to-text / speech seq2seq auto classes)
EXTRA = {"vlm": ["llava", "paligemma", "idefics3", "smolvlm", "qwen2_vl"], "speech": ["whisper"]}
AUTO = {"seq2seq": "AutoModelForSeq2SeqLM", "causal": "AutoModelForCausalLM", "vlm": "AutoModelForImageTextToText",
        "speech": "AutoModelForSpeechSeq2Seq"}


def rules_for(table) -> str:
    """The shipped VL-PET rule set that fits the stacks found: the paper's for encoder-decoders (an encoder and a
    decoder that cross-attends), the causal-LM extension for any other model with a decoder (a VLM whose vision
    tower has a pooling head's cross-attention, a byte-level model's patch cross-attention), VL-Adapter's for
    anything else."""
    if "encoder" in table.stacks() and len(table.where(stack="decoder", block="cross_attn")):
        return "vlpet_large"
    if "decoder" in table.stacks():
        return "vlpet_causal_lm"
    return "vl_adapter"


# The LoRA step: the shipped `lora` rule set's rules (LoRA on q and v of every attention and on the in/out
# projections of every mixer, each rule optional, an empty plan a failure; zero-initialised B), with its rank
# (128) capped at the narrowest site the rules select: a tiny model's sites can be narrower than 128 (BLOOM's
# per-head slices of a 32-wide model, GPT-BigCode's 64-wide multi-query value), and the identity at init does
# not depend on the rank.
LORA_RANK = 128
LORA_SELECT = {"attention-qv": {"stack": ["encoder", "decoder"], "block": ["self_attn", "cross_attn"],
                                "role": ["q", "v"]},
               "mixer-in-out": {"stack": ["encoder", "decoder"], "block": ["mixer"], "role": ["in", "out"]}}


def lora_rules(table):
    """The coverage-local LoRA rule set for ``table`` (see LORA_RANK) and its rank."""
    from vlpet_fx.rules import parse_rules

    widths = [min(s.in_features, s.out_features) for sel in LORA_SELECT.values() for s in table.where(**sel)]
    rank = max(1, min([LORA_RANK, *widths]))
    rules = ", ".join("{name: %s, select: %s, insert: lora, placement: parallel, optional: true}"
                      % (name, json.dumps(sel)) for name, sel in LORA_SELECT.items())
    return parse_rules(
        "name: coverage-lora\n"
        "methods: {lora: {type: lora, rank: %d, alpha: 32, dropout: 0.1}}\n"
        "rules: [%s]\n" % (rank, rules), source="coverage-lora"), rank


def families() -> list[tuple[str, str]]:
    from transformers.models.auto import modeling_auto as ma

    out = [(m, t) for m, ts in EXTRA.items() for t in ts]
    out += [("seq2seq", t) for t in ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES]
    out += [("causal", t) for t in ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
    return out


def _line(exc: BaseException) -> str:
    text = next((t.strip() for t in str(exc).splitlines() if t.strip()), "")
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Timeout(Exception):
    pass


def _alarm(_sig, _frame):
    raise Timeout("over the per-family time limit")


def _first_float(out):
    import torch

    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    values = out.values() if hasattr(out, "values") else (out if isinstance(out, (tuple, list)) else [])
    for v in values:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v
    raise RuntimeError("the forward returned no float tensor")


def _own_generate_fault(model, extra: dict) -> str | None:
    """What is wrong with transformers' own ``generate()`` on the unpatched ``model`` (it raises, or the KV cache
    changes the tokens), or None when it is fine: a failure of the patched model is then the patch's."""
    import torch

    try:
        with torch.no_grad():
            cached = model.generate(**extra, max_new_tokens=4, do_sample=False, use_cache=True)
            plain = model.generate(**extra, max_new_tokens=4, do_sample=False, use_cache=False)
    except Exception as exc:  # noqa: BLE001
        return f"generate() fails on the unpatched model too: {_line(exc)}"
    if cached.shape != plain.shape or not bool((cached == plain).all()):
        return "generate() with the KV cache differs from generate() without it on the unpatched model too"
    return None


def _same_as_unpatched(patched, pristine, extra: dict, own: str) -> str:
    """``patched.generate() == pristine.generate()`` (greedy, 4 tokens) in each cache mode that runs on the
    unpatched model; the record's note, or RuntimeError naming the first difference."""
    import torch

    modes = []
    for use_cache in (True, False):
        with torch.no_grad():
            try:
                want = pristine.generate(**extra, max_new_tokens=4, do_sample=False, use_cache=use_cache)
            except Exception:  # noqa: BLE001 -- transformers' own failure in this mode: nothing to compare
                continue
            got = patched.generate(**extra, max_new_tokens=4, do_sample=False, use_cache=use_cache)
        if got.shape != want.shape or not bool((got == want).all()):
            raise RuntimeError(f"generate(use_cache={use_cache}) of the LoRA-patched model (identical at init) "
                               "differs from the unpatched model's")
        modes.append(f"use_cache={use_cache}")
    if not modes:
        raise RuntimeError(own)
    return f"upstream: {own}; patched == unpatched ({', '.join(modes)})"


def _generate_equal(model, extra: dict) -> bool:
    """Greedy ``generate()`` of 4 tokens with the KV cache gives what it gives without it."""
    import torch

    with torch.no_grad():
        cached = model.generate(**extra, max_new_tokens=4, do_sample=False, use_cache=True)
        plain = model.generate(**extra, max_new_tokens=4, do_sample=False, use_cache=False)
    return cached.shape == plain.shape and bool((cached == plain).all())


def _shorter_prompt(extra: dict) -> dict | None:
    """``extra`` with the first half of its prompt (ids and their mask), or None when there is no prompt to halve."""
    ids = extra.get("input_ids")
    if ids is None or ids.dim() != 2 or ids.shape[-1] < 2:
        return None
    half = ids.shape[-1] // 2
    out = dict(extra, input_ids=ids[:, :half])
    mask = extra.get("attention_mask")
    if mask is not None and tuple(mask.shape) == tuple(ids.shape):
        out["attention_mask"] = mask[:, :half]
    return out


def check_generate(model, lora_patched, pristine, extra: dict) -> str:
    """Step 5: the patched ``model``'s ``generate()`` with the KV cache equals ``generate()`` without it; the
    record's note, or an exception naming what failed.

    Where transformers' own ``generate()`` fails that check on the unpatched tiny model: if the example prompt
    leaves no room to generate (a streaming speech model generates at most one token per audio frame, and the
    prompt has as many), the same check on half the prompt; else what is left to check is that patching changes
    nothing there — the LoRA-patched copy (identical at init, step 4) generates what the unpatched model
    generates, in every cache mode that runs on the unpatched model."""
    try:
        if _generate_equal(model, extra):
            return "equal"
        failure: Exception = RuntimeError("generate() with the KV cache differs from generate() without it")
    except Exception as exc:  # noqa: BLE001
        failure = exc
    own = _own_generate_fault(pristine, extra)
    if not own:
        raise failure
    short = _shorter_prompt(extra)
    if short is not None and _own_generate_fault(pristine, short) is None:
        if not _generate_equal(model, short):
            raise RuntimeError("generate() with the KV cache differs from generate() without it (on half the "
                               "example prompt, which left no room to generate)")
        return "equal (on half the example prompt, which left no room to generate)"
    return _same_as_unpatched(lora_patched, pristine, extra, own)


# the reason of a family whose tiny config fails to build although transformers' default config builds
TINY_FAILS = "the tiny config does not build (transformers' default config does)"


def default_build(mapping: str, model_type: str) -> str:
    """"ok" when transformers' own default config of ``model_type`` builds its model class (on the meta device: no
    memory, no initialisation), else the one-line reason it does not."""
    import torch
    import transformers as tf

    try:
        config = tf.AutoConfig.for_model(model_type)
        if mapping == "causal" and getattr(config, "is_decoder", None) is False:
            config.is_decoder = True  # as for the tiny config (the causal-LM heads of encoder families)
        with torch.device("meta"):
            getattr(tf, AUTO[mapping]).from_config(config)
    except Exception as exc:  # noqa: BLE001
        return _line(exc)
    return "ok"


def run_family(mapping: str, model_type: str) -> dict:
    """All steps for one family; never raises (the record says where and why it stopped)."""
    import torch
    import transformers as tf

    import vlpet_fx
    from vlpet_fx.capture.inputs import build_example_inputs
    from vlpet_fx.errors import VlpetError
    from vlpet_fx.zoo import load_model
    from vlpet_fx.zoo.tiny import LAYERS, tiny_config

    rec: dict = {"mapping": mapping, "model_type": model_type, "status": "pass", "steps": {}}
    t0 = time.perf_counter()

    def failed(step: str, exc: BaseException) -> dict:
        chain, e = [], exc
        while e is not None and len(chain) < 8:
            chain.append(e)
            e = e.__cause__ or e.__context__
        if any(isinstance(e, Timeout) for e in chain):  # our own time limit, even when raised inside torch.export
            step, exc = "time", next(e for e in chain if isinstance(e, Timeout))
        rec["status"], rec["step"], rec["reason"] = "fail", step, _line(exc)
        if step == "build":
            rec["default_build"] = default_build(mapping, model_type)
            if rec["default_build"] != "ok":  # transformers' own default config does not build either
                rec["status"] = "not buildable"
            else:  # only our tiny config fails: a failure of ours, counted among the buildable
                rec["reason"] = f"{TINY_FAILS}: {rec['reason']}"
        rec["clear"] = isinstance(exc, VlpetError) and "\n" not in str(exc).strip()
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        return rec

    tmp = tempfile.TemporaryDirectory()
    # 1. build and save (a failure here is "not buildable" only when transformers' default config fails too)
    def build(layers: int):
        torch.manual_seed(0)
        config = tiny_config(model_type, layers)
        if mapping == "causal" and getattr(config, "is_decoder", None) is False:
            config.is_decoder = True  # the causal-LM heads of encoder families (BERT ...) need it, as their docs say
        model = getattr(tf, AUTO[mapping]).from_config(config).eval()
        model.save_pretrained(tmp.name)
        return model

    try:
        try:
            model = build(LAYERS)
        except Exception as first:  # noqa: BLE001
            if isinstance(first, Timeout):
                raise
            try:  # layers of one kind may share weights (one shared block for all hybrid layers): two of each kind
                model = build(2 * LAYERS)
            except Exception:  # noqa: BLE001 -- the tiny model's own failure is the one to report
                raise first from None
            rec["tiny_layers"] = 2 * LAYERS
        rec["params"] = sum(p.numel() for p in model.parameters())
        rec["model_class"] = type(model).__name__
    except Exception as exc:  # noqa: BLE001
        return failed("build", exc)

    def failed_here(step: str, exc: BaseException) -> dict:
        """A failure after the build: also record what `vlpet-fx inspect DIR` says about the saved directory."""
        rec = failed(step, exc)
        try:
            with tmp:
                net, _ = load_model(tmp.name, weights=False)
                vlpet_fx.discover(net, name=model_type)
            rec["inspect_dir"] = "ok"
        except VlpetError as err:
            rec["inspect_dir"] = "one line" if "\n" not in str(err).strip() else "several lines"
        except Exception as err:  # noqa: BLE001
            rec["inspect_dir"] = f"not a VlpetError: {_line(err)}"
        return rec

    # 2. sites (the saved directory loads as the same class: `vlpet-fx inspect DIR` sees the same model)
    try:
        table = vlpet_fx.discover(model, name=model_type)
        rec["layers"] = table.num_layers()
        rec["sites"] = len(table)
        rec["roles"] = {f"{s}.{b}": sorted(Counter(x.role for x in table.where(stack=s, layer=0, block=b)).items())
                        for s in table.stacks() for b in sorted({x.block for x in table.where(stack=s)})}
        rec["norms"] = len(table.meta.get("norms") or ())
    except Exception as exc:  # noqa: BLE001
        return failed_here("discover", exc)

    # 3. patch + forward + backward with a VL-PET rule set
    try:
        built = build_example_inputs(model)
        if built is None:
            raise vlpet_fx.CaptureError("no example inputs for this model")
        _, args, kwargs = built
        with torch.no_grad():
            reference = _first_float(model(*args, **kwargs)).detach()
        base = copy.deepcopy(model)
        pristine = copy.deepcopy(model)  # never patched: tells a failing generate() of transformers' own apart
        rec["rules"] = rules_for(table)
        plan = vlpet_fx.plan(model, rec["rules"], table=table)
        rec["placements"] = len(plan.placements)
        rec["trainable"] = plan.trainable_params
        vlpet_fx.patch(model, plan)
        out = _first_float(model(*args, **kwargs))
        out.float().sum().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        if not grads or any(g is None or not torch.isfinite(g).all() for g in grads):
            raise RuntimeError("a trainable parameter got no finite gradient")
    except Exception as exc:  # noqa: BLE001
        return failed_here("patch-fwd-bwd", exc)

    # 4. LoRA (zero-initialised B) leaves the outputs unchanged at init
    try:
        lora, rec["lora_rank"] = lora_rules(plan.table)
        lora_plan = vlpet_fx.plan(base, lora, table=plan.table)  # the same module paths: no second capture
        # a plan in which every rule is optional and none matched is refused by plan() in one line
        vlpet_fx.patch(base, lora_plan)
        with torch.no_grad():
            diff = (_first_float(base(*args, **kwargs)) - reference).abs().max().item()
        rec["lora_max_diff"] = diff
        if not diff <= 1e-5 * max(1.0, reference.abs().max().item()):
            raise RuntimeError(f"LoRA at init changes the output by {diff:.3g}")
    except Exception as exc:  # noqa: BLE001
        return failed_here("lora-identity", exc)

    # 5. generate() with the KV cache == without, after patching
    if getattr(model, "can_generate", lambda: False)():
        extra = {k: v for k, v in kwargs.items() if k not in ("use_cache", "decoder_input_ids")}
        try:
            rec["generate"] = check_generate(model, base, pristine, extra)
        except Exception as exc:  # noqa: BLE001
            return failed_here("generate", exc)
    else:
        rec["generate"] = "not generative"
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    tmp.cleanup()
    return rec


def worker(todo: list[tuple[str, str]], jsonl: Path, limit: int) -> None:
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    signal.signal(signal.SIGALRM, _alarm)
    for mapping, model_type in todo:
        signal.alarm(limit)
        try:
            rec = run_family(mapping, model_type)
        except Timeout as exc:
            rec = {"mapping": mapping, "model_type": model_type, "status": "fail", "step": "time",
                   "reason": _line(exc), "clear": False}
        finally:
            signal.alarm(0)
        with jsonl.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(f"{mapping:8s} {model_type:28s} {rec['status']:14s} {rec.get('step', '')} {rec.get('reason', '')[:120]}",
              flush=True)


def _done(jsonl: Path) -> dict[tuple[str, str], dict]:
    out = {}
    if jsonl.exists():
        for line in jsonl.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[(r["mapping"], r["model_type"])] = r
    return out


def _upstream(r: dict) -> bool:
    """Passed with generate() checked against the unpatched model (transformers' own cache check fails)."""
    return str(r.get("generate", "")).startswith("upstream")


def summarise(records: list[dict]) -> dict:
    by: dict[str, dict] = {}
    for r in records:
        s = by.setdefault(r["mapping"], {"families": 0, "not run": 0, "buildable": 0, "pass": 0})
        s["families"] += 1
        s["not run"] += r["status"] == "not run"
        s["buildable"] += r["status"] not in ("not buildable", "not run")
        s["pass"] += r["status"] == "pass"
        s["pass, generate vs unpatched"] = (s.get("pass, generate vs unpatched", 0)
                                            + (r["status"] == "pass" and _upstream(r)))
    for s in by.values():
        s["pass_rate"] = round(100.0 * s["pass"] / s["buildable"], 1) if s["buildable"] else None
    return by


# families torch.export cannot capture, with the reason (written under the table of docs/COVERAGE.md). None now:
# switch_transformers and longcat_flash (per-expert loops over the experts hit) and qwen2_vl (a split by lengths read
# from a tensor; rope positions from a groupby on token types) capture with those modules kept opaque and the
# position ids passed in (docs/CAUSAL_LM.md, "Capture failures")
UNSUPPORTED: dict[str, str] = {}

# failure classes, by what the one-line reason says (first match wins)
CAUSES = [
    ("loops over values read from tensors", "torch.export: a loop over tensor values (per-expert MoE loops)"),
    ("sizes tensors by values read from tensors", "torch.export: tensor sizes from tensor values"),
    ("'str' object has no attribute 'all_input_nodes'", "einsum attention read as q"),
    ("reads the block input", "VL-PET gate: block input X not tied to a module (MoE, parallel or post-norm blocks)"),
    ("no module returns at every call", "a module called from several layers (shared block): the eager back end cannot tell the calls apart"),
    ("no attention or feed-forward blocks found", "no attention or FFN pattern found (e.g. hashed / chunked attention)"),
    ("to gate a value", "VL-PET gate: X of another width than the gated value (e.g. hyper-connections)"),
    ("matches no site", "a block the rule set names was not found (e.g. FFN behind a post-norm, fused or MoE)"),
    ("not the output of a module", "a site its module does not return: graph back end only (e.g. a mixer's gate map)"),
    ("cannot be multiplied", "shape error in the patched forward (fused q/k/v or X of another width)"),
    ("must match the size", "shape error in the patched forward (fused q/k/v or X of another width)"),
    ("no example inputs known", "no example inputs built (audio-LLM placeholders, model-specific layouts)"),
    ("even without torch.export", "the model rejects the built example inputs"),
    ("torch.export failed", "torch.export cannot capture the forward (data-dependent control flow ...)"),
    ("per-family time limit", "over the per-family time limit on the busy machine"),
    ("LoRA at init", "LoRA not identical at init"),
    ("trains nothing", "LoRA finds no attention q/v and no mixer projection (every rule optional, none matched)"),
    (TINY_FAILS, "our tiny config does not build although transformers' default config does (vlpet_fx/zoo/tiny.py)"),
    ("on the unpatched model too", "transformers' own generate() fails on the tiny config (unpatched too)"),
    ("generate()", "generate() with the KV cache differs"),
]


def cause_of(reason: str) -> str:
    return next((c for key, c in CAUSES if key in reason), "other")


def write_markdown(records: list[dict], meta: dict, path: Path) -> None:
    from vlpet_fx.zoo.tiny import LAYERS

    summary = summarise(records)
    lines = ["# Coverage: every causal-LM and seq2seq family of transformers, tiny configs, offline", "",
             f"Measured {meta['date']} with `{meta['command']}` on {meta['machine']} (torch {meta['torch']}, "
             f"transformers {meta['transformers']}); raw records: `docs/bench/coverage/coverage.json`.", "",
             "Each family is built from its config class's defaults shrunk by `vlpet_fx.zoo.tiny` (2 layers, 4 heads "
             "of the default head width, FFN 128, vocabulary 512; a hybrid keeps one layer of each kind, multi-head "
             "attention stays multi-head, derived settings follow) and saved with `save_pretrained`, then: sites per "
             "stack, block and role, a VL-PET rule set patched in (`vlpet_large` when the model has cross-attention, "
             "`vlpet_causal_lm` when its decoder has none, `vl_adapter` when it has no decoder) with a forward and a backward, LoRA "
             "(the shipped `lora` rule set on q and v and on mixers' in/out projections, zero-initialised B, its rank "
             "128 capped at the narrowest site it selects in the tiny model: `LORA_RANK` in `bench/coverage.py`) identical to the unpatched model, and `generate()` with the KV cache equal to "
             "`generate()` without it after patching — or, where transformers' own `generate()` fails that check on the "
             "unpatched tiny model (it raises, or its cache changes the tokens), the LoRA-patched copy generating "
             "exactly what the unpatched model generates in every cache mode that runs there (counted apart below). "
             "A family fails at its first failing step. A family is `not buildable` only when transformers' own "
             "default config of it fails to build too (tried on the meta device); where only the tiny config fails, "
             "it is a failure at step `build`, counted among the buildable. For every failure the "
             "table says whether it is a one-line `VlpetError` (what `vlpet-fx` prints with exit 2) and what "
             "`vlpet-fx inspect DIR` says about the saved directory (`inspect DIR: ok` when only a later step fails).",
             "", "| mapping | families | not run | buildable (of those run) | pass | of which generate() checked "
             "against the unpatched model | pass rate of buildable |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m, s in summary.items():
        rate = f"{s['pass_rate']:.1f} %" if s["pass_rate"] is not None else "-"
        lines.append(f"| {m} | {s['families']} | {s['not run']} | {s['buildable']} | {s['pass']} | "
                     f"{s['pass, generate vs unpatched']} | {rate} |")
    steps = Counter(r.get("step") for r in records if r["status"] == "fail")
    lines += ["", "Failures by step: " + ", ".join(f"{k} {v}" for k, v in steps.most_common()) if steps else "", ""]
    causes = Counter(cause_of(r.get("reason", "")) for r in records if r["status"] == "fail")
    if causes:
        lines += ["Failures by cause (classified by the words of the one-line reason, `bench/coverage.py` CAUSES):",
                  "", "| cause | families |", "|---|---:|"]
        lines += [f"| {c} | {n} |" for c, n in causes.most_common()]
        lines += [""]
    lines += ["| mapping | family | status | layers | sites | roles in layer 0 | norms | step / reason |",
              "|---|---|---|---|---:|---|---:|---|"]
    for r in records:
        layers = ", ".join(f"{k} {v}" for k, v in (r.get("layers") or {}).items())
        roles = "; ".join(f"{k}: " + " ".join(f"{role}{'×' + str(n) if n > 1 else ''}" for role, n in v)
                          for k, v in (r.get("roles") or {}).items())
        why = f"generate: {r['generate']}".replace("|", "\\|") if r["status"] == "pass" and _upstream(r) else ""
        if r["status"] != "pass":
            why = f"{r.get('step', '')}: {r.get('reason', '')}".replace("|", "\\|")
            if r["status"] == "fail" and not r.get("clear"):
                why = "(not a VlpetError) " + why
            if r["status"] == "not buildable" and r.get("default_build"):
                why += " (transformers' default config fails too)"
            if r.get("inspect_dir"):
                why += f" (inspect DIR: {r['inspect_dir']})"
        if r.get("tiny_layers"):
            why = f"(built with {r['tiny_layers']} layers, two of each kind: not with {LAYERS}) " + why
        lines.append(f"| {r['mapping']} | {r['model_type']} | {r['status']} | {layers} | {r.get('sites', '')} | "
                     f"{roles} | {r.get('norms', '')} | {why} |")
    if UNSUPPORTED:
        lines += ["", "Notes: families torch.export cannot capture (the capture error names the line and the fix; a "
                  "branch on data alone is captured with the example inputs' branch, asserted at run time):", ""]
        lines += [f"- `{t}`: {why}" for t, why in UNSUPPORTED.items()]
    lines += ["", "A module whose forward loops or sizes tensors by tensor values (and that draft_export cannot "
              "specialise) is kept as one opaque call in the graph, with no sites inside it (docs/CAUSAL_LM.md)."]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", help="model types to run (default: all)")
    ap.add_argument("--limit", type=int, default=120, help="seconds per family")
    ap.add_argument("--fresh", action="store_true", help="forget earlier results")
    ap.add_argument("--reverse", action="store_true", help="go through the families from the last one")
    ap.add_argument("--workers", type=int, default=1, help="worker processes (each single-threaded)")
    ap.add_argument("--report-only", action="store_true", help="only write the report from the results so far")
    ap.add_argument("--redo-failed", action="store_true",
                    help="run the failed and not buildable families again (others are kept)")
    ap.add_argument("--redo", action="store_true",
                    help="with --only: run those families again (their earlier results are dropped, others kept)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--markdown", type=Path, default=ROOT / "docs" / "COVERAGE.md")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    jsonl = args.out / "coverage.jsonl"
    if args.worker:
        todo = [tuple(x.split(":", 1)) for x in args.worker.split(",")]
        worker(todo, jsonl, args.limit)
        return
    if args.fresh and jsonl.exists():
        jsonl.unlink()
    if args.redo_failed and jsonl.exists():
        kept = [r for r in _done(jsonl).values()
                if r["status"] not in ("fail", "not buildable")
                or (args.only is not None and r["model_type"] not in args.only)]
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in kept))
    if args.redo:
        if args.only is None:
            raise SystemExit("--redo needs --only (the families to run again); to run all again use --fresh")
        if jsonl.exists():
            kept = [r for r in _done(jsonl).values() if r["model_type"] not in args.only]
            jsonl.write_text("".join(json.dumps(r) + "\n" for r in kept))
    todo = [f for f in families() if args.only is None or f[1] in args.only]
    if args.reverse:  # e.g. a second run from the other end of the list
        todo.reverse()
    t0 = time.time()
    from concurrent.futures import ThreadPoolExecutor

    def run_share(share: list[tuple[str, str]]) -> None:
        """One worker process per share, restarted after a crash (the family it died on is recorded)."""
        while True:
            done = _done(jsonl)
            left = [f for f in share if f not in done]
            if not left:
                return
            proc = subprocess.run([sys.executable, __file__, "--worker", ",".join(f"{m}:{t}" for m, t in left),
                                   "--limit", str(args.limit), "--out", str(args.out)])
            if proc.returncode != 0:  # e.g. a crash inside a C extension: record it and go on
                after = _done(jsonl)
                crashed = next((f for f in left if f not in after), None)
                if crashed is not None:
                    with jsonl.open("a") as fh:
                        fh.write(json.dumps({"mapping": crashed[0], "model_type": crashed[1], "status": "fail",
                                             "step": "crash", "reason": f"worker exited with {proc.returncode}",
                                             "clear": False}) + "\n")

    if not args.report_only:
        shares = [todo[i::args.workers] for i in range(args.workers)]
        with ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(run_share, shares))
    done = _done(jsonl)
    records = [done.get(f) or {"mapping": f[0], "model_type": f[1], "status": "not run",
                               "step": "", "reason": "not run before the run was stopped"} for f in families()]
    import platform

    import torch
    import transformers

    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "command": _command(args), "wall_seconds": round(time.time() - t0)}
    (args.out / "coverage.json").write_text(json.dumps({"meta": meta, "summary": summarise(records),
                                                        "families": records}, indent=1) + "\n")
    write_markdown(records, meta, args.markdown)
    print(json.dumps(summarise(records)))


def _command(args) -> str:
    """This run's command line; a partial run (--only, --redo-failed, --report-only) keeps the results of earlier
    runs, so their command is named before it."""
    import shlex

    this = shlex.join(["bench/coverage.py"] + sys.argv[1:])
    if args.fresh or not (args.only or args.redo_failed or args.report_only):
        return this
    try:
        before = json.loads((args.out / "coverage.json").read_text())["meta"]["command"]
    except (OSError, ValueError, KeyError):
        return this
    return before if before.endswith(this) else f"{before}, then {this}"


if __name__ == "__main__":
    main()
